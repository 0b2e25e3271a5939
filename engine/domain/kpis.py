"""Referral KPIs (pure): what a set of referral histories says about the loop.

Theory of operation
-------------------
A :class:`History` is what the event log knows of one referral: when it was created,
its applied events (type and business time, ``occurred_at``; events kept as anomalies
changed nothing and are left out by the reader) and how many worklist items it raised.
The definitions go by events, not by the current state, so the same histories read
with an earlier ``now`` give the numbers as they stood then. :func:`compute` turns
histories and ``now`` into :class:`Kpis`; nothing here reads a clock or a store, so the
daemon's gauges (read from the store by :func:`engine.store.kpis.store_kpis`) and the
simulator (``refloop simulate``) compute the same numbers the same way.

Definitions (an event counts only if it occurred at or before ``now``):

* **loop closed**: the referral has a ``consult_note.received``, ``referral.closed`` or
  ``referral.closed_by_hand`` event. It *closed at* the first of them.
* **mature**: created at least 30 days before ``now`` (``MATURE``).
* ``loop_closure_rate``: mature referrals whose loop closed (by ``now``) / mature
  referrals — the cohort of the ``refloop_loop_closure_ratio`` gauge, so young
  referrals that have had no time to close do not drag the rate down.
* ``open_at_30_days_rate``: mature referrals that 30 days after creation had neither a
  closed loop nor an end (``referral.declined``, ``referral.cancelled``) / mature
  referrals.
* ``median_days_to_close``: the median, over referrals whose loop closed, of the days
  (fractional) from creation to closed-at; ``None`` when none closed.
  ``days_to_close`` holds the quantiles the ``refloop_days_to_close`` gauge exports.
* ``scheduled_within_7_days_rate``: referrals created at least 7 days before ``now``
  whose first ``appointment.booked`` occurred within 7 days of creation / those
  referrals.
* ``no_show_rate``: referrals with at least one ``appointment.no_show`` / referrals with
  at least one ``appointment.booked``.
* ``note_return_rate``: referrals with a completed visit (``appointment.completed``) and
  a ``consult_note.received`` / referrals with a completed visit.
* ``exception_rate``: referrals that raised at least one worklist item / referrals.

A rate whose denominator is empty is 0.0 (the counts beside it say so).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = [
    "CLOSING",
    "ENDING",
    "MATURE",
    "QUANTILES",
    "History",
    "Kpis",
    "compute",
    "quantile",
]

#: Events that close the loop (the first one is when it closed).
CLOSING = frozenset({"consult_note.received", "referral.closed", "referral.closed_by_hand"})
#: Events that end a referral without closing its loop.
ENDING = frozenset({"referral.declined", "referral.cancelled"})
MATURE = timedelta(days=30)
SCHEDULE_WINDOW = timedelta(days=7)
#: The quantiles of days to close the gauge exports ("0.5" is the median).
QUANTILES = (0.5, 0.9)
_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class History:
    """One referral as the KPIs see it; ``events`` are (type, occurred_at) pairs of the
    applied events, in any order."""

    created_at: datetime
    events: Sequence[tuple[str, datetime]] = ()
    exceptions: int = 0  # worklist items raised for it


@dataclass(frozen=True, slots=True)
class Kpis:
    referrals: int = 0
    mature: int = 0  # created at least 30 days before now
    closed: int = 0  # loops closed, any age
    loop_closure_rate: float = 0.0
    open_at_30_days_rate: float = 0.0
    median_days_to_close: float | None = None
    days_to_close: Mapping[float, float] = field(default_factory=dict)  # quantile -> days
    scheduled_within_7_days_rate: float = 0.0
    no_show_rate: float = 0.0
    note_return_rate: float = 0.0
    exception_rate: float = 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (non-empty), interpolated between order
    statistics like numpy's default; ``quantile(v, 0.5)`` is the median."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _rate(n: int, d: int) -> float:
    return n / d if d else 0.0


def _first(events: Iterable[tuple[str, datetime]], types: frozenset[str]) -> datetime | None:
    times = [at for t, at in events if t in types]
    return min(times) if times else None


def compute(histories: Iterable[History], now: datetime) -> Kpis:
    """The KPIs of ``histories`` as of ``now`` (see the module docstring)."""
    total = mature = closed_mature = open_30 = 0
    old_enough_7 = scheduled_7 = booked = no_show = visited = noted = excepted = 0
    days: list[float] = []
    for h in histories:
        if h.created_at > now:
            continue  # not yet created as of now
        total += 1
        events = [(t, at) for t, at in h.events if at <= now]
        types = {t for t, _ in events}
        closed_at = _first(events, CLOSING)
        ended_at = _first(events, ENDING)
        if closed_at is not None:
            days.append(max((closed_at - h.created_at).total_seconds(), 0.0) / _DAY)
        if now - h.created_at >= MATURE:
            mature += 1
            day_30 = h.created_at + MATURE
            if closed_at is not None:
                closed_mature += 1
            if not (
                (closed_at is not None and closed_at <= day_30)
                or (ended_at is not None and ended_at <= day_30)
            ):
                open_30 += 1
        first_booked = _first(events, frozenset({"appointment.booked"}))
        if now - h.created_at >= SCHEDULE_WINDOW:
            old_enough_7 += 1
            if first_booked is not None and first_booked - h.created_at <= SCHEDULE_WINDOW:
                scheduled_7 += 1
        if first_booked is not None:
            booked += 1
            no_show += "appointment.no_show" in types
        if "appointment.completed" in types:
            visited += 1
            noted += "consult_note.received" in types
        excepted += h.exceptions > 0
    return Kpis(
        referrals=total,
        mature=mature,
        closed=len(days),
        loop_closure_rate=_rate(closed_mature, mature),
        open_at_30_days_rate=_rate(open_30, mature),
        median_days_to_close=statistics.median(days) if days else None,
        days_to_close={q: quantile(days, q) for q in QUANTILES} if days else {},
        scheduled_within_7_days_rate=_rate(scheduled_7, old_enough_7),
        no_show_rate=_rate(no_show, booked),
        note_return_rate=_rate(noted, visited),
        exception_rate=_rate(excepted, total),
    )
