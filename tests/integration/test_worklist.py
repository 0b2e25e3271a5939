"""The exception worklist: reads, the four actions and their history, the timeline events
they become, and ``refloop worklist`` — on real SQLite files and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from engine.domain.referral import State
from engine.edges.cli import main as cli
from engine.edges.cli_worklist import perform
from engine.policy.language import Policy, load_policy
from engine.store.eventlog import LogConnection
from engine.store.schema import (
    referral_events,
    referral_timers,
    referrals,
    worklist_actions,
    worklist_items,
)
from engine.store.worklist import (
    Moved,
    NewItem,
    RefusedAction,
    UnknownItem,
    WorklistQueries,
    decide,
)
from tests.helpers import MAPPINGS
from tests.loop_messages import orm
from tests.normalising import drain, open_, processor, store

NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class World:
    engine: Engine
    config: Path
    r1: str  # referral of item "stalled"
    r2: str  # referral of item "dead"
    ids: dict[str, int]  # item name → id


def _raw(engine: Engine) -> tuple[Any, WorklistQueries]:
    raw = engine.raw_connection()
    return raw, WorklistQueries(raw.driver_connection, engine.dialect.name)


def insert(engine: Engine, items: list[NewItem], now: datetime) -> None:
    """Raise items as the engine's writers do, committed."""
    raw, q = _raw(engine)
    try:
        cur = raw.driver_connection.cursor()
        q.insert(cur, items, now)
        cur.close()
        raw.driver_connection.commit()
    finally:
        raw.close()


def item_ids(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {k: i for i, k in conn.execute(select(worklist_items.c.id, worklist_items.c.key))}


@pytest.fixture
def world(tmp_path: Path, upgraded_url: str) -> Iterator[World]:
    """Two referrals from real orders, and three items raised the engine's way: one
    overdue about a referral, one due later about another, one without a referral."""
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    config = tmp_path / "engine.toml"
    config.write_text(
        f'[database]\nurl = "{upgraded_url}"\n\n[mappings]\ndir = "mappings"\n\n'
        '[[mllp.listeners]]\nname = "test"\nport = 2575\n'
    )
    engine = open_(upgraded_url)
    store(engine, [orm("WL1", "PWL1"), orm("WL2", "PWL2", mrn="100002")])
    proc = processor(engine)
    drain(proc)
    proc.close()
    with engine.connect() as conn:
        rows = conn.execute(select(referrals.c.placer_order_number, referrals.c.id))
        by_placer = {placer: rid for placer, rid in rows}
        # Whatever the normaliser raised itself is not what these tests work on.
        raised = conn.execute(select(func.count()).select_from(worklist_items)).scalar_one()
    assert raised == 0
    r1, r2 = by_placer["PWL1"], by_placer["PWL2"]
    insert(
        engine,
        [
            NewItem(
                "k-stalled",
                "not_scheduled_in_14d",
                referral_id=r1,
                due_at=NOW - timedelta(days=1),
                state="created",
                detail="policy rule unscheduled",
            )
        ],
        NOW - timedelta(days=3),
    )
    insert(
        engine,
        [
            NewItem(
                "k-dead",
                "delivery_dead_lettered",
                referral_id=r2,
                owner="integration",
                due_at=NOW + timedelta(days=1),
                detail="packet on channel fax dead-lettered: 503",
            )
        ],
        NOW - timedelta(days=2),
    )
    insert(
        engine,
        [NewItem("k-unmatched", "unmatched_message", message_id=1, detail="ORM^O01 unmatched")],
        NOW - timedelta(hours=5),
    )
    keys = item_ids(engine)
    ids = {"stalled": keys["k-stalled"], "dead": keys["k-dead"], "unmatched": keys["k-unmatched"]}
    yield World(engine, config, r1, r2, ids)
    engine.dispose()


def search(engine: Engine, now: datetime, **kw: Any) -> list[int]:
    raw, q = _raw(engine)
    try:
        return [i.id for i in q.search(now, **kw)]
    finally:
        raw.close()


def counts(engine: Engine, now: datetime) -> dict[str, int]:
    raw, q = _raw(engine)
    try:
        return q.open_counts(now)
    finally:
        raw.close()


def act(world: World, name: str, action: str, now: datetime = NOW, **kw: Any) -> Any:
    log = LogConnection(world.engine)
    try:
        return perform(log, Policy(digest=""), world.ids[name], action, "alice", now, **kw)
    finally:
        log.close()


def actions(engine: Engine, item_id: int) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(worklist_actions.c.action, worklist_actions.c.actor, worklist_actions.c.note)
            .where(worklist_actions.c.item_id == item_id)
            .order_by(worklist_actions.c.id)
        )
        return [tuple(r) for r in rows]


