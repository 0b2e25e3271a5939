"""Timer decisions: entering and leaving every state, staleness, determinism, precedence
and hand-over, the effects, and a property: whatever happens to a referral, no timer is
left pending for a state it has left, and none fires twice."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import TERMINAL, Event, State
from engine.policy.language import Policy, compile_policy, load_policy
from engine.policy.timers import (
    NOTHING,
    Armed,
    Effect,
    Timer,
    effect_key,
    on_due,
    on_transition,
    timer_id,
)

T0 = datetime(2025, 3, 3, 14, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HEAD = "schema: referral-policy/v1\n"


def policy_of(text: str) -> Policy:
    return compile_policy([("p.yaml", (HEAD + text).encode())])


def referral(
    state: State,
    *,
    sequence: int = 1,
    specialty: str | None = None,
    priority: str | None = None,
    id: str = "r1",
) -> Referral:
    fields = {k: v for k, v in (("specialty", specialty), ("priority", priority)) if v}
    return Referral(id, state, sequence, T0, T0, data={"referral": fields} if fields else {})


def view(timers: tuple[Timer, ...] | list[Timer]) -> list[tuple[str, str, int, datetime]]:
    return [(t.rule, t.kind, t.step, t.due_at) for t in timers]


# ---- every state, entered and left ---------------------------------------------------------

EVERY_STATE = policy_of(
    "windows:\n"
    + "".join(f"  - {{id: w_{s.value}, states: {s.value}, within: 1d}}\n" for s in State)
    + "ladders:\n"
    + "".join(
        f"  - id: l_{s.value}\n    states: {s.value}\n    steps:\n"
        "      - {after: 2d, do: outreach, template: t}\n"
        "      - {after: 3d, do: escalate, reason: r}\n"
        for s in State
    )
)


def elsewhere(state: State) -> State:
    return State.SENT if state is not State.SENT else State.ACCEPTED


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_entering_a_state_arms_its_window_and_the_first_step_of_its_ladder(state: State) -> None:
    before = elsewhere(state)
    entered = on_transition(
        EVERY_STATE, referral(before, sequence=1), None, before, Event.REFERRAL_CREATED, T0
    )
    assert view(entered.set) == [
        (f"w_{before.value}", "window", 0, T0 + DAY),
        (f"l_{before.value}", "outreach", 0, T0 + 2 * DAY),
    ]
    at = T0 + timedelta(hours=5)
    moved = on_transition(
        EVERY_STATE,
        referral(state, sequence=2),
        before,
        state,
        Event.REFERRAL_UPDATED,
        at,
        pending=entered.set,
    )
    assert sorted(moved.clear) == sorted(t.id for t in entered.set)  # leaving clears both
    assert view(moved.set) == [
        (f"w_{state.value}", "window", 0, at + DAY),
        (f"l_{state.value}", "outreach", 0, at + 2 * DAY),
    ]
    assert {t.entry for t in moved.set} == {2}
    assert {t.entered_at for t in moved.set} == {at}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_an_event_that_keeps_the_state_keeps_the_timers(state: State) -> None:
    entered = on_transition(EVERY_STATE, referral(state), None, state, Event.REFERRAL_CREATED, T0)
    again = on_transition(
        EVERY_STATE,
        referral(state, sequence=2),
        state,
        state,
        Event.REFERRAL_UPDATED,
        T0 + DAY,
        pending=entered.set,
    )
    assert again == NOTHING


SHIPPED_LIKE = policy_of(
    "windows:\n"
    "  - {id: unsent, states: created, within: 1d}\n"
    "  - {id: unscheduled, states: [sent, accepted], within: 14d}\n"
    "  - {id: unscheduled_urgent, states: [sent, accepted], priority: [urgent, stat],"
    " within: 3d, level: 2}\n"
    "  - {id: rebook, states: [no_show, appointment_cancelled], within: 7d}\n"
    "  - {id: awaiting_note, states: completed, within: 7d}\n"
    "ladders:\n"
    "  - id: remind\n    states: [sent, accepted]\n    steps:\n"
    "      - {after: 3d, do: outreach, template: remind, prefer: [sms, email]}\n"
    "      - {after: 7d, do: outreach, template: remind}\n"
    "      - {after: 14d, do: worklist, reason: stalled, owner: triage, due: 2d}\n"
    "      - {after: 21d, do: escalate, reason: unscheduled_21d, level: 2}\n"
    "      - {after: 21d, do: notify, to: referrer, route: tell_referrer, reason: late}\n"
    "  - id: remind_urgent\n    ladder: remind\n    states: [sent, accepted]\n"
    "    priority: [urgent, stat]\n    steps:\n"
    "      - {after: 1d, do: outreach, template: urgent}\n"
    "      - {after: 2d, do: outreach, template: urgent}\n"
    "      - {after: 5d, do: escalate, reason: urgent_5d, level: 3}\n"
    "  - id: no_show\n    states: no_show\n    steps:\n"
    "      - {after: 0h, do: outreach, template: reengage}\n"
    "      - {after: 0h, do: notify, to: referrer, route: no_show_notice}\n"
    "  - id: pre_visit\n    states: scheduled\n    restart_on: appointment.rescheduled\n"
    "    steps:\n      - {after: 1d, do: outreach, template: confirm}\n"
    "  - id: note_requests\n    states: completed\n    steps:\n"
    "      - {after: 7d, do: notify, to: specialist, route: note_request}\n"
)


@pytest.mark.parametrize(
    ("state", "want"),
    [
        (State.CREATED, ["unsent"]),
        (State.AUTH_PENDING, []),
        (State.SENT, ["unscheduled", "remind"]),
        (State.ACCEPTED, ["unscheduled", "remind"]),
        (State.SCHEDULED, ["pre_visit"]),
        (State.NO_SHOW, ["rebook", "no_show", "no_show"]),
        (State.APPOINTMENT_CANCELLED, ["rebook"]),
        (State.COMPLETED, ["awaiting_note", "note_requests"]),
        (State.NOTE_RECEIVED, []),
        (State.CLOSED, []),
        (State.DECLINED, []),
        (State.CANCELLED, []),
    ],
    ids=lambda v: v.value if isinstance(v, State) else "",
)
def test_what_each_state_arms_from_scratch(state: State, want: list[str]) -> None:
    """Arrived from nowhere (the rules' states did not hold before): the first timer of
    each selected rule; the no-show ladder's two steps at 0h are armed one at a time."""
    armed = on_transition(
        SHIPPED_LIKE, referral(state), State.AUTH_PENDING, state, Event.REFERRAL_UPDATED, T0
    )
    if state is State.AUTH_PENDING:
        assert armed == NOTHING  # it was already auth_pending
        return
    got = [t.rule for t in armed.set]
    assert got == want[: len(got)]
    assert sorted(set(got)) == sorted(set(want))


def test_moving_between_the_states_of_one_rule_keeps_its_clock() -> None:
    sent = on_transition(
        SHIPPED_LIKE, referral(State.SENT, sequence=2), State.CREATED, State.SENT,
        Event.REFERRAL_SENT, T0,
    )  # fmt: skip
    accepted = on_transition(
        SHIPPED_LIKE,
        referral(State.ACCEPTED, sequence=3),
        State.SENT,
        State.ACCEPTED,
        Event.REFERRAL_ACCEPTED,
        T0 + 2 * DAY,
        pending=sent.set,
    )
    assert accepted == NOTHING
    booked = on_transition(
        SHIPPED_LIKE,
        referral(State.SCHEDULED, sequence=4),
        State.ACCEPTED,
        State.SCHEDULED,
        Event.APPOINTMENT_BOOKED,
        T0 + 4 * DAY,
        pending=sent.set,
    )
    assert sorted(booked.clear) == sorted(t.id for t in sent.set)
    assert view(booked.set) == [("pre_visit", "outreach", 0, T0 + 5 * DAY)]


def test_a_pending_timer_of_a_rule_the_policy_no_longer_has_is_cleared() -> None:
    sent = on_transition(
        SHIPPED_LIKE, referral(State.SENT), None, State.SENT, Event.REFERRAL_SENT, T0
    )
    smaller = policy_of("windows:\n  - {id: unscheduled, states: [sent, accepted], within: 14d}\n")
    again = on_transition(
        smaller,
        referral(State.SENT, sequence=2),
        State.SENT,
        State.SENT,
        Event.REFERRAL_UPDATED,
        T0 + DAY,
        pending=sent.set,
    )
    assert again.clear == tuple(t.id for t in sent.set if t.rule == "remind")
    assert again.set == ()


# ---- restart and hand-over ---------------------------------------------------------------


def test_restart_on_rearms_from_the_event() -> None:
    booked = on_transition(
        SHIPPED_LIKE, referral(State.SCHEDULED, sequence=4), State.SENT, State.SCHEDULED,
        Event.APPOINTMENT_BOOKED, T0,
    )  # fmt: skip
    at = T0 + 3 * DAY
    moved = on_transition(
        SHIPPED_LIKE,
        referral(State.SCHEDULED, sequence=5),
        State.SCHEDULED,
        State.SCHEDULED,
        Event.APPOINTMENT_RESCHEDULED,
        at,
        pending=booked.set,
    )
    assert moved.clear == (booked.set[0].id,)
    assert view(moved.set) == [("pre_visit", "outreach", 0, at + DAY)]
    assert moved.set[0].id != booked.set[0].id  # a new entry: a new id
    # Other events in the same state do not restart it.
    updated = on_transition(
        SHIPPED_LIKE,
        referral(State.SCHEDULED, sequence=6),
        State.SCHEDULED,
        State.SCHEDULED,
        Event.REFERRAL_UPDATED,
        at,
        pending=moved.set,
    )
    assert updated == NOTHING


def test_raising_the_priority_hands_the_clock_to_the_urgent_rules() -> None:
    sent = on_transition(
        SHIPPED_LIKE, referral(State.SENT, sequence=2), State.CREATED, State.SENT,
        Event.REFERRAL_SENT, T0,
    )  # fmt: skip
    at = T0 + DAY + timedelta(hours=6)  # the urgent ladder's day-1 step has passed
    raised = on_transition(
        SHIPPED_LIKE,
        referral(State.SENT, sequence=3, priority="urgent"),
        State.SENT,
        State.SENT,
        Event.REFERRAL_UPDATED,
        at,
        pending=sent.set,
    )
    assert sorted(raised.clear) == sorted(t.id for t in sent.set)
    assert view(raised.set) == [
        ("unscheduled_urgent", "window", 0, T0 + 3 * DAY),  # from the original entry
        ("remind_urgent", "outreach", 1, T0 + 2 * DAY),  # the first step not yet due
    ]
    assert {(t.entry, t.entered_at) for t in raised.set} == {(2, T0)}
    late = on_transition(
        SHIPPED_LIKE,
        referral(State.SENT, sequence=3, priority="urgent"),
        State.SENT,
        State.SENT,
        Event.REFERRAL_UPDATED,
        T0 + 6 * DAY,
        pending=sent.set,
    )
    # A missed window is still a miss (due in the past: it fires at once); a ladder whose
    # steps have all passed has nothing left to say.
    assert view(late.set) == [("unscheduled_urgent", "window", 0, T0 + 3 * DAY)]


def test_a_rule_that_starts_to_apply_mid_state_without_a_predecessor_waits() -> None:
    """Nothing pending tells when the state was entered: the rule starts at the next entry
    (and a finished ladder is not restarted by an unrelated update)."""
    policy = policy_of(
        "windows:\n  - {id: cardio, states: sent, specialty: cardiology, within: 5d}\n"
    )
    got = on_transition(
        policy,
        referral(State.SENT, sequence=3, specialty="cardiology"),
        State.SENT,
        State.SENT,
        Event.REFERRAL_UPDATED,
        T0,
    )
    assert got == NOTHING


# ---- on_due ------------------------------------------------------------------------------


def armed_for(state: State, **kw: Any) -> tuple[Referral, tuple[Timer, ...]]:
    ref = referral(state, sequence=2, **kw)
    return ref, on_transition(SHIPPED_LIKE, ref, State.CREATED, state, Event.REFERRAL_SENT, T0).set


def test_a_window_miss_escalates_and_adds_a_worklist_item() -> None:
    ref, timers = armed_for(State.SENT, priority="urgent")
    window = next(t for t in timers if t.kind == "window")
    effects, more = on_due(SHIPPED_LIKE, ref, window, window.due_at + timedelta(minutes=1))
    assert more == NOTHING
    assert effects == (
        Effect(
            kind="escalate",
            key=effect_key(window.id, 0),
            referral_id="r1",
            rule="unscheduled_urgent",
            at=T0 + 3 * DAY,
            reason="unscheduled_urgent_missed",
            level=2,
        ),
        Effect(
            kind="worklist",
            key=effect_key(window.id, 1),
            referral_id="r1",
            rule="unscheduled_urgent",
            at=T0 + 3 * DAY,
            reason="unscheduled_urgent_missed",
            owner="coordinator",
            due_at=T0 + 3 * DAY,
        ),
    )


def test_a_ladder_walks_its_steps_each_due_from_the_entry() -> None:
    ref, timers = armed_for(State.SENT)
    timer = next(t for t in timers if t.rule == "remind")
    fired: list[Effect] = []
    while True:
        # The scheduler runs late every time: the ladder does not drift.
        effects, more = on_due(SHIPPED_LIKE, ref, timer, timer.due_at + timedelta(hours=7))
        fired.extend(effects)
        if not more.set:
            break
        (timer,) = more.set
    assert [(e.kind, e.at - T0) for e in fired] == [
        ("outreach", 3 * DAY),
        ("outreach", 7 * DAY),
        ("worklist", 14 * DAY),
        ("escalate", 21 * DAY),
        ("notify", 21 * DAY),
    ]
    outreach, _, worklist, escalate, notify = fired
    assert (outreach.template, outreach.prefer) == ("remind", ("sms", "email"))
    assert (worklist.reason, worklist.owner, worklist.due_at) == (
        "stalled",
        "triage",
        T0 + 16 * DAY,
    )
    assert (escalate.reason, escalate.level) == ("unscheduled_21d", 2)
    assert (notify.to, notify.route, notify.reason) == ("referrer", "tell_referrer", "late")
    assert len({e.key for e in fired}) == 5


def test_a_timer_claimed_early_is_handed_back() -> None:
    ref, timers = armed_for(State.SENT)
    assert on_due(SHIPPED_LIKE, ref, timers[0], timers[0].due_at - timedelta(seconds=1)) == (
        (),
        Armed(set=(timers[0],)),
    )


STALE = [
    pytest.param(lambda r: replace(r, state=State.SCHEDULED), SHIPPED_LIKE, id="state-left"),
    pytest.param(lambda r: replace(r, state=State.CANCELLED), SHIPPED_LIKE, id="cancelled"),
    pytest.param(
        lambda r: replace(r, data={"referral": {"priority": "urgent"}}),
        SHIPPED_LIKE,
        id="another-rule-wins",
    ),
    pytest.param(lambda r: r, policy_of("windows: []\n"), id="rule-removed"),
    pytest.param(
        lambda r: r,
        policy_of(
            "ladders:\n  - {id: remind, states: sent, steps: "
            "[{after: 3d, do: escalate, reason: x}]}\n"
        ),
        id="step-rewritten",
    ),
]


@pytest.mark.parametrize(("change", "policy"), STALE)
def test_a_stale_timer_does_nothing(change: Any, policy: Policy) -> None:
    ref, timers = armed_for(State.SENT)
    for timer in timers:
        assert on_due(policy, change(ref), timer, timer.due_at + DAY) == ((), NOTHING)
        assert on_due(SHIPPED_LIKE, ref, timer, timer.due_at)[0] != ()  # the control


def test_a_step_past_the_end_of_a_shortened_ladder_is_stale() -> None:
    ref, timers = armed_for(State.SENT)
    remind = next(t for t in timers if t.rule == "remind")
    beyond = replace(remind, step=9, kind="outreach")
    assert on_due(SHIPPED_LIKE, ref, beyond, beyond.due_at) == ((), NOTHING)


# ---- determinism -------------------------------------------------------------------------

STORY = [
    (Event.REFERRAL_CREATED, 0, {"specialty": "cardiology"}),
    (Event.REFERRAL_SENT, 1, {}),
    (Event.APPOINTMENT_BOOKED, 30, {"appointment_id": {"value": "A1"}}),
    (Event.APPOINTMENT_NO_SHOW, 200, {}),
    (Event.APPOINTMENT_BOOKED, 260, {"appointment_id": {"value": "A2"}}),
    (Event.APPOINTMENT_NO_SHOW, 400, {}),
    (Event.APPOINTMENT_COMPLETED, 500, {}),
]


def test_replaying_the_log_arms_the_same_timers() -> None:
    first, second = Sim(SHIPPED_LIKE), Sim(SHIPPED_LIKE)
    for sim in (first, second):
        for event, hours, fields in STORY:
            sim.event(event, T0 + timedelta(hours=hours), fields)
        sim.advance(T0 + 90 * DAY)
    assert first.armed == second.armed
    assert first.effects == second.effects
    # Each no-show is its own entry: its own timer ids, both ladders fired once each.
    no_shows = [t for t in first.armed if t.rule == "no_show" and t.step == 0]
    assert len(no_shows) == 2
    assert no_shows[0].id != no_shows[1].id
    assert [e.kind for e in first.effects if e.rule == "no_show"] == ["outreach", "notify"] * 2
    assert no_shows[0].id == timer_id("r1", "no_show", 4, 0)


def test_timer_ids_derive_from_referral_rule_entry_and_step() -> None:
    ids = {
        timer_id("r1", "remind", 2, 0),
        timer_id("r2", "remind", 2, 0),
        timer_id("r1", "remind_urgent", 2, 0),
        timer_id("r1", "remind", 3, 0),
        timer_id("r1", "remind", 2, 1),
    }
    assert len(ids) == 5
    assert timer_id("r1", "remind", 2, 0) == timer_id("r1", "remind", 2, 0)
    args = (SHIPPED_LIKE, referral(State.SENT), None, State.SENT, Event.REFERRAL_SENT, T0)
    assert on_transition(*args) == on_transition(*args)


# ---- the property ----------------------------------------------------------------------------


@dataclass
class Sim:
    """The shell in miniature: a timer table keyed by id, a scheduler that never sleeps."""

    policy: Policy
    referral: Referral | None = None
    pending: dict[str, Timer] = field(default_factory=dict)
    armed: list[Timer] = field(default_factory=list)
    cleared: set[str] = field(default_factory=set)
    fired: set[str] = field(default_factory=set)
    effects: list[Effect] = field(default_factory=list)

    def apply(self, change: Armed) -> None:
        assert set(change.clear) <= set(self.pending), "clears only what is pending"
        for ident in change.clear:
            del self.pending[ident]
            self.cleared.add(ident)
        for timer in change.set:
            assert timer.id not in self.fired | self.cleared, "an id is never reused"
            assert timer.id not in self.pending
            self.pending[timer.id] = timer
            self.armed.append(timer)

    def advance(self, until: datetime) -> None:
        while self.referral is not None:
            due = sorted((t for t in self.pending.values() if t.due_at <= until),
                         key=lambda t: (t.due_at, t.id))  # fmt: skip
            if not due:
                return
            timer = self.pending.pop(due[0].id)
            self.fired.add(timer.id)
            ref = self.referral
            effects, change = on_due(self.policy, ref, timer, timer.due_at)
            if effects:  # only a rule that still applies acts
                live = self.policy.select(ref.state, ref.specialty, ref.priority)
                assert timer.rule in {r.id for r in live}
            self.effects.extend(effects)
            self.apply(change)

    def event(self, type: Event, at: datetime, fields: dict[str, Any]) -> None:
        self.advance(at)
        before = self.referral.state if self.referral else None
        self.referral, step = fold(self.referral, "r1", LoggedEvent(type, fields, at, at))
        if self.referral is None or step.state_after is None:
            return
        self.apply(
            on_transition(
                self.policy,
                self.referral,
                before,
                step.state_after,
                type,
                at,
                pending=tuple(self.pending.values()),
            )
        )
        self.check()

    def check(self) -> None:
        """No timer is pending for a state the referral has left, or for a rule that no
        longer wins; one pending timer per rule."""
        ref = self.referral
        assert ref is not None
        live = {r.id for r in self.policy.select(ref.state, ref.specialty, ref.priority)}
        rules = [t.rule for t in self.pending.values()]
        assert set(rules) <= live, (ref.state, rules)
        assert len(rules) == len(set(rules))


EVENTS = st.sampled_from(list(Event))
PRIORITY = st.sampled_from([None, "routine", "urgent", "stat"])
STEP = st.tuples(EVENTS, st.integers(min_value=0, max_value=24 * 30), PRIORITY)


SHIPPED = load_policy(Path(__file__).resolve().parents[2] / "mappings")


@pytest.mark.parametrize("policy", [SHIPPED_LIKE, SHIPPED], ids=["test-policy", "shipped"])
@settings(max_examples=300, deadline=None)
@given(
    first=PRIORITY,
    steps=st.lists(STEP, max_size=25),
)
def test_no_timer_outlives_its_state_and_none_fires_twice(
    policy: Policy, first: str | None, steps: list[tuple[Event, int, str | None]]
) -> None:
    assert policy.rules()
    sim = Sim(policy)
    at = T0
    sim.event(Event.REFERRAL_CREATED, at, {"priority": first} if first else {})
    for event, gap, priority in steps:
        at += timedelta(hours=gap)
        fields: dict[str, Any] = {}
        if event is Event.REFERRAL_UPDATED and priority:
            fields["priority"] = priority
        if event in (Event.APPOINTMENT_BOOKED, Event.APPOINTMENT_RESCHEDULED):
            fields["appointment_id"] = {"value": f"A{len(sim.armed)}"}
        sim.event(event, at, fields)
    sim.advance(at + 3650 * DAY)
    assert sim.referral is not None
    # Every armed timer ended one way: cleared by a transition, or fired (maybe stale).
    assert {t.id for t in sim.armed} == sim.cleared | sim.fired
    assert not sim.cleared & sim.fired
    assert sim.pending == {}
    # Effects came only from rules that applied when they fired, once per timer step.
    assert len({e.key for e in sim.effects}) == len(sim.effects)
    if sim.referral.state in TERMINAL:
        assert all(e.at <= at for e in sim.effects)
