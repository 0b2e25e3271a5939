"""Fixtures: a database per test on SQLite and on PostgreSQL, and an in-process daemon.

PostgreSQL comes from REFLOOP_TEST_DATABASE_URL (default the local ``test`` database).
When it cannot be reached the PostgreSQL tests are skipped with a loud line, except
under CI=true, where that fails the run: CI must prove both backends.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from engine.config import Config
from engine.edges.daemon import Daemon
from tests.helpers import make_config, pg_url

_PG_PROBLEM: str | None = None
_PG_CHECKED = False


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    global _PG_CHECKED, _PG_PROBLEM
    if not _PG_CHECKED:
        _PG_CHECKED = True
        try:
            eng = create_engine(_driver(pg_url()), connect_args={"connect_timeout": 3})
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
            eng.dispose()
        except Exception as exc:
            _PG_PROBLEM = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _PG_PROBLEM


def _driver(url: str) -> str:
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def pytest_report_header(config: pytest.Config) -> list[str]:
    problem = _pg_available()
    if problem is None:
        return [f"postgresql: {make_url(pg_url()).render_as_string()} (tests run on it)"]
    return [
        "!" * 78,
        f"!!! PostgreSQL at {make_url(pg_url()).render_as_string()} is NOT reachable ({problem})",
        "!!! PostgreSQL tests will be SKIPPED"
        + (" -- and CI=true makes that a failure" if os.environ.get("CI") == "true" else ""),
        "!" * 78,
    ]


def require_postgres() -> None:
    problem = _pg_available()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires PostgreSQL at {pg_url()}: {problem}", pytrace=False)
    pytest.skip(f"PostgreSQL unreachable ({problem})")


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/refloop.db"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_driver(pg_url()))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


def migrated(url: str) -> str:
    """Migrate the database at ``url`` to head and return the url."""
    from engine.store.database import open_engine, upgrade

    eng = open_engine(url)
    upgrade(eng)
    eng.dispose()
    return url


@pytest.fixture
def upgraded_url(database_url: str) -> str:
    """A database already migrated to head (on SQLite and on PostgreSQL)."""
    return migrated(database_url)


@pytest.fixture
def pg_upgraded(postgres_url: str) -> str:
    """A PostgreSQL-only database already migrated to head."""
    return migrated(postgres_url)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    """Run a whole daemon in this event loop until the block ends."""
    daemon = Daemon(config, install_signals=False)
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    assert ready in done, "daemon did not become ready"
    try:
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


@pytest.fixture
def config_for(upgraded_url: str) -> Any:
    def build(**kw: Any) -> Config:
        return make_config(upgraded_url, **kw)

    return build


@pytest.fixture
def temp_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("REFLOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("REFLOOP_CONFIG", raising=False)
    return monkeypatch


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's REFLOOP_DATABASE_URL must never redirect a test's database.
    monkeypatch.delenv("REFLOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("REFLOOP_CONFIG", raising=False)
