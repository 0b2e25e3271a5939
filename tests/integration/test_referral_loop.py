"""End to end over MLLP: messages in, ACKs out, referrals tracked after the ACK."""

from __future__ import annotations

import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from engine.edges.daemon import Daemon, StartupError
from engine.store.database import open_engine
from engine.store.schema import messages, referral_events, referrals
from tests.conftest import running
from tests.helpers import MAPPINGS, RawMllp, segments, wait_for
from tests.loop_messages import loop, orm, unmapped


def referral_rows(url: str) -> list:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(referrals)))
    finally:
        eng.dispose()


def event_rows(url: str) -> list:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(referral_events).order_by(referral_events.c.sequence)))
    finally:
        eng.dispose()


def message_statuses(url: str) -> list[str]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(messages.c.status).order_by(messages.c.id)).scalars())
    finally:
        eng.dispose()


async def send_all(port: int, payloads: list[bytes]) -> None:
    peer = await RawMllp.connect(port)
    for payload in payloads:
        ack = await peer.send(payload)
        assert segments(ack)["MSA"][1] == "AA"
    await peer.close()


def in_state(url: str, state: str, events: int):
    def check() -> bool:
        rows = referral_rows(url)
        return len(rows) == 1 and rows[0].state == state and rows[0].last_sequence == events

    return check


async def test_the_loop_over_mllp_ends_note_received_with_four_events(config_for, upgraded_url):
    async with running(config_for()) as d:
        await send_all(d.listeners[0].port, loop("E2E1"))
        await wait_for(in_state(upgraded_url, "note_received", 4))
    events = event_rows(upgraded_url)
    assert [e.type for e in events] == [
        "referral.created",
        "appointment.booked",
        "appointment.completed",
        "consult_note.received",
    ]
    assert [e.anomaly for e in events] == [None] * 4
    assert message_statuses(upgraded_url) == ["processed"] * 4


async def test_the_sius_before_the_order_end_in_the_same_state(config_for, upgraded_url):
    orm_, s12, s14, oru_ = loop("E2E2")
    async with running(config_for()) as d:
        port = d.listeners[0].port
        await send_all(port, [s12, s14])
        await wait_for(lambda: message_statuses(upgraded_url) == ["parked", "parked"])
        await send_all(port, [orm_, oru_])
        await wait_for(in_state(upgraded_url, "note_received", 4))
    events = event_rows(upgraded_url)
    assert [(e.message_id, e.type, e.anomaly) for e in events] == [
        (3, "referral.created", None),
        (1, "appointment.booked", None),
        (2, "appointment.completed", None),
        (4, "consult_note.received", None),
    ]


async def test_a_message_that_fails_to_map_is_acked_stored_and_blocks_nothing(
    config_for, upgraded_url
):
    async with running(config_for()) as d:
        await send_all(d.listeners[0].port, [unmapped("POISON1"), orm("AFTER1", "E2E3")])
        await wait_for(lambda: message_statuses(upgraded_url) == ["mapping_error", "processed"])
        await wait_for(lambda: _sample(d, "refloop_mapping_errors_total", mapping="none") == 1)
        # A mapping error is the analyst's to fix, never the sender's: it was answered AA.


def _families(d: Daemon) -> dict:
    return {f.name: f for f in text_string_to_metric_families(d.exposition().decode())}


def _sample(d: Daemon, name: str, **labels: str) -> float | None:
    for family in _families(d).values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def test_referral_metrics(config_for, upgraded_url):
    async with running(config_for()) as d:
        await send_all(d.listeners[0].port, loop("E2E4"))
        await wait_for(in_state(upgraded_url, "note_received", 4))
        await wait_for(lambda: _sample(d, "refloop_referrals", state="note_received") == 1)
        assert _sample(d, "refloop_events_total", type="referral.created") == 1
        assert _sample(d, "refloop_events_total", type="consult_note.received") == 1
        assert _sample(d, "refloop_referrals", state="cancelled") == 0
        assert _sample(d, "refloop_parked_messages") == 0
        assert _sample(d, "refloop_unmatched_messages") == 0
        assert _sample(d, "refloop_normalizer_backlog") == 0
        assert _sample(d, "refloop_normalize_seconds_count") == 4
        assert _sample(d, "refloop_normalize_lag_seconds_count") == 4
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"http://127.0.0.1:{d.http_port}/metrics")).text
    assert "E2E4" not in body
    assert "100001" not in body


async def test_a_bad_mapping_set_keeps_the_running_one_then_a_good_one_replaces_it(
    tmp_path, upgraded_url, config_for
):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    target = root / "hl7v2" / "orders.map.yaml"
    good = target.read_text()
    cfg = config_for(mappings={"dir": str(root), "reload_seconds": 0.05})
    async with running(cfg) as d:
        assert d.normaliser is not None
        first = d.normaliser.mappings.current.digest
        target.write_text(good.replace("emit: referral.created", "emit: referral.creatd"))
        await wait_for(lambda: _sample(d, "refloop_mapping_reloads_total", result="error") == 1)
        assert d.normaliser.mappings.current.digest == first
        await send_all(d.listeners[0].port, [orm("STILL1", "E2E5")])
        await wait_for(lambda: message_statuses(upgraded_url) == ["processed"])
        target.write_text(good + "\n# a comment changes the digest\n")
        await wait_for(lambda: _sample(d, "refloop_mapping_reloads_total", result="ok") == 1)
        second = d.normaliser.mappings.current.digest
        assert second != first
        # SIGHUP reloads at once; an unchanged set is not counted as a reload.
        target.write_text(good)
        d.reload_mappings()
        await wait_for(lambda: d.normaliser.mappings.current.digest == first)
    events = event_rows(upgraded_url)
    assert events[0].mapping_digest == first


async def test_a_broken_mapping_set_refuses_the_start_with_file_line_column(
    tmp_path, upgraded_url, config_for
):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    target = root / "hl7v2" / "orders.map.yaml"
    target.write_text(target.read_text().replace("emit: referral.created", "emit: referral.creatd"))
    with pytest.raises(StartupError, match=r"orders\.map\.yaml:\d+:\d+"):
        await Daemon(config_for(mappings={"dir": str(root)}), install_signals=False).run()


async def test_a_listener_naming_an_unknown_overlay_refuses_the_start(config_for):
    cfg = config_for(
        listeners=[{"name": "epicfeed", "host": "127.0.0.1", "port": 0, "mappings": "nosuch"}]
    )
    with pytest.raises(StartupError, match=r"listener epicfeed: mappings = 'nosuch'"):
        await Daemon(cfg, install_signals=False).run()


async def test_the_normaliser_can_be_turned_off(config_for, upgraded_url):
    async with running(config_for(normalizer={"enabled": False})) as d:
        assert d.normaliser is None
        await send_all(d.listeners[0].port, [orm("OFF1", "E2E6")])
    assert message_statuses(upgraded_url) == ["received"]
    assert referral_rows(upgraded_url) == []
