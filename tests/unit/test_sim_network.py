"""The simulator's synthetic network and the HL7 messages its people send."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from engine.domain.referral import Event
from engine.outbound.directory import npi_valid
from engine.sim import messages
from engine.sim.network import START, Behaviour, build
from tests.normalising import shipped

AT = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
PATIENT = messages.Patient(
    "SIM000042", "TESTPATIENT", "ALPHA", "19800101", "F", "+15555550042", "p@example.invalid"
)


def test_the_same_seed_builds_the_same_network_another_seed_another() -> None:
    assert build(40, 60, seed=3) == build(40, 60, seed=3)
    a, b = build(40, 60, seed=3), build(40, 60, seed=4)
    assert [o.at for o in a.orders] != [o.at for o in b.orders]


def test_orders_arrive_in_time_order_early_enough_to_be_30_days_old_at_the_end() -> None:
    net = build(100, 60, seed=1)
    assert len(net.orders) == 100
    assert [o.at for o in net.orders] == sorted(o.at for o in net.orders)
    assert all(START <= o.at <= START + timedelta(days=30) for o in net.orders)
    assert net.end == START + timedelta(days=60)
    # A short run still spreads them over a third of it.
    short = build(30, 12, seed=1)
    assert max(o.at for o in short.orders) <= START + timedelta(days=4)


def test_every_specialist_has_a_valid_npi_and_a_referral_service() -> None:
    net = build(10, 45, seed=9)
    assert len({s.specialty for s in net.specialists}) == len(net.specialists)
    assert all(npi_valid(s.npi) for s in net.specialists)
    assert all(0.0 <= s.note_never <= 1.0 and s.lead_days > 0 for s in net.specialists)


def test_consent_needs_an_address() -> None:
    net = build(300, 60, seed=5)
    assert all(o.patient.phone for o in net.orders if o.sms_consent)
    assert all(o.patient.email for o in net.orders if o.email_consent)
    assert any(not o.sms_consent and not o.email_consent for o in net.orders)


def test_each_referral_has_its_own_repeatable_streams() -> None:
    net = build(5, 45, seed=2)
    base, nudge = net.rng(3)
    again, _ = net.rng(3)
    other, _ = net.rng(4)
    first = base.random()
    assert first == again.random()
    assert first != other.random()
    assert first != nudge.random()


def test_behaviour_probabilities_are_probabilities() -> None:
    for f in dataclasses.fields(Behaviour):
        value = getattr(Behaviour(), f.name)
        if f.name.endswith(("_days", "_spread")):
            assert value > 0, f.name
        else:
            assert 0.0 <= value <= 1.0, f.name


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        (messages.order("C1", "SIM-1", PATIENT, "REFCARD", "R", AT), Event.REFERRAL_CREATED),
        (messages.booked("C2", "SIM-1", PATIENT, "A1", AT, AT), Event.APPOINTMENT_BOOKED),
        (messages.cancelled("C3", "SIM-1", PATIENT, "A1", AT, AT), Event.APPOINTMENT_CANCELLED),
        (messages.no_show("C4", "SIM-1", PATIENT, "A1", AT, AT), Event.APPOINTMENT_NO_SHOW),
        (messages.completed("C5", "SIM-1", PATIENT, "A1", AT, AT), Event.APPOINTMENT_COMPLETED),
        (messages.consult_note("C6", "SIM-1", PATIENT, AT), Event.CONSULT_NOTE_RECEIVED),
    ],
)
def test_the_shipped_mappings_read_each_message_linked_by_the_placer_order(
    payload: bytes, event: Event
) -> None:
    result = shipped().normalise(payload.decode(), received_at=AT + timedelta(days=9))
    assert [e.type for e in result.events] == [event]
    fields = result.events[0].fields
    assert fields["correlate.placer_order"] == {"value": "SIM-1", "namespace": "SIMEHR"}
    assert not [d for d in result.diagnostics if d.severity == "error"]


def test_the_order_carries_the_virtual_time_priority_and_specialty() -> None:
    payload = messages.order("C1", "SIM-2", PATIENT, "REFDERM", "A", AT)
    fields = shipped().normalise(payload.decode(), received_at=AT).events[0].fields
    assert fields["specialty"] == "dermatology"
    assert fields["priority"] == "asap"
    assert fields["requested_at"] == "2026-03-02T09:30:00+00:00"
