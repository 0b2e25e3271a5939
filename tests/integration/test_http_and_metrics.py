"""Health, readiness and /metrics over real HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running
from tests.helpers import RawMllp, msg

REQUIRED = {
    "refloop_mllp_messages": ("listener", "message_type", "outcome"),
    "refloop_mllp_ack_latency_seconds": ("listener",),
    "refloop_mllp_connections": ("listener",),
    "refloop_mllp_framing_errors": ("listener", "reason"),
    "refloop_db_commit_seconds": (),
}


async def _exercise(daemon) -> None:
    peer = await RawMllp.connect(daemon.listeners[0].port)
    await peer.send_raw(b"junk")
    await peer.send(msg("M1"))
    await peer.send(msg("M1"))
    await peer.send(b"not hl7")
    await peer.send(msg("M2", mtype="ADT^A08"))
    await peer.close()


async def test_metrics_have_the_contracted_series_and_bounded_labels(config_for):
    async with running(config_for()) as d:
        await _exercise(d)
        async with httpx.AsyncClient() as http:
            resp = await http.get(f"http://127.0.0.1:{d.http_port}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    for name, labels in REQUIRED.items():
        assert name in families, name
        for sample in families[name].samples:
            assert set(labels) <= set(sample.labels), (name, sample.labels)
    outcomes = {
        (s.labels["message_type"], s.labels["outcome"]): s.value
        for s in families["refloop_mllp_messages"].samples
        if s.name.endswith("_total")
    }
    assert outcomes[("ORM^O01", "accepted")] == 1
    assert outcomes[("ORM^O01", "duplicate")] == 1
    assert outcomes[("invalid", "rejected")] == 1
    assert outcomes[("ADT^A08", "accepted")] == 1
    # No control ids, names or free text in any label value.
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert "M1" not in value
                assert "TESTPATIENT" not in value


async def test_promtool_accepts_the_exposition(config_for, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: promtool is required (Debian package 'prometheus')")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    async with running(config_for()) as d:
        await _exercise(d)
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"http://127.0.0.1:{d.http_port}/metrics")).content
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_healthz_and_readyz(config_for, upgraded_url):
    async with running(config_for()) as d, httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{d.http_port}/healthz")
        ready = await http.get(f"http://127.0.0.1:{d.http_port}/readyz")
        await d.listeners[0].stop_accepting()
        not_ready = await http.get(f"http://127.0.0.1:{d.http_port}/readyz")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "listeners": {"test": "bound"}}
    assert not_ready.status_code == 503
    assert not_ready.json()["listeners"] == {"test": "down"}


async def test_readyz_reports_an_unreachable_database(tmp_path, sqlite_url):
    from engine.store.database import open_engine, upgrade
    from tests.helpers import make_config

    eng = open_engine(sqlite_url)
    upgrade(eng)
    eng.dispose()
    async with running(make_config(sqlite_url)) as d:
        db_file = tmp_path / "refloop.db"
        assert db_file.exists()
        # Make the database unreachable: swap the file for a directory.
        d.engine.dispose()
        moved = tmp_path / "moved.db"
        db_file.rename(moved)
        db_file.mkdir()
        try:
            async with httpx.AsyncClient() as http:
                resp = await http.get(f"http://127.0.0.1:{d.http_port}/readyz")
        finally:
            db_file.rmdir()
            moved.rename(db_file)
    assert resp.status_code == 503
    assert resp.json()["database"] == "unreachable"
