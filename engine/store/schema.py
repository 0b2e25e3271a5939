"""Table definitions (SQLAlchemy Core). Alembic migrations must match these exactly;
``tests/integration/test_migrations.py`` proves it on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on both backends."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Every inbound message, raw and untouched, committed before it is acknowledged.
messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("listener", String(64), nullable=False),
    Column("peer", String(64), nullable=False),
    Column("raw", LargeBinary(), nullable=False),
    Column("size", Integer(), nullable=False),
    Column("raw_truncated", Boolean(), nullable=False, default=False),
    Column("message_type", String(), nullable=True),
    Column("control_id", String(), nullable=True),
    Column("sending_application", String(), nullable=True),
    Column("sending_facility", String(), nullable=True),
    Column("receiving_application", String(), nullable=True),
    Column("receiving_facility", String(), nullable=True),
    Column("version", String(), nullable=True),
    Column("charset", String(), nullable=True),
    # sha256(MSH-3 | MSH-4 | MSH-10), only on accepted messages: what duplicates match.
    Column("dedup_key", String(64), nullable=True),
    Column("payload_sha256", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("ack_code", String(2), nullable=True),
    Column("ack", LargeBinary(), nullable=True),
    Column("error_code", Integer(), nullable=True),
    Column("error", Text(), nullable=True),
    Column("duplicate_of", Id, nullable=True),
    # FHIR writes: the request headers that change the body's meaning (JSON); NULL for MLLP.
    Column("headers", Text(), nullable=True),
    # Normalisation, after the ACK (engine/services/normaliser.py): NORMALISER_COLUMNS.
    Column("normalised_at", UtcDateTime(), nullable=True),
    Column("diagnostics", Text(), nullable=True),  # JSON list of Diagnostic.as_dict()
    Column("mapping_id", String(), nullable=True),
    Column("rule_id", String(), nullable=True),
    Column("parked_at", UtcDateTime(), nullable=True),  # first parked; the TTL counts from here
    Column("attempts", Integer(), nullable=False, default=0, server_default=text("0")),
    # Accepted messages only; resends are recognised by colliding here (engine/store/ingest.py).
    Index(
        "uq_messages_dedup_key",
        "dedup_key",
        unique=True,
        sqlite_where=text("dedup_key IS NOT NULL"),
        postgresql_where=text("dedup_key IS NOT NULL"),
    ),
    Index(None, "status", "id"),
    Index(None, "received_at"),
)

#: ``messages.message_type`` of a stored FHIR resource is this prefix + its resourceType
#: (``FHIR:ServiceRequest``); every HL7 message has its MSH-9 there instead.
FHIR_MESSAGE_TYPE_PREFIX = "FHIR:"


def is_fhir_message(message_type: str | None) -> bool:
    """The stored row is a FHIR resource (not an HL7 v2 message)."""
    return (message_type or "").startswith(FHIR_MESSAGE_TYPE_PREFIX)


#: Columns of ``messages`` the normaliser owns; the ingest hot path leaves them to
#: their defaults.
NORMALISER_COLUMNS = frozenset(
    {"normalised_at", "diagnostics", "mapping_id", "rule_id", "parked_at", "attempts"}
)

#: Message statuses the normaliser sets; ``received`` is where it starts.
NORMALISED_STATUSES = ("processed", "ignored", "mapping_error", "parked", "unmatched")

#: The projection: one row per referral, rebuilt from ``referral_events`` at will.
referrals = Table(
    "referrals",
    metadata,
    Column("id", String(36), primary_key=True),  # uuid, derived from the creating event
    Column("state", String(24), nullable=False),
    Column("placer_order_number", String(), nullable=True),
    Column("placer_assigner", String(), nullable=True),
    Column("referral_number", String(), nullable=True),
    Column("specialty", String(), nullable=True),
    Column("priority", String(), nullable=True),
    Column("patient_key", String(), nullable=True),  # identifier value^assigner (heuristic)
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("last_sequence", Integer(), nullable=False),
    Column("needs_review", Boolean(), nullable=False),
    Column("data", Text(), nullable=False),  # JSON: the merged canonical fields by group
    # The worklist by state, the lookup an operator types, the heuristic's candidates.
    Index(None, "state", "updated_at"),
    Index(None, "placer_order_number"),
    Index(None, "patient_key", "state"),
)

#: The append-only event log. ``id`` is deterministic (engine.domain.events.event_id), so
#: normalising a message again inserts nothing new.
referral_events = Table(
    "referral_events",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("referral_id", String(36), ForeignKey("referrals.id"), nullable=False),
    Column("sequence", Integer(), nullable=False),
    Column("type", String(40), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=True),
    Column("recorded_at", UtcDateTime(), nullable=False),
    Column("message_id", Id, nullable=True),
    Column("mapping_id", String(), nullable=True),
    Column("mapping_digest", String(), nullable=True),
    Column("rule_id", String(), nullable=True),
    Column("correlation_method", String(24), nullable=False),
    Column("confidence", Float(), nullable=False),
    Column("state_before", String(24), nullable=True),
    Column("state_after", String(24), nullable=True),
    Column("anomaly", Text(), nullable=True),
    Column("fields", Text(), nullable=False),  # JSON: the event's canonical fields
    UniqueConstraint("referral_id", "sequence"),
    Index(None, "message_id"),
    Index(None, "recorded_at"),
)

#: Correlation keys of each referral (placer/filler order numbers, referral ids,
#: appointment ids), compared as (kind, value, assigner).
referral_keys = Table(
    "referral_keys",
    metadata,
    Column("kind", String(24), nullable=False),
    Column("value", String(), nullable=False),
    Column("assigner", String(), nullable=False),  # "" when the sender named none
    Column("referral_id", String(36), ForeignKey("referrals.id"), nullable=False),
    # Value first: a key sent without its assigner is looked up by value alone.
    PrimaryKeyConstraint("value", "kind", "assigner", "referral_id"),
    Index(None, "referral_id"),
)

#: The keys a parked message waits for: when one is indexed, the message is retried.
parked_keys = Table(
    "parked_keys",
    metadata,
    Column("message_id", Id, nullable=False),
    Column("kind", String(24), nullable=False),
    Column("value", String(), nullable=False),
    Column("assigner", String(), nullable=False),
    PrimaryKeyConstraint("message_id", "kind", "value", "assigner"),
    Index(None, "value"),
)

#: The transactional outbox: one row per delivery, written in the same transaction as
#: the event that caused it (engine/store/outbox.py; theory of operation there).
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),  # also the per-referral FIFO order
    Column("key", String(36), nullable=False),  # idempotency key, deterministic per event+route
    Column("referral_id", String(36), ForeignKey("referrals.id"), nullable=False),
    Column("event_id", String(36), nullable=False),  # the trigger (referral_events.id)
    Column("route_id", String(), nullable=False),
    Column("kind", String(16), nullable=False),  # packet | writeback | notification
    Column("channel", String(64), nullable=False),
    Column("format", String(40), nullable=False),
    Column("endpoint", String(), nullable=True),
    Column("recipient_id", String(), nullable=True),
    Column("receiver_application", String(), nullable=True),
    Column("receiver_facility", String(), nullable=True),
    # pending → in_flight → delivered | sent (taken, unconfirmed) | dead; cancelled by hand.
    Column("status", String(16), nullable=False),
    Column("attempts", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    # Max age counts from here: creation, or when an operator retried it by hand.
    Column("age_from", UtcDateTime(), nullable=False),
    Column("claimed_at", UtcDateTime(), nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("finished_at", UtcDateTime(), nullable=True),
    # Rendered once, on the first attempt, and sent byte for byte on every retry.
    Column("payload", LargeBinary(), nullable=True),
    Column("content_type", String(64), nullable=True),
    Column("meta", Text(), nullable=True),  # JSON: control_id, subject, filename …
    Column("last_error", Text(), nullable=True),  # a safe reason, never payload text
    Column("receipt", Text(), nullable=True),  # JSON: peer_reference, detail, confirmed
    UniqueConstraint("key"),
    Index(None, "status", "next_attempt_at"),
    Index(None, "referral_id", "channel", "id"),
    Index(None, "channel", "status"),
)

#: Delivery statuses; the first two are open (they hold their referral's FIFO).
DELIVERY_OPEN = ("pending", "in_flight")
DELIVERY_STATUSES = ("pending", "in_flight", "delivered", "sent", "dead", "cancelled")

#: The FHIR Subscriptions refloop follows, one row per source and subscription: ours
#: (``key`` derived from the configured spec) and any a source's server notifies us
#: about that we did not create (``key`` = ``server:<id>``). engine/store/subscriptions.py.
fhir_subscriptions = Table(
    "fhir_subscriptions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", String(64), nullable=False),
    Column("key", String(80), nullable=False),
    Column("resource", String(64), nullable=True),  # the type it watches, when known
    Column("search", String(), nullable=True),  # Type?params it watches (reconciliation)
    Column("server_id", String(64), nullable=True),  # Subscription.id on the source's server
    Column("status", String(16), nullable=True),  # as the server last reported it
    Column("last_event_number", BigInteger(), nullable=True),
    Column("last_event_at", UtcDateTime(), nullable=True),  # our clock: the last event
    Column("last_heard_at", UtcDateTime(), nullable=True),  # any notification, heartbeats too
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    UniqueConstraint("source", "key"),
    Index(None, "source", "server_id"),
)

#: Work a notification announced and the answer did not wait for: read-backs of id-only
#: focus resources and reconciliation searches. Written before the 2xx, deleted once done.
fhir_followups = Table(
    "fhir_followups",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # read | reconcile
    Column("target", String(), nullable=False),  # read: Type/id; reconcile: Type?params
    Column("since", UtcDateTime(), nullable=True),  # reconcile: _lastUpdated=ge<since>
    Column("subscription_id", Id, nullable=True),  # fhir_subscriptions.id that asked
    Column("reason", String(24), nullable=False),  # id-only | empty | gap | start | status
    Column("attempts", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("last_error", Text(), nullable=True),  # a safe reason ("HTTP 503"), never content
    Index(None, "next_attempt_at"),
)

#: Policy timers (engine/store/timers.py): armed and cleared in the transaction of the
#: event that causes them; ids are deterministic (engine.policy.timers.timer_id), so a
#: replay arms nothing twice and a fired timer never fires again.
referral_timers = Table(
    "referral_timers",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("referral_id", String(36), ForeignKey("referrals.id"), nullable=False),
    Column("rule", String(), nullable=False),
    Column("kind", String(16), nullable=False),  # window | outreach | worklist | escalate | notify
    Column("step", Integer(), nullable=False),
    Column("entry", Integer(), nullable=False),  # sequence of the event that entered the states
    Column("entered_at", UtcDateTime(), nullable=False),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False),  # pending | fired | cleared
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index(None, "status", "due_at"),
    Index(None, "referral_id", "status"),
)

#: The exception worklist (engine/store/worklist.py): one row per exception, keyed so a
#: replayed cause adds nothing twice. ``detail`` is safe text, never patient data.
worklist_items = Table(
    "worklist_items",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("key", String(36), nullable=False),
    Column("referral_id", String(36), ForeignKey("referrals.id"), nullable=True),
    Column("message_id", Id, nullable=True),  # unmatched messages, unknown SMS replies
    Column("reason", String(48), nullable=False),
    Column("detail", Text(), nullable=True),
    Column("owner", String(64), nullable=False),
    Column("assignee", String(64), nullable=True),
    Column("status", String(16), nullable=False),  # open | acknowledged | snoozed | resolved
    # The referral's state when raised: the item resolves itself once the referral leaves it.
    Column("state", String(24), nullable=True),
    Column("due_at", UtcDateTime(), nullable=True),
    Column("snoozed_until", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("resolved_at", UtcDateTime(), nullable=True),
    Column("resolved_by", String(64), nullable=True),
    UniqueConstraint("key"),
    Index(None, "status", "reason"),
    Index(None, "referral_id", "status"),
)

#: Who did what to a worklist item, and when (items without a referral have no event).
worklist_actions = Table(
    "worklist_actions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("item_id", Id, ForeignKey("worklist_items.id"), nullable=False),
    Column("action", String(16), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("note", Text(), nullable=True),
    Index(None, "item_id"),
)

#: A patient's outreach choices learnt after the referral (an SMS STOP, a coordinator's
#: note); they override what the referral's messages said. Keyed like referrals.patient_key.
patient_preferences = Table(
    "patient_preferences",
    metadata,
    Column("patient_key", String(), primary_key=True),
    Column("sms_consent", Boolean(), nullable=True),
    Column("email_consent", Boolean(), nullable=True),
    Column("language", String(16), nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(64), nullable=False),
)
