"""Which referral a message belongs to (pure, ranked; STANDARDS §7).

Identifiers are compared as (kind, value, assigner) — never bare strings: ``889342``
from one EHR is not ``889342`` from another. Rules are tried in order of trust:

1. referral id (RF1-6 / RF1-11 / ServiceRequest.identifier)
2. placer order number (ORC-2, OBR-2, SCH-26, TXA-14, identifier[PLAC])
3. filler order number (ORC-3, OBR-3, SCH-27, TXA-15, identifier[FILL]), once learned
4. placer / filler appointment id (SCH-1 / SCH-2), linked when the booking was seen
5. the heuristic: same patient, same specialty, an open referral created before the
   event and within a date window — auto-linked only when exactly one candidate
   qualifies, and always flagged low confidence for a coordinator to review

The first rule that names exactly one referral wins. Two referrals for one key is a
conflict (reported, never guessed); no match means the message is parked until a
referral appears. The caller supplies the index; this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum


class KeyKind(StrEnum):
    REFERRAL_ID = "referral_id"
    PLACER_ORDER = "placer_order"
    FILLER_ORDER = "filler_order"
    APPOINTMENT = "appointment"


#: Precedence and the confidence a match by that rule carries.
RULES: tuple[tuple[KeyKind, float], ...] = (
    (KeyKind.REFERRAL_ID, 1.0),
    (KeyKind.PLACER_ORDER, 0.99),
    (KeyKind.FILLER_ORDER, 0.98),
    (KeyKind.APPOINTMENT, 0.95),
)
HEURISTIC_CONFIDENCE = 0.6


@dataclass(frozen=True, slots=True)
class Key:
    kind: KeyKind
    value: str
    assigner: str = ""  # namespace id or universal id (EI.2 / EI.3); "" when not sent

    def normalised(self) -> Key:
        # Identifiers are case-sensitive; surrounding spaces from fixed-width feeds are not.
        return Key(self.kind, self.value.strip(), self.assigner.strip().upper())


@dataclass(frozen=True, slots=True)
class Clues:
    """What an incoming event offers for correlation."""

    keys: tuple[Key, ...] = ()
    patient: str = ""  # PID-3 value with its assigning authority, e.g. "12345^HOSP"
    specialty: str = ""
    occurred_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class OpenReferral:
    referral_id: str
    patient: str
    specialty: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Match:
    referral_id: str | None  # None: unmatched (park) or conflict (review)
    method: str  # a KeyKind value, "heuristic", "conflict" or "none"
    confidence: float
    candidates: tuple[str, ...] = field(default=())

    @property
    def needs_review(self) -> bool:
        return self.referral_id is None or self.confidence < 0.9


def correlate(
    clues: Clues,
    index: Mapping[Key, frozenset[str]],
    open_referrals: Iterable[OpenReferral] = (),
    *,
    window: timedelta = timedelta(days=180),
) -> Match:
    """Rank the rules and return the first decisive answer."""
    for kind, confidence in RULES:
        found: set[str] = set()
        for key in clues.keys:
            if key.kind is kind:
                found |= _lookup(index, key)
        if len(found) == 1:
            return Match(next(iter(found)), kind.value, confidence)
        if len(found) > 1:
            return Match(None, "conflict", 0.0, tuple(sorted(found)))
    return _heuristic(clues, open_referrals, window)


def _lookup(index: Mapping[Key, frozenset[str]], key: Key) -> frozenset[str]:
    key = key.normalised()
    exact = index.get(key)
    if exact is not None:
        return exact
    if key.assigner:
        return frozenset()  # an assigner that was sent must match
    # No assigner sent: accept the value only if exactly one assigner uses it.
    matches = [ids for k, ids in index.items() if k.kind is key.kind and k.value == key.value]
    return matches[0] if len(matches) == 1 else frozenset()


def _heuristic(clues: Clues, open_referrals: Iterable[OpenReferral], window: timedelta) -> Match:
    if not (clues.patient and clues.specialty and clues.occurred_at):
        return Match(None, "none", 0.0)
    when = clues.occurred_at
    candidates = sorted(
        r.referral_id
        for r in open_referrals
        if r.patient == clues.patient
        and r.specialty.casefold() == clues.specialty.casefold()
        and r.created_at <= when <= r.created_at + window
    )
    if len(candidates) == 1:
        return Match(candidates[0], "heuristic", HEURISTIC_CONFIDENCE, tuple(candidates))
    return Match(None, "none" if not candidates else "conflict", 0.0, tuple(candidates))


def index_keys(referrals: Mapping[str, Iterable[Key]]) -> dict[Key, frozenset[str]]:
    """Build the lookup index from each referral's known keys."""
    out: dict[Key, set[str]] = {}
    for referral_id, keys in referrals.items():
        for key in keys:
            out.setdefault(key.normalised(), set()).add(referral_id)
    return {k: frozenset(v) for k, v in out.items()}
