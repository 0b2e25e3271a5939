"""Every Prometheus metric refloop exports, in one place.

Labels are bounded by construction: listener names come from the config, message types
are validated against HL7 table 0076 (else ``invalid``), outcomes and reasons are
enums. Never a patient, never a control id, never free text.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

import engine

MLLP_MESSAGES = "refloop_mllp_messages"
MLLP_ACK_LATENCY = "refloop_mllp_ack_latency_seconds"
MLLP_CONNECTIONS = "refloop_mllp_connections"
MLLP_CONNECTIONS_REFUSED = "refloop_mllp_connections_refused"
MLLP_FRAMING_ERRORS = "refloop_mllp_framing_errors"
MLLP_JUNK_BYTES = "refloop_mllp_junk_bytes"
DB_COMMIT = "refloop_db_commit_seconds"
DB_BATCH = "refloop_db_batch_messages"
DB_ERRORS = "refloop_db_errors"
INGEST_QUEUE = "refloop_ingest_queue_depth"
EVENTS = "refloop_events"
REFERRALS = "refloop_referrals"
MAPPING_ERRORS = "refloop_mapping_errors"
MAPPING_RELOADS = "refloop_mapping_reloads"
PARKED = "refloop_parked_messages"
UNMATCHED = "refloop_unmatched_messages"
NORMALIZE = "refloop_normalize_seconds"
NORMALIZE_LAG = "refloop_normalize_lag_seconds"
NORMALIZER_BACKLOG = "refloop_normalizer_backlog"
DELIVERIES = "refloop_deliveries"
DELIVERY_SECONDS = "refloop_delivery_seconds"
OUTBOX_PENDING = "refloop_outbox_pending"
OUTBOX_DEAD = "refloop_outbox_dead"

#: Delivery attempt outcomes (the ``outcome`` label of refloop_deliveries_total).
DELIVERY_OUTCOMES = ("delivered", "sent", "retry", "dead")
FHIR_REQUESTS = "refloop_fhir_requests"
#: FHIR REST request outcomes (writes, and the read facade's read / not_found).
FHIR_OUTCOMES = (
    "accepted",
    "duplicate",
    "invalid",
    "unauthorized",
    "forbidden",
    "unsupported",
    "too_large",
    "conflict",
    "unavailable",
    "read",
    "not_found",
)
#: The ``resource`` label: the types with endpoints, Bundle, and ``other``.
FHIR_RESOURCE_LABELS = (
    "ServiceRequest",
    "Task",
    "Appointment",
    "DocumentReference",
    "DiagnosticReport",
    "Communication",
    "Bundle",
    "other",
)
FHIR_SUBSCRIPTION_LAST_EVENT = "refloop_fhir_subscription_last_event_seconds"
FHIR_RECONCILIATIONS = "refloop_fhir_reconciliations"
TIMERS_DUE = "refloop_timers_due"
ESCALATIONS = "refloop_escalations"
WORKLIST_OPEN = "refloop_worklist_open"
OUTREACH = "refloop_outreach"
LOOP_CLOSURE = "refloop_loop_closure_ratio"
OPEN_30D = "refloop_open_referrals_30d_ratio"
DAYS_TO_CLOSE = "refloop_days_to_close"
#: What a due policy timer did (the ``kind`` label of refloop_escalations_total).
ESCALATION_KINDS = ("escalate", "worklist", "notify", "outreach")

#: What the normaliser owns; when it runs in its own process, these come from there.
REFERRAL_CORE_FAMILIES = frozenset(
    {
        EVENTS,
        REFERRALS,
        MAPPING_ERRORS,
        MAPPING_RELOADS,
        PARKED,
        UNMATCHED,
        NORMALIZE,
        NORMALIZE_LAG,
        NORMALIZER_BACKLOG,
    }
)
_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created", "_info")

# `_created` series double the exposition for no operational value.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per daemon, so several daemons can live in one test process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Standard process_* and python_* series (CPU, memory, open fds, GC) for ops.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("refloop_build", "refloop version", registry=r).info({"version": engine.__version__})
        self.messages = Counter(
            MLLP_MESSAGES,
            "Inbound MLLP messages by outcome "
            "(accepted, duplicate, error, rejected, storage_error)",
            ["listener", "message_type", "outcome"],
            registry=r,
        )
        self.ack_latency = Histogram(
            MLLP_ACK_LATENCY,
            "Time from a complete frame to its ACK being written",
            ["listener"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            MLLP_CONNECTIONS, "Open MLLP connections", ["listener"], registry=r
        )
        self.refused = Counter(
            MLLP_CONNECTIONS_REFUSED,
            "MLLP connections refused (cidr, max_connections, tls_handshake)",
            ["listener", "reason"],
            registry=r,
        )
        self.framing_errors = Counter(
            MLLP_FRAMING_ERRORS,
            "MLLP framing problems (outside_frame, abandoned_frame, oversize, idle_timeout)",
            ["listener", "reason"],
            registry=r,
        )
        self.junk_bytes = Counter(
            MLLP_JUNK_BYTES,
            "Bytes received outside MLLP frames and discarded",
            ["listener"],
            registry=r,
        )
        self.db_commit = Histogram(
            DB_COMMIT,
            "Duration of one group commit of inbound messages",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_batch = Histogram(
            DB_BATCH,
            "Messages per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.db_errors = Counter(
            DB_ERRORS, "Failed database commits of inbound messages", registry=r
        )
        self.queue_depth = Gauge(INGEST_QUEUE, "Messages waiting for the writer", registry=r)
        # The referral core. Labels: event types and states are enums, mapping ids come
        # from the analysts' mapping set (bounded, never message content).
        self.events = Counter(
            EVENTS, "Referral events appended to the event log", ["type"], registry=r
        )
        self.referrals = Gauge(REFERRALS, "Referrals by state", ["state"], registry=r)
        self.mapping_errors = Counter(
            MAPPING_ERRORS,
            "Messages stored as mapping_error, by the mapping that failed (none: no mapping)",
            ["mapping"],
            registry=r,
        )
        self.mapping_reloads = Counter(
            MAPPING_RELOADS, "Mapping set reloads (ok, error)", ["result"], registry=r
        )
        self.parked = Gauge(PARKED, "Messages parked until their referral appears", registry=r)
        self.unmatched = Gauge(
            UNMATCHED, "Messages parked past the TTL: exceptions to review", registry=r
        )
        self.normalize = Histogram(
            NORMALIZE,
            "Time to normalise one message with the mapping set",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.normalize_lag = Histogram(
            NORMALIZE_LAG,
            "Time from a message being received to its normalisation being committed",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.normalizer_backlog = Gauge(
            NORMALIZER_BACKLOG, "Messages received but not yet normalised", registry=r
        )
        # Outbound (the dispatcher): labels are configured channel names and the outcome enum.
        self.deliveries = Counter(
            DELIVERIES,
            "Delivery attempts by channel and outcome (delivered: the peer confirmed; sent: "
            "the peer queued it; retry: failed, will retry; dead: dead-lettered)",
            ["channel", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            DELIVERY_SECONDS,
            "Time one delivery attempt spent in its channel (connect, send, answer)",
            ["channel"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.outbox_pending = Gauge(
            OUTBOX_PENDING,
            "Deliveries waiting to be sent (due now or retrying later), by channel",
            ["channel"],
            registry=r,
        )
        self.outbox_dead = Gauge(
            OUTBOX_DEAD,
            "Dead-lettered deliveries waiting for an operator (refloop deliveries retry)",
            ["channel"],
            registry=r,
        )
        # FHIR inbound: source names come from the config (``unknown`` when no credential
        # matched), resources and outcomes from the tuples above.
        self.fhir_requests = Counter(
            FHIR_REQUESTS,
            "FHIR REST requests by source, resource type and outcome",
            ["source", "resource", "outcome"],
            registry=r,
        )
        # FHIR subscriptions (engine/services/subscriptions.py): source names from the config,
        # outcomes ok | invalid (some resources refused) | error (the search failed, retried).
        self.fhir_subscription_last_event = Gauge(
            FHIR_SUBSCRIPTION_LAST_EVENT,
            "Seconds since the quietest subscription of a FHIR source was heard from "
            "(an event, a heartbeat or a handshake)",
            ["source"],
            registry=r,
        )
        self.fhir_reconciliations = Counter(
            FHIR_RECONCILIATIONS,
            "Reconciliation searches against a FHIR source's server, by outcome",
            ["source", "outcome"],
            registry=r,
        )

        self.timers_due = Gauge(
            TIMERS_DUE, "Policy timers due and not yet fired (the scheduler's backlog)", registry=r
        )
        self.escalations = Counter(
            ESCALATIONS,
            "What due policy timers did: escalations, worklist items, notices, outreach",
            ["kind"],
            registry=r,
        )
        for kind in ESCALATION_KINDS:
            self.escalations.labels(kind)
        self.worklist_open = Gauge(
            WORKLIST_OPEN, "Open exceptions on the worklist, by reason", ["reason"], registry=r
        )
        self.outreach = Counter(
            OUTREACH, "Patient outreach by channel and outcome", ["channel", "outcome"], registry=r
        )
        self.loop_closure = Gauge(
            LOOP_CLOSURE,
            "Referrals at least 30 days old whose loop closed (consult note back, or closed)",
            registry=r,
        )
        self.open_30d = Gauge(
            OPEN_30D,
            "Referrals at least 30 days old that were still open 30 days after they were created",
            registry=r,
        )
        self.days_to_close = Gauge(
            DAYS_TO_CLOSE,
            "Days from referral to loop closure over closed referrals, by quantile",
            ["quantile"],
            registry=r,
        )

    def declare_listener(self, listener: str, *, tls: bool = False) -> None:
        """Create a listener's series at zero so dashboards and alerts see them at once."""
        self.connections.labels(listener)
        for reason in ("outside_frame", "abandoned_frame", "oversize", "idle_timeout"):
            self.framing_errors.labels(listener, reason)
        self.junk_bytes.labels(listener)
        for reason in ("cidr", "max_connections", *(("tls_handshake",) if tls else ())):
            self.refused.labels(listener, reason)
        self.ack_latency.labels(listener)

    def declare_referral_core(self, states: list[str], event_types: list[str]) -> None:
        """Create the referral series at zero so dashboards and alerts see them at once."""
        for state in states:
            self.referrals.labels(state)
        for event_type in event_types:
            self.events.labels(event_type)
        for result in ("ok", "error"):
            self.mapping_reloads.labels(result)

    def declare_channel(self, channel: str) -> None:
        """Create a channel's series at zero so dashboards and alerts see them at once."""
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(channel, outcome)
        self.delivery_seconds.labels(channel)
        self.outbox_pending.labels(channel).set(0)
        self.outbox_dead.labels(channel).set(0)

    def declare_fhir_source(self, source: str) -> None:
        """Create a FHIR source's request series at zero (``unknown`` too: the
        unauthenticated requests)."""
        for resource in FHIR_RESOURCE_LABELS:
            for outcome in FHIR_OUTCOMES:
                self.fhir_requests.labels(source, resource, outcome)
            self.fhir_requests.labels("unknown", resource, "unauthorized")

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _family(line: bytes) -> str:
    if line.startswith(b"# "):
        parts = line.split(b" ", 3)
        return parts[2].decode() if len(parts) > 2 else ""
    end = len(line)
    for stop in (b"{", b" "):
        at = line.find(stop)
        if 0 <= at < end:
            end = at
    return line[:end].decode()


def _in(name: str, families: frozenset[str]) -> bool:
    return any(name == f + suffix for f in families for suffix in _SUFFIXES)


def select_families(text: bytes, families: frozenset[str], *, keep: bool = True) -> bytes:
    """The lines of a text exposition that belong (``keep``) or do not belong to
    ``families``: how two processes' metrics are served as one page."""
    out = [
        line
        for line in text.splitlines(keepends=True)
        if line.strip() and _in(_family(line), families) == keep
    ]
    return b"".join(out)
