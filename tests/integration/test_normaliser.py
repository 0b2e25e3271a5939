"""The normaliser on real databases: events, projections, parking, poison, TTL, replay."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from engine.domain.referral import State
from engine.mapping.mapset import load_mapping_set
from engine.services.normaliser import Processor, Source
from engine.store.eventlog import Busy
from engine.store.schema import messages, parked_keys, referral_events, referral_keys, referrals
from tests.helpers import MAPPINGS
from tests.loop_messages import adt, loop, orm, siu, unmapped
from tests.normalising import drain, open_, processor, snapshot, states, statuses, store


@pytest.fixture
def engine(upgraded_url):
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


def count(engine, table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_the_loop_in_order_ends_note_received_with_four_events(engine):
    store(engine, loop("PLC1"))
    proc = processor(engine)
    reports = drain(proc)
    proc.close()
    assert [r.status for r in reports] == ["processed"] * 4
    assert [r.new_events for r in reports] == [
        ("referral.created",),
        ("appointment.booked",),
        ("appointment.completed",),
        ("consult_note.received",),
    ]
    assert states(engine) == {"PLC1": State.NOTE_RECEIVED}
    snap = snapshot(engine)
    assert [(e["sequence"], e["state_after"], e["anomaly"]) for e in snap["events"]] == [
        (1, "created", None),
        (2, "scheduled", None),
        (3, "completed", None),
        (4, "note_received", None),
    ]
    assert [e["correlation_method"] for e in snap["events"]] == ["created"] + ["placer_order"] * 3
    assert {e["message_id"] for e in snap["events"]} == {1, 2, 3, 4}
    (referral,) = snap["referrals"]
    assert (referral["placer_order_number"], referral["placer_assigner"]) == ("PLC1", "ACME")
    assert (referral["specialty"], referral["last_sequence"]) == ("cardiology", 4)
    assert not referral["needs_review"]
    # The booking linked the appointment id; the consult note its filler number.
    assert {(k[0], k[1]) for k in snap["keys"]} >= {
        ("placer_order", "PLC1"),
        ("appointment", "FA-PLC1"),
        ("filler_order", "CN-PLC1"),
    }


def test_sius_before_the_order_are_parked_then_released_in_id_order(engine):
    orm_, s12, s14, oru_ = loop("PLC2")
    store(engine, [s12, s14])
    proc = processor(engine)
    assert [r.status for r in drain(proc)] == ["parked", "parked"]
    assert statuses(engine) == ["parked", "parked"]
    assert count(engine, parked_keys) > 0
    store(engine, [orm_, oru_])
    reports = drain(proc)
    proc.close()
    by_id = {r.message_id: r for r in reports}
    assert by_id[3].unparked == (1, 2)
    assert statuses(engine) == ["processed"] * 4
    snap = snapshot(engine)
    # Applied as if they had arrived in order: no anomalies, the same end state.
    assert [(e["message_id"], e["type"], e["anomaly"]) for e in snap["events"]] == [
        (3, "referral.created", None),
        (1, "appointment.booked", None),
        (2, "appointment.completed", None),
        (4, "consult_note.received", None),
    ]
    assert states(engine) == {"PLC2": State.NOTE_RECEIVED}
    assert count(engine, parked_keys) == 0
    with engine.connect() as conn:
        parked_at = conn.execute(select(messages.c.parked_at).order_by(messages.c.id)).scalars()
        assert [p is not None for p in parked_at] == [True, True, False, False]


def test_a_message_that_fails_to_map_does_not_block_the_next(engine):
    store(engine, [unmapped("BAD1"), orm("GOOD1", "PLC3"), adt("ADT1")])
    proc = processor(engine)
    reports = drain(proc)
    proc.close()
    assert [r.status for r in reports] == ["mapping_error", "processed", "ignored"]
    assert statuses(engine) == ["mapping_error", "processed", "ignored"]
    assert reports[0].diagnostics[0].code == "no_mapping"
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == 1)).one()
        ignored = conn.execute(select(messages).where(messages.c.id == 3)).one()
    assert '"no_mapping"' in row.diagnostics
    assert row.normalised_at is not None
    assert (row.attempts, ignored.rule_id) == (1, "not_referral_traffic")
    assert states(engine) == {"PLC3": State.CREATED}


def test_a_message_the_database_refuses_costs_only_itself(pg_upgraded):
    # PostgreSQL text cannot hold NUL: an order number with one is refused by the store.
    engine = open_(pg_upgraded)
    try:
        store(engine, [orm("NUL1", "PL\x00C"), orm("FINE1", "PLC4")])
        proc = processor(engine)
        reports = drain(proc)
        proc.close()
        assert [r.status for r in reports] == ["mapping_error", "processed"]
        assert reports[0].diagnostics[0].code == "store_failed"
        assert "PL" not in reports[0].diagnostics[0].message  # never the value
        assert states(engine) == {"PLC4": State.CREATED}
    finally:
        engine.dispose()


def test_parked_past_the_ttl_becomes_unmatched_and_the_rest_are_retried(engine):
    now = [datetime(2026, 11, 20, 12, 0, tzinfo=UTC)]
    proc = processor(engine, clock=lambda: now[0])
    store(engine, [siu("OLD1", "NOPE1")])
    drain(proc)
    now[0] += timedelta(days=6)
    store(engine, [siu("NEW1", "NOPE2")])
    drain(proc)
    assert statuses(engine) == ["parked", "parked"]
    now[0] += timedelta(days=2)  # the first has waited 8 days, the second 2
    expired, requeued = proc.sweep(timedelta(days=7))
    assert (expired, requeued) == ([1], 1)
    assert statuses(engine) == ["unmatched", "received"]
    assert [r.status for r in drain(proc)] == ["parked"]
    proc.close()
    with engine.connect() as conn:
        waits = set(conn.execute(select(parked_keys.c.message_id)).scalars())
        attempts = list(conn.execute(select(messages.c.attempts).order_by(messages.c.id)).scalars())
    # An unmatched message is an exception, but it still says what it waited for.
    assert waits == {1, 2}
    assert attempts == [1, 2]


def test_an_unmatched_message_goes_through_when_its_referral_turns_up_late(engine):
    now = [datetime(2026, 11, 20, 12, 0, tzinfo=UTC)]
    proc = processor(engine, clock=lambda: now[0])
    orm_, s12, _, _ = loop("LATE1")
    store(engine, [s12])
    drain(proc)
    now[0] += timedelta(days=8)
    proc.sweep(timedelta(days=7))
    assert statuses(engine) == ["unmatched"]
    store(engine, [orm_])
    drain(proc)
    proc.close()
    assert statuses(engine) == ["processed", "processed"]
    assert states(engine) == {"LATE1": State.SCHEDULED}


def test_replay_is_idempotent_and_a_fixed_mapping_error_replays_cleanly(engine):
    store(engine, [*loop("PLC5"), unmapped("BAD2")])
    proc = processor(engine)
    drain(proc)
    before = snapshot(engine)
    for _ in range(2):
        stored = proc.eventlog.messages(range(1, 6))
        proc.eventlog.end()
        reports = proc.process(stored, statuses=frozenset(s for _, s in before["statuses"]))
        assert [r.known_events for r in reports[:4]] == [1, 1, 1, 1]
        assert all(not r.new_events for r in reports)
    proc.close()
    assert snapshot(engine) == before
    assert count(engine, referral_events) == 4


def test_a_referral_created_twice_by_a_resent_order_keeps_one_referral(engine):
    store(engine, [orm("ORD1", "PLC6"), orm("ORD1-RESENT", "PLC6")])
    proc = processor(engine)
    reports = drain(proc)
    proc.close()
    assert reports[1].created == ()
    assert reports[1].methods == ("placer_order",)
    assert count(engine, referrals) == 1
    assert states(engine) == {"PLC6": State.CREATED}


def test_events_for_a_closed_loop_out_of_order_are_anomalies_not_failures(engine):
    store(engine, [*loop("PLC7"), siu("LATE1", "PLC7", trigger="S15", status="Cancelled")])
    proc = processor(engine)
    reports = drain(proc)
    proc.close()
    assert reports[-1].status == "processed"
    assert reports[-1].anomalies
    assert states(engine) == {"PLC7": State.NOTE_RECEIVED}


def test_rebuild_restores_projections_and_keys_from_the_log(engine):
    store(engine, [*loop("PLC8"), orm("ORD9", "PLC9")])
    proc = processor(engine)
    drain(proc)
    before = snapshot(engine)
    with engine.begin() as conn:
        conn.execute(referrals.update().values(state="cancelled", data="{}", last_sequence=99))
        conn.execute(referral_keys.delete())
    done = proc.rebuild()
    proc.close()
    assert (done.referrals, done.changed, done.events) == (2, 2, 5)
    assert snapshot(engine) == before


def test_only_one_normaliser_at_a_time_on_postgres(pg_upgraded):
    engine = open_(pg_upgraded)
    try:
        store(engine, [orm("LOCK1", "PLC10")])
        holder, other = processor(engine), processor(engine)
        holder.eventlog.begin()  # holds the turn until it commits or rolls back
        with pytest.raises(Busy):
            other.process(other.next_batch(10))
        assert statuses(engine) == ["received"]
        holder.eventlog.end()
        assert [r.status for r in drain(other)] == ["processed"]
        holder.close()
        other.close()
    finally:
        engine.dispose()


def test_one_query_per_lookup_whatever_the_batch_size(engine):
    # 40 referrals' loops in one batch: the normaliser asks the same handful of questions.
    store(engine, [m for i in range(40) for m in loop(f"Q{i}")])
    proc = processor(engine)
    seen: list[str] = []
    if engine.dialect.name == "sqlite":  # sqlite3 can trace its statements; psycopg cannot
        proc.eventlog.conn.set_trace_callback(seen.append)
    reports = drain(proc, batch=1000)
    proc.close()
    assert len(reports) == 160
    assert states(engine) == {f"Q{i}": State.NOTE_RECEIVED for i in range(40)}
    if engine.dialect.name == "sqlite":
        reads = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
        # received, statuses, keys, referrals, known events, (parked, open referrals: only
        # when the plan needs them), and the final empty read
        assert len(reads) <= 8, reads


def test_unparking_is_exact_about_assigners(engine):
    # A booking for the same number from another assigning authority stays parked.
    other = siu("OTHER1", "PLC11").replace(b"PLC11^ACME", b"PLC11^ELSEWHERE")
    store(engine, [other, orm("ORD11", "PLC11")])
    proc = processor(engine)
    reports = drain(proc)
    proc.close()
    assert [r.status for r in reports] == ["parked", "processed"]
    assert statuses(engine) == ["parked", "processed"]


def test_sqlite_and_postgres_store_the_same_json(engine):
    store(engine, [orm("J1", "PLC12")])
    proc = processor(engine)
    drain(proc)
    proc.close()
    with engine.connect() as conn:
        fields = conn.execute(text("SELECT fields FROM referral_events")).scalar_one()
    assert fields.startswith('{"correlate.placer_order":{"namespace":"ACME","value":"PLC12"}')


CARDIO_OVERLAY = """\
schema: referral-mapping/v1
id: cardio.scheduling
title: A cardiology clinic's bookings, which never carry the referral's order number
match:
  message_type: SIU^S12
