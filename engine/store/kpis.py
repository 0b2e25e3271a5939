"""Referral KPIs from the store: the histories :func:`engine.domain.kpis.compute` reads.

Two queries, whatever the number of referrals: every referral with its applied events
of the types the KPIs look at (a LEFT JOIN, so a referral with none still counts), and
the number of worklist items per referral. Events kept as anomalies changed nothing and
are left out; so are events of other types (deliveries, escalations, outreach), which
are most of a busy log. The daemon's KPI gauges and ``refloop simulate`` both call
:func:`store_kpis`.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import Engine, func, select

from engine.domain.kpis import CLOSING, ENDING, History, Kpis, compute
from engine.store.schema import referral_events, referrals, worklist_items

__all__ = ["KPI_EVENTS", "histories", "store_kpis"]

#: The event types the KPI definitions read.
KPI_EVENTS = sorted(
    CLOSING | ENDING | {"appointment.booked", "appointment.no_show", "appointment.completed"}
)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def histories(engine: Engine) -> list[History]:
    """Every referral's KPI history, from the log."""
    events = (
        select(
            referrals.c.id,
            referrals.c.created_at,
            referral_events.c.type,
            referral_events.c.occurred_at,
            referral_events.c.recorded_at,
        )
        .select_from(
            referrals.outerjoin(
                referral_events,
                (referral_events.c.referral_id == referrals.c.id)
                & referral_events.c.type.in_(KPI_EVENTS)
                & referral_events.c.anomaly.is_(None),
            )
        )
        .order_by(referrals.c.id)
    )
    items = (
        select(worklist_items.c.referral_id, func.count())
        .where(worklist_items.c.referral_id.is_not(None))
        .group_by(worklist_items.c.referral_id)
    )
    created: dict[str, datetime] = {}
    found: dict[str, list[tuple[str, datetime]]] = {}
    with engine.connect() as conn:
        for rid, created_at, type_, occurred_at, recorded_at in conn.execute(events):
            created.setdefault(rid, _utc(created_at))
            bucket = found.setdefault(rid, [])
            if type_ is not None:
                # An event without a business time happened when it was recorded.
                bucket.append((type_, _utc(occurred_at or recorded_at)))
        counts: Counter[str] = Counter({rid: int(n) for rid, n in conn.execute(items)})
    return [History(created[rid], found[rid], counts[rid]) for rid in created]


def store_kpis(engine: Engine, now: datetime) -> Kpis:
    """The KPIs of every referral in the store, as of ``now``."""
    return compute(histories(engine), now)
