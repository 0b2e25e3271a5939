"""What each worklist action does to an item, and what it refuses (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import click
import pytest

from engine.edges.cli_worklist import parse_until
from engine.store.worklist import (
    Item,
    RefusedAction,
    decide,
    event_fields,
    event_id,
)

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
ITEM = Item(
    id=7,
    key="k",
    referral_id="r-1",
    message_id=None,
    reason="not_scheduled_in_14d",
    detail="policy rule unscheduled",
    owner="coordinator",
    assignee=None,
    status="open",
    state="sent",
    due_at=NOW - timedelta(hours=1),
    snoozed_until=None,
    created_at=NOW - timedelta(days=3),
    updated_at=NOW - timedelta(days=3),
    resolved_at=None,
    resolved_by=None,
)


def test_acknowledge_wakes_a_snoozed_item() -> None:
    snoozed = replace(ITEM, status="snoozed", snoozed_until=NOW + timedelta(days=1))
    step = decide(snoozed, "acknowledged", " alice ", NOW)
    assert (step.status, step.snoozed_until, step.actor, step.at) == (
        "acknowledged",
        None,
        "alice",
        NOW,
    )
    with pytest.raises(RefusedAction, match="already acknowledged"):
        decide(replace(ITEM, status="acknowledged"), "acknowledged", "alice", NOW)


def test_assign_keeps_the_status_and_records_where_it_went() -> None:
    step = decide(ITEM, "assigned", "alice", NOW, to="bob", note=" call the clinic ")
    assert (step.status, step.assignee, step.note) == ("open", "bob", "call the clinic")
    assert step.history_note == "to bob: call the clinic"
    assert event_fields(ITEM, step) == {
        "actor": "alice",
        "worklist.item": 7,
        "worklist.reason": "not_scheduled_in_14d",
        "worklist.assignee": "bob",
        "worklist.note": "call the clinic",
    }
    with pytest.raises(RefusedAction, match="already assigned to bob"):
        decide(replace(ITEM, assignee="bob"), "assigned", "alice", NOW, to="bob")
    with pytest.raises(RefusedAction, match="the assignee is empty"):
        decide(ITEM, "assigned", "alice", NOW, to="  ")


def test_snooze_only_into_the_future() -> None:
    until = NOW + timedelta(hours=4)
    step = decide(ITEM, "snoozed", "alice", NOW, until=until)
    assert (step.status, step.snoozed_until) == ("snoozed", until)
    assert step.history_note == "until 2026-12-02T13:00:00+00:00"
    assert event_fields(ITEM, step)["worklist.snoozed_until"] == "2026-12-02T13:00:00+00:00"
    later = decide(
        replace(ITEM, status="snoozed", snoozed_until=until),
        "snoozed",
        "a",
        NOW,
        until=until + timedelta(days=1),
    )
    assert later.snoozed_until == until + timedelta(days=1)
    for bad in (NOW, NOW - timedelta(seconds=1)):
        with pytest.raises(RefusedAction, match="not in the future"):
            decide(ITEM, "snoozed", "alice", NOW, until=bad)
    with pytest.raises(RefusedAction, match="needs a time"):
        decide(ITEM, "snoozed", "alice", NOW)


def test_nothing_after_resolved() -> None:
    step = decide(ITEM, "resolved", "alice", NOW, note="booked")
    assert (step.status, step.history_note) == ("resolved", "booked")
    done = replace(ITEM, status="resolved", resolved_by="refloop", resolved_at=NOW)
    for action in ("acknowledged", "assigned", "snoozed", "resolved"):
        with pytest.raises(RefusedAction, match="already resolved by refloop"):
            decide(done, action, "alice", NOW, to="bob", until=NOW + timedelta(days=1))


def test_who_acts_must_be_a_name() -> None:
    for actor in ("", "   ", "x" * 65, "bad\nname"):
        with pytest.raises(RefusedAction, match="actor"):
            decide(ITEM, "acknowledged", actor, NOW)
    with pytest.raises(RefusedAction, match="unknown action"):
        decide(ITEM, "deleted", "alice", NOW)
    with pytest.raises(RefusedAction, match="at most 2000"):
        decide(ITEM, "resolved", "alice", NOW, note="x" * 2001)


def test_event_ids_are_stable_and_distinct() -> None:
    assert event_id(7, "snoozed", 3) == event_id(7, "snoozed", 3)
    assert (
        len(
            {
                event_id(7, "snoozed", 3),
                event_id(7, "snoozed", 4),
                event_id(8, "snoozed", 3),
                event_id(7, "resolved", 3),
            }
        )
        == 4
    )


def test_until_is_a_time_or_a_span_from_now() -> None:
    assert parse_until("4h", NOW) == NOW + timedelta(hours=4)
    assert parse_until("2d", NOW) == NOW + timedelta(days=2)
    assert parse_until("1d12h", NOW) == NOW + timedelta(days=1, hours=12)
    assert parse_until("30m", NOW) == NOW + timedelta(minutes=30)
    assert parse_until("2026-12-03T09:00", NOW) == datetime(2026, 12, 3, 9, tzinfo=UTC)
    assert parse_until("2026-12-03T09:00-05:00", NOW) == datetime(2026, 12, 3, 14, tzinfo=UTC)
    with pytest.raises(click.BadParameter, match="a span from now like 30m, 4h, 2d"):
        parse_until("next week", NOW)