def worklist_events(engine: Engine, referral_id: str) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_events.c.type, referral_events.c.fields)
            .where(referral_events.c.referral_id == referral_id)
            .where(referral_events.c.type.like("worklist.%"))
            .order_by(referral_events.c.sequence)
        )
        return [(t, json.loads(f)) for t, f in rows]


def item_row(engine: Engine, item_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(select(worklist_items).where(worklist_items.c.id == item_id)).one()
        return dict(row._mapping)


# -- the store -------------------------------------------------------------------------


def test_open_items_due_first_and_filters(world: World) -> None:
    e, ids = world.engine, world.ids
    assert search(e, NOW) == [ids["stalled"], ids["dead"], ids["unmatched"]]
    assert search(e, NOW, reason="delivery_dead_lettered") == [ids["dead"]]
    assert search(e, NOW, owner="integration") == [ids["dead"]]
    assert search(e, NOW, owner="coordinator") == [ids["stalled"], ids["unmatched"]]
    assert search(e, NOW, referral=world.r2) == [ids["dead"]]
    assert search(e, NOW, referral=world.r1[:8]) == [ids["stalled"]]
    assert search(e, NOW, view="resolved") == []
    assert search(e, NOW, limit=1) == [ids["stalled"]]
    assert counts(e, NOW) == {
        "not_scheduled_in_14d": 1,
        "delivery_dead_lettered": 1,
        "unmatched_message": 1,
    }
    raw, q = _raw(e)
    try:
        stalled = q.get(ids["stalled"])
        assert stalled is not None
        assert stalled.overdue(NOW)
        assert stalled.due_at == NOW - timedelta(days=1)
        assert stalled.created_at == NOW - timedelta(days=3)
        assert q.get(10_000) is None
    finally:
        raw.close()


def test_snooze_hides_until_the_time_passes(world: World) -> None:
    e, ids = world.engine, world.ids
    until = NOW + timedelta(hours=2)
    done = act(world, "dead", "snoozed", until=until)
    assert done.item.status == "snoozed"
    assert done.item.snoozed_until == until
    hour = timedelta(hours=1)
    assert ids["dead"] not in search(e, NOW + hour)
    assert search(e, NOW + hour, view="snoozed") == [ids["dead"]]
    assert "delivery_dead_lettered" not in counts(e, NOW + hour)
    # Nothing wakes it: the read sees its time has come.
    assert ids["dead"] in search(e, NOW + 3 * hour)
    assert counts(e, NOW + 3 * hour)["delivery_dead_lettered"] == 1
    assert item_row(e, ids["dead"])["status"] == "snoozed"
    # Acknowledging wakes it for good.
    act(world, "dead", "acknowledged", NOW + 3 * hour)
    row = item_row(e, ids["dead"])
    assert (row["status"], row["snoozed_until"]) == ("acknowledged", None)
    assert ids["dead"] in search(e, NOW + hour)


def test_each_action_is_history_and_a_timeline_event(world: World) -> None:
    e, item = world.engine, world.ids["stalled"]
    until = NOW + timedelta(days=2)
    act(world, "stalled", "acknowledged")
    act(world, "stalled", "assigned", to="bob", note="she knows the clinic")
    act(world, "stalled", "snoozed", until=until)
    done = act(world, "stalled", "resolved", note="booked by phone")
    assert actions(e, item) == [
        ("acknowledged", "alice", None),
        ("assigned", "alice", "to bob: she knows the clinic"),
        ("snoozed", "alice", f"until {until.isoformat()}"),
        ("resolved", "alice", "booked by phone"),
    ]
    events = worklist_events(e, world.r1)
    assert [t for t, _ in events] == [
        "worklist.acknowledged",
        "worklist.assigned",
        "worklist.snoozed",
        "worklist.resolved",
    ]
    base = {"actor": "alice", "worklist.item": item, "worklist.reason": "not_scheduled_in_14d"}
    assert events[0][1] == base
    assert events[1][1] == {
        **base,
        "worklist.assignee": "bob",
        "worklist.note": "she knows the clinic",
    }
    snoozed = events[2][1]
    assert datetime.fromisoformat(snoozed["worklist.snoozed_until"]) == until
    assert events[3][1] == {**base, "worklist.assignee": "bob", "worklist.note": "booked by phone"}
    assert [r.type.value for r in done.events] == ["worklist.resolved"]
    row = item_row(e, item)
    assert (row["status"], row["resolved_by"], row["assignee"]) == ("resolved", "alice", "bob")
    # Recorded, not moving the referral.
    with e.connect() as conn:
        state = conn.execute(select(referrals.c.state).where(referrals.c.id == world.r1))
        assert state.scalar_one() == "created"
    assert worklist_events(e, world.r2) == []


def test_an_item_without_a_referral_keeps_its_history_only(world: World) -> None:
    e = world.engine
    with e.connect() as conn:
        before = conn.execute(select(func.count()).select_from(referral_events)).scalar_one()
    done = act(world, "unmatched", "resolved", note="test message from the vendor")
    assert done.events == ()
    assert actions(e, world.ids["unmatched"]) == [
        ("resolved", "alice", "test message from the vendor")
    ]
    with e.connect() as conn:
        after = conn.execute(select(func.count()).select_from(referral_events)).scalar_one()
    assert after == before


def test_impossible_actions_change_nothing(world: World) -> None:
    e, item = world.engine, world.ids["stalled"]
    with pytest.raises(RefusedAction, match="not in the future"):
        act(world, "stalled", "snoozed", until=NOW - timedelta(minutes=1))
    log = LogConnection(e)
    try:
        with pytest.raises(UnknownItem, match="no worklist item 999999"):
            perform(log, Policy(digest=""), 999_999, "resolved", "alice", NOW)
    finally:
        log.close()
    act(world, "stalled", "resolved")
    snapshot = (item_row(e, item), actions(e, item), worklist_events(e, world.r1))
    tries: list[tuple[str, dict[str, Any]]] = [
        ("resolved", {}),
        ("acknowledged", {}),
        ("assigned", {"to": "bob"}),
        ("snoozed", {"until": NOW + timedelta(days=1)}),
    ]
    for action, kw in tries:
        with pytest.raises(RefusedAction, match="already resolved by alice"):
            act(world, "stalled", action, **kw)
    assert (item_row(e, item), actions(e, item), worklist_events(e, world.r1)) == snapshot


def test_an_item_changed_meanwhile_refuses_the_stale_action(world: World) -> None:
    """The engine resolves the stalled item (the referral moved on) between a read and an
    action decided on it: the action is refused, not written over the resolution."""
    e, item_id = world.engine, world.ids["stalled"]
    raw, q = _raw(e)
    try:
        stale = q.get(item_id)
        assert stale is not None
        cur = raw.driver_connection.cursor()
        q.resolve_moved(cur, [Moved(world.r1, "sent")], NOW)
        raw.driver_connection.commit()
        step = decide(stale, "acknowledged", "alice", NOW)
        with pytest.raises(RefusedAction, match="changed while"):
            q.apply(cur, stale, step)
        raw.driver_connection.rollback()
        cur.close()
    finally:
        raw.close()
    row = item_row(e, item_id)
    assert (row["status"], row["resolved_by"]) == ("resolved", "refloop")
    assert actions(e, item_id) == []


def test_the_shipped_policy_sees_the_events(world: World) -> None:
    """With the shipped policy, a worklist event is recorded and arms nothing new: it
    does not move the referral."""
    policy = load_policy(MAPPINGS)
    timers_before = pending_timers(world.engine)
    log = LogConnection(world.engine)
    try:
        done = perform(log, policy, world.ids["stalled"], "acknowledged", "alice", NOW)
    finally:
        log.close()
    assert [(r.type.value, r.state_before, r.state_after, r.anomaly) for r in done.events] == [
        ("worklist.acknowledged", State.CREATED, State.CREATED, None)
    ]
    assert pending_timers(world.engine) == timers_before


def pending_timers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_timers.c.id).where(referral_timers.c.status == "pending")
        )
        return sorted(i for (i,) in rows)