defaults:
  timezone: UTC
segments:
  ignore: [RGS, AIS, AIL, AIP, PV1, NTE]
rules:
  - id: cardio_booked
    emit: appointment.booked
    fields:
      appointment_id: {path: SCH-2, as: identifier, required: true}
      correlate.appointment: {path: SCH-2, as: identifier}
      patient.identifier: {path: "PID-3[1]", as: identifier}
      specialty: {const: cardiology}
"""


def test_a_keyless_booking_is_linked_by_patient_and_specialty_for_review(engine, tmp_path):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    (root / "sources" / "cardio").mkdir(parents=True, exist_ok=True)
    (root / "sources" / "cardio" / "scheduling.map.yaml").write_text(CARDIO_OVERLAY)
    mapping_set = load_mapping_set(root)
    proc = Processor(engine, lambda: mapping_set, {"test": Source(overlay="cardio")})
    store(engine, [orm("ORDH", "PLC20"), siu("BOOKH", "PLC20", with_placer=False)])
    reports = drain(proc)
    # Another patient's keyless booking stays parked: nobody to link it to.
    store(engine, [siu("BOOKX", "PLC21", with_placer=False, mrn="999999")])
    assert [r.status for r in drain(proc)] == ["parked"]
    proc.close()
    assert reports[1].methods == ("heuristic",)
    snap = snapshot(engine)
    (referral,) = snap["referrals"]
    assert (referral["state"], referral["needs_review"]) == ("scheduled", True)
    assert snap["events"][1]["confidence"] == pytest.approx(0.6)
    # The booking's appointment id is now a key: its S14 would follow it with confidence.
    assert ("appointment", "FA-PLC20", "CLINIC", referral["id"]) in snap["keys"]
