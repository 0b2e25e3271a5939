"""The Alembic migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine.store.database import (
    SchemaError,
    check_schema,
    current_revision,
    head_revision,
    open_engine,
    upgrade,
)
from engine.store.schema import metadata


def test_models_and_migrations_agree(database_url):
    eng = open_engine(database_url)
    try:
        upgrade(eng)
        with eng.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
    finally:
        eng.dispose()
    assert diff == []


def test_schema_check_names_the_fix_and_upgrade_is_idempotent(database_url):
    eng = open_engine(database_url)
    try:
        with pytest.raises(SchemaError, match="refloop db upgrade"):
            check_schema(eng)
        assert upgrade(eng) == (None, head_revision())
        assert upgrade(eng) == (head_revision(), head_revision())
        assert current_revision(eng) == head_revision()
        check_schema(eng)
    finally:
        eng.dispose()


def test_raw_bodies_are_lz4_compressed_on_postgres_when_the_server_has_it(postgres_url):
    from sqlalchemy import text

    eng = open_engine(postgres_url)
    try:
        upgrade(eng)
        with eng.connect() as conn:
            has_lz4 = conn.execute(
                text(
                    "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                    "WHERE name = 'default_toast_compression'"
                )
            ).scalar()
            methods = set(
                conn.execute(
                    text(
                        "SELECT attcompression FROM pg_attribute "
                        "WHERE attrelid = 'messages'::regclass AND attname IN ('raw', 'ack')"
                    )
                ).scalars()
            )
    finally:
        eng.dispose()
    assert methods == ({"l"} if has_lz4 else {""})


def test_schema_from_a_newer_refloop_is_refused_with_a_clear_reason(database_url):
    from sqlalchemy import text

    eng = open_engine(database_url)
    try:
        upgrade(eng)
        with eng.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(SchemaError, match="a newer refloop migrated it"):
            check_schema(eng)
    finally:
        eng.dispose()
