"""The normaliser in its own process (the production default): the loop closes, its
metrics appear on the daemon's page, SIGHUP reaches it, and a killed child is replaced
without losing a message."""

from __future__ import annotations

import os
import shutil
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.edges.daemon import Daemon
from tests.conftest import running
from tests.helpers import MAPPINGS, wait_for
from tests.integration.test_referral_loop import (
    event_rows,
    in_state,
    message_statuses,
    send_all,
)
from tests.loop_messages import loop, orm

SEPARATE = {"separate_process": True}


def sample(d: Daemon, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(d.exposition().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def test_the_loop_closes_in_a_separate_process(config_for, upgraded_url):
    async with running(config_for(normalizer=SEPARATE)) as d:
        assert d.normaliser is None
        assert d.normaliser_process is not None
        child = d.normaliser_process.pid
        assert child is not None
        assert child != os.getpid()
        await send_all(d.listeners[0].port, loop("PROC1"))
        await wait_for(in_state(upgraded_url, "note_received", 4), timeout=30)
        # The child's counters reach the daemon's page within its report interval.
        await wait_for(lambda: sample(d, "refloop_events_total", type="referral.created") == 1)
        async with httpx.AsyncClient() as http:
            page = (await http.get(f"http://127.0.0.1:{d.http_port}/metrics")).text
    names = [f.name for f in text_string_to_metric_families(page)]
    assert len(names) == len(set(names)), "a metric family is served twice"
    assert "refloop_events" in names
    assert "refloop_mllp_messages" in names
    assert [e.type for e in event_rows(upgraded_url)] == [
        "referral.created",
        "appointment.booked",
        "appointment.completed",
        "consult_note.received",
    ]
    # The daemon stopped its child on the way out.
    assert not _alive(child)


async def test_sighup_reaches_the_child_and_a_bad_set_keeps_the_running_one(
    tmp_path, config_for, upgraded_url
):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    target = root / "hl7v2" / "orders.map.yaml"
    good = target.read_text()
    # A long poll: only the explicit reload request can explain a reload here.
    cfg = config_for(normalizer=SEPARATE, mappings={"dir": str(root), "reload_seconds": 3600})
    async with running(cfg) as d:
        await wait_for(lambda: sample(d, "refloop_mapping_reloads_total", result="error") == 0)
        target.write_text(good.replace("emit: referral.created", "emit: referral.creatd"))
        d.reload_mappings()
        await wait_for(lambda: sample(d, "refloop_mapping_reloads_total", result="error") == 1)
        # Still normalising with the set it had.
        await send_all(d.listeners[0].port, [orm("HUP1", "PROC2")])
        await wait_for(lambda: message_statuses(upgraded_url) == ["processed"])


async def test_a_killed_child_is_replaced_and_nothing_is_lost(config_for, upgraded_url):
    async with running(config_for(normalizer=SEPARATE)) as d:
        assert d.normaliser_process is not None
        first = d.normaliser_process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        orm_, s12, s14, oru_ = loop("PROC3")
        # Stored and acknowledged while no normaliser runs at all.
        await send_all(d.listeners[0].port, [orm_, s12])
        await wait_for(lambda: d.normaliser_process.restarts == 1, timeout=30)
        assert d.normaliser_process.pid not in (None, first)
        await send_all(d.listeners[0].port, [s14, oru_])
        await wait_for(in_state(upgraded_url, "note_received", 4), timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is gone if its state says so.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
