"""Opening the database and keeping its schema current (Alembic).

SQLite is the embedded default, PostgreSQL production; both go through the same
SQLAlchemy Core code. SQLite runs in WAL mode with ``synchronous=FULL`` by default so a
committed message survives power loss, not only a crash.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

import migrations

# The Alembic scripts ship as the top-level ``migrations`` package, so an installed
# refloop (wheel, container) finds them as well as a source checkout does.
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


class SchemaError(Exception):
    """The database schema is not the one this version of refloop needs."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def open_engine(url: str, *, pool_size: int = 5, sqlite_synchronous: str = "FULL") -> Engine:
    sa_url = make_url(url)
    if sa_url.drivername == "postgres":  # Heroku-style URLs; SQLAlchemy wants postgresql
        sa_url = sa_url.set(drivername="postgresql")
    if sa_url.get_backend_name() == "postgresql" and sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(sa_url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        return engine
    return create_engine(
        sa_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # Bound how long a hung server (not a refusing one) can hold a commit, and
        # with it the senders waiting for their answer.
        connect_args={
            "connect_timeout": 5,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
            "tcp_user_timeout": 15000,
        },
    )


def _sqlite_pragmas(synchronous: str) -> Any:
    def on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return on_connect


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate to the newest schema; returns (before, after)."""
    before = current_revision(engine)
    command.upgrade(alembic_config(engine), "head")
    return before, head_revision()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaError` naming the fix when the schema is not at head."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError("the database has no refloop schema yet; run `refloop db upgrade` first")
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        # A newer refloop migrated this database (a rollback, or mixed versions).
        raise SchemaError(
            f"the database schema is at revision {current}, which this refloop (needs {head}) "
            "does not know: a newer refloop migrated it; run that version, or restore a "
            "backup taken before its upgrade"
        )
    raise SchemaError(
        f"the database schema is at revision {current} but this refloop needs {head}; "
        "run `refloop db upgrade`"
    )


def describe_failure(url: str, exc: BaseException) -> str:
    """Why the database could not be used, naming where it is (never the password)."""
    try:
        where = make_url(url).render_as_string(hide_password=True)
    except Exception:
        where = "(unparseable URL)"
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    detail = lines[0][:200] if lines else type(orig).__name__
    return f"cannot use the database at {where}: {detail}"


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
