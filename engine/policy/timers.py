"""Timer decisions (pure): what a state change arms and clears, and what a due timer does.

Theory of operation
-------------------
The shell keeps timers durably and calls two functions, never reading a clock itself:

* :func:`on_transition` — in the transaction that applies an event, with the referral as
  folded and the referral's **pending** timers. For every family (windows, each ladder)
  the policy selects at most one rule for the new state (:meth:`Policy.select`):

  - a pending timer whose rule is no longer selected is **cleared** (the referral left
    its states, or it changed priority so another rule now wins);
  - a selected rule the referral has just **entered** (its states did not hold the state
    before, or the event is one of its ``restart_on``) is **armed**: a window's deadline,
    a ladder's first step, counted from ``at``;
  - a selected rule that takes over a family mid-state (priority raised while ``sent``)
    keeps the entry of the timer it replaces: a window is due from the original entry
    (already past: it fires at once), a ladder resumes at its first step not yet due;
  - anything else (still in the same states, rule unchanged) is left alone.

* :func:`on_due` — when the scheduler has claimed a due timer. A timer whose rule, step or
  state no longer applies is **stale** and does nothing: a timer the transaction forgot
  to clear, or one claimed in a race with the transition, never acts on a referral that
  moved on. Otherwise a window miss escalates and adds a worklist item; a ladder step
  does its one thing and arms the next step (due from the entry, so a late scheduler does
  not push the ladder back; after an outage the missed steps fire in order, each once).

An **appointment ladder** (``before_appointment:``) counts back from the projection's
``appointment.start``; its timers keep that start as their anchor (``entered_at``).
Entering ``scheduled`` arms its first step not yet due (booked 20 hours ahead: the 72 h
and 24 h reminders are both past, nothing is armed); an event that leaves the
appointment at another start — a reschedule, a second booking — clears the pending
step and re-arms from the new start, whatever the ladder's ``restart_on`` says. A step
whose anchor is no longer the appointment's start, or that comes due once the
appointment has begun (the scheduler was down), is stale and does nothing.

Identifiers are deterministic: a timer's id is a UUID 5 of the referral, the rule, the
sequence number of the event that entered the state and the step, so replaying the event
log arms the same ids and a timer store keyed by id fires each once. An effect's key is
the timer id and its position, for the same reason downstream (event ids, outbox keys).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.domain.projection import Referral
from engine.domain.referral import Event, State
from engine.policy.language import APPOINTMENT, Ladder, Policy, Rule, Step, Window

__all__ = [
    "NAMESPACE",
    "NOTHING",
    "Armed",
    "Effect",
    "Timer",
    "appointment_start",
    "effect_key",
    "on_due",
    "on_transition",
    "timer_id",
]

#: Fixed forever: changing it would re-key (and so re-fire) every replayed timer.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://refloop.dev/policy/timer")
WINDOW = "window"


def timer_id(referral_id: str, rule: str, entry: int, step: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{referral_id}/{rule}/{entry}/{step}"))


def effect_key(timer: str, index: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{timer}/effect/{index}"))


@dataclass(frozen=True)
class Timer:
    id: str
    referral_id: str
    rule: str
    kind: str  # window | outreach | worklist | escalate | notify
    due_at: datetime
    step: int  # 0 for a window; the step's position in its ladder
    entry: int  # sequence number of the event that entered the rule's states
    # When it did: every step of a ladder counts from here. For an appointment ladder,
    # the appointment's start the steps count back from.
    entered_at: datetime


@dataclass(frozen=True)
class Armed:
    set: tuple[Timer, ...] = ()
    clear: tuple[str, ...] = ()  # ids of pending timers to cancel


NOTHING = Armed()


@dataclass(frozen=True)
class Effect:
    """What a due timer asks the shell to do; configuration only, never patient data.

    ``escalate``: append ``referral.escalated`` (reason, level). ``worklist``: an item for
    ``owner``, due at ``due_at``. ``outreach``: a patient reminder with ``template``,
    trying ``prefer`` in order. ``notify``: a delivery ``to`` the referrer or the
    specialist through outbound route ``route``."""

    kind: str  # escalate | worklist | outreach | notify
    key: str  # deterministic: the timer id and this effect's position
    referral_id: str
    rule: str
    at: datetime  # when the rule came due (business time of the effect)
    reason: str = ""
    level: int = 0
    owner: str = ""
    due_at: datetime | None = None
    template: str = ""
    prefer: tuple[str, ...] = ()
    to: str = ""
    route: str = ""


def on_transition(
    policy: Policy,
    referral: Referral,
    before: State | None,
    after: State,
    event_type: Event,
    at: datetime,
    *,
    pending: Collection[Timer] = (),
) -> Armed:
    """The timers an applied event arms and clears. ``referral`` is the projection after
    the event (its ``sequence`` is the event's); ``pending`` are the referral's timers not
    yet fired or cleared."""
    selected = {r.family: r for r in _select(policy, referral, after)}
    start = appointment_start(referral)
    clear: list[str] = []
    kept: set[str] = set()  # rule ids with a pending timer that stays
    moved: set[str] = set()  # appointment ladders whose start moved: armed afresh
    replaced: dict[str, Timer] = {}  # family → a cleared timer another rule takes over
    for timer in sorted(pending, key=lambda t: (t.due_at, t.id)):
        rule = policy.rule(timer.rule)
        if rule is None or selected.get(rule.family) is not rule:
            clear.append(timer.id)
            if rule is not None and rule.family in selected:
                replaced.setdefault(rule.family, timer)
        elif event_type in rule.scope.restart_on:
            clear.append(timer.id)
        elif _counts_back(rule) and timer.entered_at != start:
            clear.append(timer.id)
            moved.add(rule.id)
        else:
            kept.add(rule.id)
    armed: list[Timer] = []
    for family, rule in selected.items():
        if rule.id in kept:
            continue
        anchor = start if _counts_back(rule) else at
        entering = before is None or before not in rule.scope.states
        if entering or event_type in rule.scope.restart_on or rule.id in moved:
            if anchor is not None:
                armed.extend(_first(rule, referral.id, referral.sequence, anchor, at))
        elif family in replaced:
            old = replaced[family]
            anchor = start if _counts_back(rule) else old.entered_at
            if anchor is not None:
                armed.extend(_first(rule, referral.id, old.entry, anchor, at))
    return Armed(tuple(armed), tuple(clear))


def on_due(
    policy: Policy, referral: Referral, timer: Timer, now: datetime
) -> tuple[tuple[Effect, ...], Armed]:
    """What a claimed timer does at ``now``: its effects and the ladder's next step. A
    timer claimed before it is due is handed back unchanged (``set`` holds it again)."""
    if now < timer.due_at:
        return (), Armed(set=(timer,))
    rule = policy.rule(timer.rule)
    if rule is None or all(r.id != rule.id for r in _select(policy, referral, referral.state)):
        return (), NOTHING  # stale: the referral moved on, or the policy did
    if isinstance(rule, Window):
        if timer.kind != WINDOW:
            return (), NOTHING
        return _missed(rule, referral, timer), NOTHING
    if timer.step >= len(rule.steps) or rule.steps[timer.step].do != timer.kind:
        return (), NOTHING  # the ladder was rewritten since this timer was armed
    if _counts_back(rule) and (
        timer.entered_at != appointment_start(referral) or now >= timer.entered_at
    ):
        return (), NOTHING  # another appointment time, or this one has begun
    effect = _effect(rule.steps[timer.step], rule, referral, timer)
    following = timer.step + 1
    if following >= len(rule.steps):
        return (effect,), NOTHING
    step = _timer(rule, referral.id, following, timer.entry, timer.entered_at)
    return (effect,), Armed(set=(step,))


def appointment_start(referral: Referral) -> datetime | None:
    """The booked appointment's start (aware; a zone-less time is taken as UTC), when the
    projection has one that reads as ISO 8601."""
    raw = referral.data.get("appointment", {}).get("start")
    if not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _counts_back(rule: Rule) -> bool:
    return isinstance(rule, Ladder) and rule.anchor == APPOINTMENT


def _select(policy: Policy, referral: Referral, state: State) -> tuple[Rule, ...]:
    return policy.select(state, referral.specialty, referral.priority)


def _timer(rule: Rule, referral_id: str, step: int, entry: int, entered_at: datetime) -> Timer:
    if isinstance(rule, Window):
        kind, offset = WINDOW, rule.within
    else:
        kind, offset = rule.steps[step].do, rule.steps[step].after
    return Timer(
        id=timer_id(referral_id, rule.id, entry, step),
        referral_id=referral_id,
        rule=rule.id,
        kind=kind,
        due_at=entered_at + offset,
        step=step,
        entry=entry,
        entered_at=entered_at,
    )


def _first(
    rule: Rule, referral_id: str, entry: int, entered_at: datetime, at: datetime
) -> list[Timer]:
    """The first timer of ``rule`` for an entry at ``entered_at`` (an appointment
    ladder: its start), decided at ``at``.

    A window is armed even when already past (a miss is a miss). A ladder taking over
    mid-state starts at its first step not yet due: the moment of the others has gone, and
    a burst of reminders helps no one; when every step is past, nothing is armed."""
    if isinstance(rule, Window):
        return [_timer(rule, referral_id, 0, entry, entered_at)]
    for index, step in enumerate(rule.steps):
        if entered_at + step.after >= at:
            return [_timer(rule, referral_id, index, entry, entered_at)]
    return []


def _missed(window: Window, referral: Referral, timer: Timer) -> tuple[Effect, ...]:
    return (
        Effect(
            kind="escalate",
            key=effect_key(timer.id, 0),
            referral_id=referral.id,
            rule=window.id,
            at=timer.due_at,
            reason=window.reason,
            level=window.level,
        ),
        Effect(
            kind="worklist",
            key=effect_key(timer.id, 1),
            referral_id=referral.id,
            rule=window.id,
            at=timer.due_at,
            reason=window.reason,
            owner=window.owner,
            due_at=timer.due_at + window.due,
        ),
    )


def _effect(step: Step, ladder: Ladder, referral: Referral, timer: Timer) -> Effect:
    due = timer.due_at + step.due if step.do == "worklist" else None
    return Effect(
        kind=step.do,
        key=effect_key(timer.id, 0),
        referral_id=referral.id,
        rule=ladder.id,
        at=timer.due_at,
        reason=step.reason,
        level=step.level,
        owner=step.owner,
        due_at=due,
        template=step.template,
        prefer=step.prefer,
        to=step.to,
        route=step.route,
    )
