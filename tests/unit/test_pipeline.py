"""Planning a batch (pure): correlation, parking, release, replays — no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain.correlation import Key, KeyKind
from engine.domain.events import CanonicalEvent, Normalised, Outcome, event_id
from engine.domain.projection import Referral
from engine.domain.referral import Event, State
from engine.services.pipeline import Inbound, Known, plan, referral_id_for

E = Event
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
PATIENT = {"value": "100001", "namespace": "ACME"}


def placer(value: str, ns: str = "ACME") -> dict[str, str]:
    return {"value": value, "namespace": ns}


def event(kind: Event, ordinal: int = 0, **fields: object) -> CanonicalEvent:
    return CanonicalEvent(kind, dict(fields), f"rule_{kind.value}", ordinal)


def msg(mid: int, *events: CanonicalEvent, clues: dict[str, str] | None = None) -> Inbound:
    return Inbound(
        mid,
        T0 + timedelta(minutes=mid),
        Normalised(Outcome.PROCESSED, events, mapping_id="m", clues=clues or {}),
    )


def order(mid: int, number: str, **more: object) -> Inbound:
    return msg(
        mid,
        event(
            E.REFERRAL_CREATED,
            **{
                "correlate.placer_order": placer(number),
                "patient.identifier": PATIENT,
                "specialty": "cardiology",
                **more,
            },
        ),
        clues={"patient": "100001^ACME", "specialty": "cardiology"},
    )


def booking(mid: int, number: str | None, appt: str = "A1") -> Inbound:
    fields: dict[str, object] = {"appointment_id": {"value": appt, "namespace": "CLINIC"}}
    if number:
        fields["correlate.placer_order"] = placer(number)
    return msg(mid, event(E.APPOINTMENT_BOOKED, **fields), clues={"patient": "100001^ACME"})


def test_an_order_that_matches_nothing_starts_a_referral_with_a_derived_id():
    p = plan([order(1, "P1")], Known(), NOW)
    (report,) = p.reports
    created = event(E.REFERRAL_CREATED, **{"correlate.placer_order": placer("P1")})
    rid = referral_id_for(event_id(1, created))
    assert (report.status, report.created, report.methods) == ("processed", (rid,), ("created",))
    (referral,) = p.changes.referrals
    assert (referral.id, referral.state, referral.created_at) == (
        rid,
        State.CREATED,
        T0 + timedelta(minutes=1),
    )
    assert p.changes.keys == [(Key(KeyKind.PLACER_ORDER, "P1", "ACME"), rid)]
    (row,) = p.changes.events
    assert (row.sequence, row.recorded_at, row.confidence) == (1, NOW, 1.0)


def test_an_event_that_matches_nothing_parks_the_whole_message():
    known = Known(index={Key(KeyKind.PLACER_ORDER, "P1", "ACME"): frozenset({"R1"})})
    both = msg(
        1,
        event(E.REFERRAL_UPDATED, 0, **{"correlate.placer_order": placer("P1")}),
        event(E.APPOINTMENT_BOOKED, 1, **{"correlate.placer_order": placer("P2")}),
    )
    p = plan([both], known, NOW)
    assert p.reports[0].status == "parked"
    assert p.changes.events == []  # the first event matched, but nothing is applied
    (update,) = p.changes.messages
    assert update.parked
    assert set(update.keys) == {
        Key(KeyKind.PLACER_ORDER, "P1", "ACME"),
        Key(KeyKind.PLACER_ORDER, "P2", "ACME"),
    }
    assert update.diagnostics[-1]["code"] == "parked"


def test_a_release_in_the_batch_cuts_it_so_order_is_kept():
    p = plan([booking(1, "P1"), order(2, "P1"), booking(3, "P1", "A2")], Known(), NOW)
    assert p.handled == 2
    assert [(r.message_id, r.status) for r in p.reports] == [(1, "received"), (2, "processed")]
    assert p.reports[1].unparked == (1,)
    assert p.changes.messages[0].parked  # parked_at is kept from its first wait


def test_a_release_of_messages_parked_before_the_batch():
    known = Known(
        parked=[
            (7, Key(KeyKind.PLACER_ORDER, "P1", "")),
            (8, Key(KeyKind.PLACER_ORDER, "P1", "OTHER")),
        ]
    )
    p = plan([order(9, "P1"), order(10, "P2")], known, NOW)
    assert p.changes.unpark == [7]  # no assigner waited: released; another assigner: not
    assert p.handled == 1


def test_events_already_in_the_log_are_not_applied_again():
    first = plan([order(1, "P1")], Known(), NOW)
    rid = first.changes.referrals[0].id
    known = Known(
        index={Key(KeyKind.PLACER_ORDER, "P1", "ACME"): frozenset({rid})},
        referrals={rid: first.changes.referrals[0]},
        events={e.id: e.referral_id for e in first.changes.events},
    )
    again = plan([order(1, "P1")], known, NOW + timedelta(hours=1))
    assert again.changes.events == []
    assert again.changes.referrals == []
    assert (again.reports[0].known_events, again.reports[0].referrals) == (1, (rid,))


def test_two_referrals_for_one_key_is_a_conflict_and_parks():
    key = Key(KeyKind.PLACER_ORDER, "P1", "")
    known = Known(index={key: frozenset({"R1", "R2"})})
    p = plan(
        [msg(1, event(E.APPOINTMENT_BOOKED, **{"correlate.placer_order": {"value": "P1"}}))],
        known,
        NOW,
    )
    assert p.reports[0].status == "parked"
    assert "2 referrals" in p.reports[0].diagnostics[-1].message


def _open(rid: str) -> Referral:
    return Referral(
        rid,
        State.ACCEPTED,
        2,
        T0,
        T0,
        data={"referral": {"patient.identifier": PATIENT, "specialty": "cardiology"}},
    )


def test_the_heuristic_links_a_keyless_message_with_low_confidence_for_review():
    known = Known(referrals={"R1": _open("R1")})
    keyless = msg(
        5,
        event(E.APPOINTMENT_BOOKED, appointment_id={"value": "A9"}),
        clues={"patient": "100001^ACME", "specialty": "Cardiology"},
    )
    p = plan([keyless], known, NOW)
    assert p.reports[0].methods == ("heuristic",)
    (referral,) = p.changes.referrals
    assert referral.needs_review
    assert referral.state is State.SCHEDULED


def test_a_new_order_is_never_linked_by_the_heuristic():
    known = Known(referrals={"R1": _open("R1")})
    p = plan([order(5, "P-NEW")], known, NOW)
    assert p.reports[0].methods == ("created",)


def test_an_ignored_or_failed_message_is_marked_with_its_rule_and_diagnostics():
    ignored = Inbound(
        1, T0, Normalised(Outcome.IGNORED, rule_id="not_referral_traffic", mapping_id="m")
    )
    failed = Inbound(2, T0, Normalised(Outcome.MAPPING_ERROR, mapping_id="m"))
    p = plan([ignored, failed], Known(), NOW)
    assert [(u.status, u.rule_id) for u in p.changes.messages] == [
        ("ignored", "not_referral_traffic"),
        ("mapping_error", ""),
    ]


_kinds = st.sampled_from(["order", "booking", "keyless"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_kinds, st.sampled_from(["P1", "P2"])), max_size=12))
def test_every_message_is_decided_exactly_once_and_sequences_are_dense(stream):
    batch = []
    for i, (kind, number) in enumerate(stream, start=1):
        if kind == "order":
            batch.append(order(i, number))
        elif kind == "booking":
            batch.append(booking(i, number, f"A{i}"))
        else:
            batch.append(booking(i, None, f"A{i}"))
    p = plan(batch, Known(), NOW)
    assert [r.message_id for r in p.reports] == [b.message_id for b in batch[: p.handled]]
    assert len({e.id for e in p.changes.events}) == len(p.changes.events)
    per_referral: dict[str, list[int]] = {}
    for e in p.changes.events:
        per_referral.setdefault(e.referral_id, []).append(e.sequence)
    for sequences in per_referral.values():
        assert sequences == list(range(1, len(sequences) + 1))
