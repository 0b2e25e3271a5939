"""A referral's projection: what the event log says about it now (pure).

Theory of operation
-------------------
The event log is the truth; the ``referrals`` table is a cache of :func:`fold` over a
referral's events in sequence order. The normaliser folds each new event into the
stored projection as it appends it; ``refloop referrals rebuild`` folds the whole log
from nothing. Both call this one function, so they cannot disagree.

Folding an event

* moves the state by :func:`engine.domain.referral.decide` — an event the table does not
  allow is an anomaly: recorded on the step, the state left alone, never raised;
* merges the event's fields into its group (``referral``, ``authorization``,
  ``appointment``, ``consult_note``: an appointment's ``status`` must not overwrite the
  order's), where :data:`~engine.domain.events.CLEAR` erases a field and an absent field
  leaves it as it was;
* flags the referral for review when the event was linked with low confidence.

Fields arrive as JSON-decoded data (the same shape the log stores), so a live fold and a
rebuild see identical input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.domain.events import CLEAR
from engine.domain.referral import Event, State, decide

#: Below this correlation confidence a referral goes on the review worklist.
REVIEW_BELOW = 0.9


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event as the log holds it: the fold's only input."""

    type: Event
    fields: Mapping[str, Any]
    occurred_at: datetime  # business time (ORC-9, SCH start …), else when it was received
    recorded_at: datetime  # when the engine appended it
    confidence: float = 1.0


@dataclass(frozen=True, slots=True)
class Step:
    """What one event did, as recorded beside it in the log."""

    sequence: int
    state_before: State | None
    state_after: State | None
    anomaly: str | None


@dataclass(frozen=True, slots=True)
class Referral:
    id: str
    state: State
    sequence: int  # the last event's sequence number
    created_at: datetime
    updated_at: datetime
    needs_review: bool = False
    data: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def value(self, name: str, *, prefer: str = "referral") -> Any:
        """A merged field, from the ``prefer`` group first, then any other group."""
        groups = [prefer, *(g for g in sorted(self.data) if g != prefer)]
        for group in groups:
            found = self.data.get(group, {}).get(name)
            if found is not None:
                return found
        return None

    def _identifier(self, name: str) -> tuple[str, str] | None:
        found = self.value(name)
        if isinstance(found, Mapping) and found.get("value"):
            return str(found["value"]), str(found.get("namespace") or "")
        return None

    @property
    def placer_order(self) -> tuple[str, str] | None:
        """(value, assigner) of the placer order number, when known."""
        return self._identifier("correlate.placer_order")

    @property
    def referral_number(self) -> str | None:
        found = self._identifier("correlate.referral_id")
        return found[0] if found else None

    @property
    def specialty(self) -> str | None:
        return _text(self.value("specialty"))

    @property
    def priority(self) -> str | None:
        return _text(self.value("priority"))

    @property
    def patient_key(self) -> str | None:
        """``value^assigner`` of the patient identifier: what the heuristic compares."""
        found = self._identifier("patient.identifier")
        return f"{found[0]}^{found[1]}" if found else None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value.get("code"):
        return str(value["code"])
    return None


def group_of(event: Event) -> str:
    """``appointment.booked`` → ``appointment``: where the event's fields are merged."""
    return event.value.split(".", 1)[0]


def merge(data: Mapping[str, Mapping[str, Any]], event: LoggedEvent) -> dict[str, dict[str, Any]]:
    out = {group: dict(values) for group, values in data.items()}
    target = out.setdefault(group_of(event.type), {})
    for name, value in event.fields.items():
        if value == CLEAR:
            target.pop(name, None)
        else:
            target[name] = value
    if not target:
        del out[group_of(event.type)]
    return out


def fold(
    referral: Referral | None, referral_id: str, event: LoggedEvent
) -> tuple[Referral | None, Step]:
    """Apply one event. Returns the new projection (None while no referral exists: only
    ``referral.created`` starts one) and the step to record beside the event."""
    before = referral.state if referral else None
    decision = decide(before, event.type)
    sequence = (referral.sequence if referral else 0) + 1
    step = Step(sequence, before, decision.state, decision.anomaly)
    if decision.state is None:
        return None, step
    low = event.confidence < REVIEW_BELOW
    if referral is None:
        return (
            Referral(
                id=referral_id,
                state=decision.state,
                sequence=sequence,
                created_at=event.occurred_at,
                updated_at=event.recorded_at,
                needs_review=low,
                data=merge({}, event),
            ),
            step,
        )
    return (
        Referral(
            id=referral.id,
            state=decision.state,
            sequence=sequence,
            created_at=referral.created_at,
            updated_at=max(referral.updated_at, event.recorded_at),
            needs_review=referral.needs_review or low,
            data=merge(referral.data, event),
        ),
        step,
    )


def replay(referral_id: str, events: list[LoggedEvent]) -> tuple[Referral | None, list[Step]]:
    """Fold a referral's whole log, in sequence order, from nothing."""
    referral: Referral | None = None
    steps: list[Step] = []
    for event in events:
        referral, step = fold(referral, referral_id, event)
        steps.append(step)
    return referral, steps
