"""The referral KPIs on hand-built histories: each definition, with its edge cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.domain.kpis import History, Kpis, compute, quantile

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def day(n: float) -> datetime:
    """``n`` days before NOW."""
    return NOW - timedelta(days=n)


def h(created_days_ago: float, *events: tuple[str, float], exceptions: int = 0) -> History:
    """A history created ``created_days_ago`` days before NOW; event times in days after
    creation."""
    created = day(created_days_ago)
    return History(created, [(t, created + timedelta(days=d)) for t, d in events], exceptions)


def test_no_referrals_gives_zero_rates_and_no_median() -> None:
    k = compute([], NOW)
    assert k == Kpis()
    assert k.median_days_to_close is None
    assert k.days_to_close == {}


def test_loop_closure_counts_notes_and_closes_among_referrals_30_days_old() -> None:
    k = compute(
        [
            h(40, ("consult_note.received", 10)),
            h(40, ("referral.closed", 35)),  # closed after day 30 still closed the loop
            h(40, ("referral.closed_by_hand", 5)),
            h(40, ("appointment.completed", 10)),  # a visit without a note is open
            h(10, ("consult_note.received", 2)),  # too young for the cohort
        ],
        NOW,
    )
    assert (k.referrals, k.mature, k.closed) == (5, 4, 4)
    assert k.loop_closure_rate == pytest.approx(3 / 4)


def test_exactly_30_days_old_is_in_the_cohort_a_second_younger_is_not() -> None:
    exactly = History(NOW - timedelta(days=30), [])
    younger = History(NOW - timedelta(days=30) + timedelta(seconds=1), [])
    assert compute([exactly], NOW).mature == 1
    assert compute([younger], NOW).mature == 0


def test_open_at_30_days_looks_at_day_30_not_at_now() -> None:
    k = compute(
        [
            h(60, ("consult_note.received", 29)),  # closed by day 30
            h(60, ("consult_note.received", 31)),  # closed, but after day 30: open at 30
            h(60, ("referral.declined", 3)),  # ended: not open
            h(60, ("referral.cancelled", 30)),  # ended exactly on day 30: not open
            h(60),  # never moved
        ],
        NOW,
    )
    assert k.mature == 5
    assert k.open_at_30_days_rate == pytest.approx(2 / 5)
    assert k.loop_closure_rate == pytest.approx(2 / 5)


def test_days_to_close_from_creation_to_the_first_closing_event() -> None:
    k = compute(
        [
            h(50, ("consult_note.received", 4), ("referral.closed", 9)),  # 4, not 9
            h(50, ("referral.closed", 10)),
            h(50, ("consult_note.received", 20)),
            h(50, ("appointment.booked", 1)),  # not closed: not in the median
        ],
        NOW,
    )
    assert k.median_days_to_close == pytest.approx(10)
    assert k.days_to_close[0.5] == pytest.approx(10)
    assert k.days_to_close[0.9] == pytest.approx(10 + 0.8 * 10)


def test_events_after_now_are_not_counted_yet() -> None:
    created = NOW - timedelta(days=40)
    future = History(created, [("consult_note.received", NOW + timedelta(hours=1))])
    not_yet_created = History(NOW + timedelta(days=1), [])
    k = compute([future, not_yet_created], NOW)
    assert (k.referrals, k.closed, k.loop_closure_rate) == (1, 0, 0.0)
    # The same history read an hour later has closed.
    assert compute([future], NOW + timedelta(hours=2)).closed == 1


def test_scheduled_within_7_days_uses_the_first_booking_and_referrals_7_days_old() -> None:
    k = compute(
        [
            h(20, ("appointment.booked", 7)),  # exactly 7 days: within
            h(20, ("appointment.booked", 8), ("appointment.booked", 2)),  # first one counts
            h(20, ("appointment.booked", 7.5)),
            h(20),
            h(3, ("appointment.booked", 1)),  # too young to judge
        ],
        NOW,
    )
    assert k.scheduled_within_7_days_rate == pytest.approx(2 / 4)


def test_no_show_rate_is_per_referral_with_an_appointment() -> None:
    k = compute(
        [
            h(
                20,
                ("appointment.booked", 1),
                ("appointment.no_show", 5),
                ("appointment.no_show", 9),
            ),
            h(20, ("appointment.booked", 1), ("appointment.completed", 5)),
            h(20),  # never booked: not in the denominator
        ],
        NOW,
    )
    assert k.no_show_rate == pytest.approx(1 / 2)


def test_note_return_rate_is_notes_over_completed_visits() -> None:
    k = compute(
        [
            h(20, ("appointment.completed", 5), ("consult_note.received", 7)),
            h(20, ("appointment.completed", 5)),
            h(20, ("consult_note.received", 5)),  # a note without a visit: not counted
        ],
        NOW,
    )
    assert k.note_return_rate == pytest.approx(1 / 2)


def test_exception_rate_counts_referrals_with_any_worklist_item() -> None:
    k = compute([h(5, exceptions=3), h(5, exceptions=1), h(5), h(5)], NOW)
    assert k.exception_rate == pytest.approx(2 / 4)


def test_quantile_interpolates_between_order_statistics() -> None:
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert quantile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