# -- the command line ------------------------------------------------------------------


def run(world: World, *args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["worklist", *args, "--config", str(world.config)], env=env, catch_exceptions=False
    )


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_cli_lists_what_needs_attention(world: World) -> None:
    ids = world.ids
    rows = lines(run(world, "--json"))
    assert [r["id"] for r in rows] == [ids["stalled"], ids["dead"], ids["unmatched"]]
    first = rows[0]
    assert {
        "id",
        "reason",
        "status",
        "referral_id",
        "message_id",
        "owner",
        "assignee",
        "detail",
        "due_at",
        "overdue",
        "snoozed_until",
        "created_at",
        "needs_attention",
    } <= set(first)
    assert (first["reason"], first["referral_id"], first["overdue"], first["status"]) == (
        "not_scheduled_in_14d",
        world.r1,
        True,
        "open",
    )
    assert datetime.fromisoformat(first["due_at"]) == NOW - timedelta(days=1)
    assert rows[1]["overdue"] is False
    assert rows[2]["referral_id"] is None
    assert [r["id"] for r in lines(run(world, "--json", "--reason", "unmatched_message"))] == [
        ids["unmatched"]
    ]
    assert [r["id"] for r in lines(run(world, "--json", "--referral", world.r2[:8]))] == [
        ids["dead"]
    ]
    assert lines(run(world, "--json", "--status", "resolved")) == []
    table = run(world)
    assert table.exit_code == 0, table.output
    header, *body = table.output.splitlines()
    assert header.split()[:3] == ["ID", "REASON", "REFERRAL"]
    assert "overdue" in body[0]
    assert world.r1[:8] in body[0]
    assert "3d" in body[0]
    assert "overdue" not in body[1]
    assert "unmatched_message" in body[2]
    assert "5h" in body[2]
    assert "TESTPATIENT" not in table.output
    empty = run(world, "--status", "resolved")
    assert empty.exit_code == 0
    assert "no resolved items" in empty.output


