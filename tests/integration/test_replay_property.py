"""Property: normalising any stored message sequence, then replaying it all twice, leaves
the same projections and the same event log (no duplicate events) — on SQLite, and on
PostgreSQL for a smaller sample."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from engine.services.normaliser import REPLAYABLE
from engine.store.database import open_engine, upgrade
from tests.conftest import _driver, require_postgres
from tests.helpers import pg_url
from tests.loop_messages import adt, orm, oru, siu, unmapped
from tests.normalising import drain, processor, snapshot, store

# Two referrals' worth of messages; any subset, any order, any repeats.
_KINDS = ["orm", "s12", "s14", "s15", "s26", "oru", "oru_p", "adt", "bad"]


def _message(kind: str, placer: str, n: int) -> bytes:
    control = f"{kind}-{placer}-{n}"
    return {
        "orm": lambda: orm(control, placer),
        "s12": lambda: siu(control, placer),
        "s14": lambda: siu(control, placer, trigger="S14", status="Complete"),
        "s15": lambda: siu(control, placer, trigger="S15", status="Cancelled"),
        "s26": lambda: siu(control, placer, trigger="S26", status="Noshow"),
        "oru": lambda: oru(control, placer),
        "oru_p": lambda: oru(control, placer, status="P"),
        "adt": lambda: adt(control),
        "bad": lambda: unmapped(control),
    }[kind]()


_streams = st.lists(
    st.tuples(st.sampled_from(_KINDS), st.sampled_from(["PROP1", "PROP2"])),
    min_size=1,
    max_size=14,
)


def _check(url: str, stream: list[tuple[str, str]], batch: int) -> None:
    engine = open_engine(url)
    try:
        store(engine, [_message(k, p, n) for n, (k, p) in enumerate(stream)])
        proc = processor(engine)
        drain(proc, batch=batch)
        first = snapshot(engine)
        ids = [i for i, _ in first["statuses"]]
        for _ in range(2):
            stored = proc.eventlog.messages(ids)
            proc.eventlog.end()
            pending = list(stored)
            while pending:
                done = {r.message_id for r in proc.process(pending, statuses=REPLAYABLE)}
                pending = [m for m in pending if m.id not in done]
            drain(proc, batch=batch)  # whatever a replay released
            assert snapshot(engine) == first
        rebuilt = proc.rebuild()
        proc.close()
        assert rebuilt.changed == 0
        assert snapshot(engine) == first
        assert len({e["id"] for e in first["events"]}) == len(first["events"])
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "refloop.db"
    eng = open_engine(f"sqlite:///{path}")
    upgrade(eng)
    eng.dispose()
    return path


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(stream=_streams, batch=st.sampled_from([1, 3, 256]))
def test_replaying_twice_changes_nothing_on_sqlite(tmp_path, sqlite_template, stream, batch):
    db = tmp_path / f"{uuid.uuid4().hex}.db"
    shutil.copy(sqlite_template, db)
    try:
        _check(f"sqlite:///{db}", stream, batch)
    finally:
        db.unlink(missing_ok=True)


@pytest.mark.postgres
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(stream=_streams, batch=st.sampled_from([1, 256]))
def test_replaying_twice_changes_nothing_on_postgres(stream, batch):
    require_postgres()
    schema = f"p_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_driver(pg_url()))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    from sqlalchemy.engine import make_url

    url = (
        make_url(pg_url())
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        eng = open_engine(url)
        upgrade(eng)
        eng.dispose()
        _check(url, stream, batch)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
