"""Appointment ladders (``before_appointment:``): what the loader refuses, at which line,
and the timer decisions the fixtures cannot reach (a late scheduler, a start changed
under a pending step)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import Event
from engine.policy.language import APPOINTMENT, ENTRY, Policy, PolicyError, compile_policy
from engine.policy.timers import appointment_start, on_due, on_transition

HEAD = "schema: referral-policy/v1\nladders:\n"
REMINDERS = (
    "  - id: reminders\n    states: scheduled\n    before_appointment:\n"
    "      - {before: 72h, do: outreach, template: appointment_reminder}\n"
    "      - {before: 24h, do: outreach, template: appointment_reminder, prefer: [sms]}\n"
)


def compile_text(text: str) -> Policy:
    return compile_policy([("p.yaml", text.encode())])


def test_an_appointment_ladder_compiles_to_negative_offsets() -> None:
    policy = compile_text(HEAD + REMINDERS)
    (ladder,) = policy.ladders
    assert ladder.anchor == APPOINTMENT
    assert [s.after for s in ladder.steps] == [timedelta(hours=-72), timedelta(hours=-24)]
    assert ladder.steps[1].prefer == ("sms",)
    plain = compile_text(
        HEAD + "  - id: l\n    states: sent\n    steps: [{after: 1d, do: outreach, template: t}]\n"
    )
    assert plain.ladders[0].anchor == ENTRY


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(
            "  - id: r\n    states: [scheduled, sent]\n    before_appointment:\n"
            "      - {before: 24h, do: outreach, template: t}\n",
            "p.yaml:4:13: a before_appointment ladder applies while scheduled (an appointment "
            "ahead), not sent",
            id="state-without-appointment",
        ),
        pytest.param(
            "  - id: r\n    states: scheduled\n"
            "    steps: [{after: 1d, do: outreach, template: t}]\n"
            "    before_appointment: [{before: 1d, do: outreach, template: t}]\n",
            "p.yaml:6:25: a ladder has steps (after the state entry) or before_appointment, "
            "not both",
            id="both-lists",
        ),
        pytest.param(
            "  - id: r\n    states: scheduled\n    before_appointment:\n"
            "      - {before: 24h, do: outreach, template: t}\n"
            "      - {before: 72h, do: outreach, template: t}\n",
            "p.yaml:7:18: steps run in order: 3d before comes ahead of the previous step's "
            "1d before",
            id="out-of-order",
        ),
        pytest.param(
            "  - id: r\n    states: scheduled\n    before_appointment:\n"
            "      - {after: 24h, do: outreach, template: t}\n",
            "p.yaml:6:9: a step needs before",
            id="after-in-an-appointment-ladder",
        ),
        pytest.param(
            "  - id: r\n    states: scheduled\n    before_appointment:\n"
            "      - {before: P3D, do: outreach, template: t}\n",
            "p.yaml:6:18: before is written like 14d or 72h: for 'P3D' write 3d",
            id="iso-duration",
        ),
        pytest.param(
            "  - id: r\n    states: scheduled\n    before_appointment: []\n",
            "p.yaml:5:25: a ladder needs at least one step",
            id="empty",
        ),
    ],
)
def test_appointment_ladder_errors(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as caught:
        compile_text(HEAD + text)
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


T0 = datetime(2025, 3, 3, 14, 0, tzinfo=UTC)
START = datetime(2025, 3, 13, 15, 30, tzinfo=UTC)


def booked(start: str | None) -> tuple[Referral, Referral]:
    """(sent, scheduled) projections of one referral."""
    r, _ = fold(None, "r1", LoggedEvent(Event.REFERRAL_CREATED, {}, T0, T0))
    assert r is not None
    r, _ = fold(r, "r1", LoggedEvent(Event.REFERRAL_SENT, {}, T0, T0))
    assert r is not None
    fields = {"appointment_id": "A1", **({"start": start} if start else {})}
    after, _ = fold(r, "r1", LoggedEvent(Event.APPOINTMENT_BOOKED, fields, T0, T0))
    assert after is not None
    return r, after


def test_a_booking_without_a_start_arms_nothing() -> None:
    policy = compile_text(HEAD + REMINDERS)
    before, after = booked(None)
    assert appointment_start(after) is None
    armed = on_transition(policy, after, before.state, after.state, Event.APPOINTMENT_BOOKED, T0)
    assert armed.set == ()


def test_zone_less_start_is_utc_and_junk_is_none() -> None:
    assert appointment_start(booked("2025-03-13T15:30:00")[1]) == START
    assert appointment_start(booked("next tuesday")[1]) is None


def test_a_late_scheduler_never_reminds_after_the_appointment_began() -> None:
    policy = compile_text(HEAD + REMINDERS)
    before, after = booked(START.isoformat())
    armed = on_transition(policy, after, before.state, after.state, Event.APPOINTMENT_BOOKED, T0)
    (first,) = armed.set
    assert first.due_at == START - timedelta(hours=72)
    assert first.entered_at == START
    # On time: it fires and arms the 24-hour step.
    effects, nxt = on_due(policy, after, first, first.due_at)
    assert [e.template for e in effects] == ["appointment_reminder"]
    assert [t.due_at for t in nxt.set] == [START - timedelta(hours=24)]
    # The scheduler was down until the appointment began: nothing, and nothing next.
    assert on_due(policy, after, nxt.set[0], START) == ((), nxt.__class__())
    assert on_due(policy, after, nxt.set[0], START + timedelta(hours=2))[0] == ()


def test_a_step_whose_start_moved_underneath_is_stale() -> None:
    policy = compile_text(HEAD + REMINDERS)
    before, after = booked(START.isoformat())
    (first,) = on_transition(
        policy, after, before.state, after.state, Event.APPOINTMENT_BOOKED, T0
    ).set
    _, moved = booked((START + timedelta(days=2)).isoformat())
    effects, nxt = on_due(policy, moved, first, first.due_at)
    assert effects == ()
    assert nxt.set == ()
