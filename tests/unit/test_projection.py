"""The projection fold: state by the state machine, fields merged by group, anomalies kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from engine.domain.events import CLEAR
from engine.domain.projection import LoggedEvent, Referral, fold, replay
from engine.domain.referral import Event, State, decide

E, S = Event, State
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
PLACER = {"value": "REF-1", "namespace": "ACME"}
PATIENT = {"value": "123456", "namespace": "ACME", "type": "MR"}


def ev(kind: Event, minutes: int = 0, confidence: float = 1.0, **fields: object) -> LoggedEvent:
    at = T0 + timedelta(minutes=minutes)
    return LoggedEvent(kind, fields, occurred_at=at, recorded_at=at, confidence=confidence)


def created(**extra: object) -> Referral:
    referral, _ = fold(
        None,
        "R1",
        ev(
            E.REFERRAL_CREATED,
            **{
                "correlate.placer_order": PLACER,
                "patient.identifier": PATIENT,
                "specialty": "cardiology",
                "priority": "routine",
                "status": "active",
                **extra,
            },
        ),
    )
    assert referral is not None
    return referral


def test_created_starts_a_referral_with_its_fields_and_derived_columns():
    r = created(**{"correlate.referral_id": {"value": "RF-9"}})
    assert (r.id, r.state, r.sequence) == ("R1", S.CREATED, 1)
    assert r.created_at == r.updated_at == T0
    assert r.placer_order == ("REF-1", "ACME")
    assert r.referral_number == "RF-9"
    assert (r.specialty, r.priority, r.patient_key) == ("cardiology", "routine", "123456^ACME")
    assert not r.needs_review


def test_the_step_records_before_after_and_sequence():
    r = created()
    r2, step = fold(r, "R1", ev(E.APPOINTMENT_BOOKED, 5, appointment_id={"value": "A1"}))
    assert r2 is not None
    assert (step.sequence, step.state_before, step.state_after, step.anomaly) == (
        2,
        S.CREATED,
        S.SCHEDULED,
        None,
    )
    assert (r2.sequence, r2.state, r2.updated_at) == (2, S.SCHEDULED, T0 + timedelta(minutes=5))
    assert r2.created_at == T0


def test_fields_merge_by_group_later_values_win_clear_erases_absent_keeps():
    r = created(note="see within 2 weeks")
    r, _ = fold(r, "R1", ev(E.REFERRAL_UPDATED, 1, priority="urgent", note=CLEAR))
    assert r is not None
    assert r.data["referral"]["priority"] == "urgent"
    assert "note" not in r.data["referral"]
    assert r.data["referral"]["specialty"] == "cardiology"  # absent: kept
    # An appointment's status lands in its own group, not over the order's.
    r, _ = fold(r, "R1", ev(E.APPOINTMENT_BOOKED, 2, status="booked"))
    assert r is not None
    assert r.data["referral"]["status"] == "active"
    assert r.data["appointment"]["status"] == "booked"
    assert r.priority == "urgent"


def test_an_event_the_state_machine_refuses_is_an_anomaly_not_an_error():
    r = created()
    r, step = fold(r, "R1", ev(E.REFERRAL_CLOSED, 1))
    assert r is not None
    assert r.state is S.CREATED
    assert step.anomaly
    assert "cannot close" in step.anomaly
    assert (step.state_before, step.state_after) == (S.CREATED, S.CREATED)
    assert r.sequence == 2  # recorded all the same


def test_nothing_but_created_starts_a_referral():
    r, step = fold(None, "R1", ev(E.APPOINTMENT_BOOKED))
    assert r is None
    assert step.anomaly
    assert "does not exist" in step.anomaly


def test_a_low_confidence_link_puts_the_referral_up_for_review_and_it_stays():
    r = created()
    r, _ = fold(r, "R1", ev(E.APPOINTMENT_BOOKED, 1, confidence=0.6))
    assert r is not None
    assert r.needs_review
    r, _ = fold(r, "R1", ev(E.APPOINTMENT_COMPLETED, 2, confidence=0.99))
    assert r is not None
    assert r.needs_review


def test_specialty_as_a_coding_and_a_missing_patient():
    r, _ = fold(None, "R2", ev(E.REFERRAL_CREATED, specialty={"code": "CARD", "display": "x"}))
    assert r is not None
    assert (r.specialty, r.patient_key, r.placer_order) == ("CARD", None, None)


def test_a_resent_order_changes_no_state_but_updates_fields():
    r = created()
    r, step = fold(r, "R1", ev(E.REFERRAL_CREATED, 3, priority="stat"))
    assert r is not None
    assert (r.state, step.anomaly, r.priority, r.created_at) == (S.CREATED, None, "stat", T0)


_values = st.one_of(st.text(max_size=3), st.just(CLEAR), st.integers(0, 3))
_events = st.builds(
    lambda kind, fields, confidence: (kind, fields, confidence),
    st.sampled_from(list(Event)),
    st.dictionaries(st.sampled_from(["status", "note", "priority", "specialty"]), _values),
    st.sampled_from([1.0, 0.95, 0.6]),
)


@given(st.lists(_events, max_size=25))
def test_any_stream_folds_without_raising_and_follows_decide(stream):
    logged = [ev(k, i, c, **f) for i, (k, f, c) in enumerate(stream)]
    referral, steps = replay("R", logged)
    state: State | None = None
    for event, step in zip(logged, steps, strict=True):
        d = decide(state, event.type)
        assert (step.state_before, step.state_after, step.anomaly) == (state, d.state, d.anomaly)
        state = d.state
    assert (referral.state if referral else None) == state
    if referral is not None:
        # Every value left in the projection is the last one written (CLEAR never stays).
        for group in referral.data.values():
            assert CLEAR not in group.values()