def test_cli_actions_record_who_on_the_timeline(world: World) -> None:
    item = str(world.ids["stalled"])
    ack = run(world, "ack", item, "--by", "carol")
    assert ack.exit_code == 0, ack.output
    assert f"item {item}: acknowledged by carol (on referral {world.r1}" in ack.output
    assigned = run(world, "assign", item, "dave", env={"USER": "erin"})
    assert assigned.exit_code == 0, assigned.output
    assert "assigned to dave by erin" in assigned.output
    # The CLI reads the real clock: bound the span by the moments around the call (the
    # module's NOW may be minutes old by now in a long suite).
    before = datetime.now(UTC).replace(microsecond=0)
    snoozed = run(world, "snooze", item, "--until", "2d", "--by", "carol")
    after = datetime.now(UTC)
    assert snoozed.exit_code == 0, snoozed.output
    assert lines(run(world, "--json", "--referral", world.r1)) == []
    (row,) = lines(run(world, "--json", "--status", "snoozed"))
    until = datetime.fromisoformat(row["snoozed_until"])
    assert before + timedelta(days=2) <= until <= after + timedelta(days=2)
    resolved = run(world, "resolve", item, "--by", "carol", "--note", "booked")
    assert resolved.exit_code == 0, resolved.output

    shown = run(world, "show", item, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert (data["status"], data["resolved_by"], data["assignee"]) == ("resolved", "carol", "dave")
    assert [(h["action"], h["actor"]) for h in data["history"]] == [
        ("acknowledged", "carol"),
        ("assigned", "erin"),
        ("snoozed", "carol"),
        ("resolved", "carol"),
    ]
    assert data["history"][3]["note"] == "booked"
    text = run(world, "show", item)
    assert text.exit_code == 0
    assert "resolved     by carol  booked" in text.output

    timeline = CliRunner().invoke(
        cli, ["referrals", "show", world.r1, "--json", "--config", str(world.config)]
    )
    assert timeline.exit_code == 0, timeline.output
    events = [
        (e["type"], e["fields"]["actor"])
        for e in json.loads(timeline.output)["events"]
        if e["type"].startswith("worklist.")
    ]
    assert events == [
        ("worklist.acknowledged", "carol"),
        ("worklist.assigned", "erin"),
        ("worklist.snoozed", "carol"),
        ("worklist.resolved", "carol"),
    ]


def test_cli_refuses_with_what_to_fix(world: World) -> None:
    item = str(world.ids["dead"])
    unknown = run(world, "ack", "424242", "--by", "carol")
    assert unknown.exit_code == 1
    assert "no worklist item 424242" in unknown.output
    past = run(world, "snooze", item, "--until", "2020-01-01T00:00", "--by", "carol")
    assert past.exit_code == 1
    assert "not in the future" in past.output
    bad = run(world, "snooze", item, "--until", "tomorrow", "--by", "carol")
    assert bad.exit_code == 2
    assert "a span from now like 30m, 4h, 2d" in bad.output
    nobody = run(world, "ack", item, env={"USER": ""})
    assert nobody.exit_code == 2
    assert "--by NAME" in nobody.output
    assert actions(world.engine, world.ids["dead"]) == []
    assert run(world, "resolve", item, "--by", "carol").exit_code == 0
    again = run(world, "resolve", item, "--by", "carol")
    assert again.exit_code == 1
    assert f"item {item} is already resolved by carol" in again.output
    missing = run(world, "show", "424242")
    assert missing.exit_code == 1
    assert "no worklist item 424242" in missing.output
    assert actions(world.engine, world.ids["dead"]) == [("resolved", "carol", None)]
