"""Canonical referral events: what a mapping may emit, and what normalising a message yields.

Mappings turn a vendor's message into these events; everything after that (correlation,
the state machine, the event log) sees only this vocabulary. The catalogue below is the
contract the mapping loader checks every ``fields`` key against, so a typo in a mapping
is a load error, not a silently empty column.

Field values are canonical JSON-able data, never vendor text:

* ``text`` / ``code``: a string (codes stay strings: ``010`` is not 8, ``NO`` is not false);
* ``datetime``: ISO 8601 with an offset (``2025-03-04T10:12:00-06:00``); ``date``: ``1980-01-01``;
* ``identifier``: ``{"value", "namespace"?, "type"?}``; ``coding``: ``{"code", "display"?,
  "system"?}``; ``name``: ``{"family"?, "given"?, "middle"?}``;
* ``int``: an integer.

A field the sender explicitly nulled (HL7 ``""``) is carried as :data:`CLEAR` so the
projection can erase it; an absent field is simply not in ``fields``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engine.domain.correlation import Key, KeyKind
from engine.domain.referral import Event


class FieldType(StrEnum):
    TEXT = "text"
    CODE = "code"
    DATETIME = "datetime"
    DATE = "date"
    INT = "int"
    IDENTIFIER = "identifier"
    CODING = "coding"
    NAME = "name"


#: The value a field carries when the sender sent HL7 ``""`` ("delete this value").
CLEAR = {"clear": True}

T = FieldType

#: Correlation keys are ordinary identifier fields named ``correlate.<kind>``.
CORRELATE = {f"correlate.{kind.value}": kind for kind in KeyKind}

_COMMON: dict[str, FieldType] = {
    "occurred_at": T.DATETIME,  # business time of the event (ORC-9, SCH start, TXA-6 …)
    "patient.identifier": T.IDENTIFIER,
    "patient.name": T.NAME,
    "patient.birth_date": T.DATE,
    "patient.sex": T.CODE,
    "specialty": T.CODE,
    "note": T.TEXT,
    "reason": T.TEXT,  # why the referral exists (clinical reason)
    "reason_code": T.CODING,
    "status_reason": T.TEXT,  # why this event happened (cancel, decline, reschedule reason)
    # the listener / FHIR source the message came from: set by the pipeline, never by a mapping
    "source": T.TEXT,
    **{name: T.IDENTIFIER for name in CORRELATE},
}
_REFERRAL: dict[str, FieldType] = {
    "service": T.CODING,
    "priority": T.CODE,
    "status": T.CODE,
    "referral_type": T.CODE,
    "category": T.CODE,
    "disposition": T.CODE,
    "requested_at": T.DATETIME,
    "due_by": T.DATETIME,
    "requester.identifier": T.IDENTIFIER,
    "requester.name": T.NAME,
    "requester.organization": T.TEXT,
    "recipient.identifier": T.IDENTIFIER,
    "recipient.name": T.NAME,
    "recipient.organization": T.TEXT,
    "diagnosis": T.CODING,
    "authorization.identifier": T.IDENTIFIER,
    "authorization.payer": T.TEXT,
    # The patient's primary insurance (the first IN1; mappings/README.md "Insurance").
    "insurance.payer": T.TEXT,  # payer name (IN1-4.1), else its id (IN1-3.1)
    "insurance.payer_id": T.IDENTIFIER,  # the payer's identifier (IN1-3)
    "insurance.plan": T.TEXT,  # health plan id (IN1-2.1), else its name (IN1-2.2)
    "insurance.member_id": T.IDENTIFIER,  # the insured's policy number (IN1-36)
    "insurance.group": T.TEXT,  # group number (IN1-8)
    # How the patient wants to be reached (PID-13/14, PID-15, a FHIR Patient.telecom
    # and communication): patient outreach (engine.policy.outreach) reads these.
    "patient.phone": T.TEXT,
    "patient.email": T.TEXT,
    "patient.language": T.CODE,  # BCP 47 / ISO 639 (en, es)
    "patient.timezone": T.CODE,  # IANA zone for quiet hours
    "patient.contact_preference": T.CODE,  # sms | email | voice | none
    "patient.consent.sms": T.CODE,  # yes | no
    "patient.consent.email": T.CODE,  # yes | no
    "location": T.TEXT,  # where the patient wants to be seen (routing)
}
_APPOINTMENT: dict[str, FieldType] = {
    "appointment_id": T.IDENTIFIER,
    "start": T.DATETIME,
    "end": T.DATETIME,
    "duration_minutes": T.INT,
    "status": T.CODE,
    "service": T.CODING,
    "location": T.TEXT,
    "provider.identifier": T.IDENTIFIER,
    "provider.name": T.NAME,
}
_NOTE: dict[str, FieldType] = {
    "document_id": T.IDENTIFIER,
    "parent_document_id": T.IDENTIFIER,
    "document_type": T.CODING,
    "report_status": T.CODE,
    "observed_at": T.DATETIME,
    "title": T.TEXT,
    "author.identifier": T.IDENTIFIER,
    "author.name": T.NAME,
    "content_type": T.CODE,
}
_AUTH: dict[str, FieldType] = {
    "authorization.identifier": T.IDENTIFIER,
    "authorization.payer": T.TEXT,
    "authorization.status": T.CODE,
}


#: What the dispatcher records about a delivery's outcome (no payload, no PHI).
_DELIVERY: dict[str, FieldType] = {
    "delivery.id": T.INT,
    "delivery.kind": T.CODE,  # packet | writeback | notification
    "delivery.channel": T.CODE,
    "delivery.format": T.CODE,
    "delivery.route": T.CODE,
    "delivery.recipient": T.CODE,  # directory id of the specialist, for packets
    "delivery.attempts": T.INT,
    "delivery.peer_reference": T.TEXT,  # MSA-2, a Location, a fax id
    "delivery.detail": T.TEXT,  # "ACK AA", "HTTP 201"
    "delivery.error": T.TEXT,  # why it was dead-lettered
}


#: What the policy and the people working its exceptions record (no patient data beyond
#: what a coordinator types in a note).
_POLICY: dict[str, FieldType] = {
    "actor": T.TEXT,  # who did it: a user name, or "refloop" for the engine
    "escalation.level": T.INT,
    "escalation.reason": T.CODE,
    "escalation.rule": T.CODE,
    "escalation.notify": T.CODE,  # referrer | specialist: a notice went (or was asked) there
    "worklist.item": T.INT,
    "worklist.reason": T.CODE,
    "worklist.assignee": T.TEXT,
    "worklist.snoozed_until": T.DATETIME,
    "worklist.note": T.TEXT,
    "outreach.template": T.CODE,
    "outreach.channel": T.CODE,
    "outreach.language": T.CODE,
    "outreach.outcome": T.CODE,
    "reply.channel": T.CODE,
    "reply.from": T.TEXT,
    "reply.text": T.TEXT,
    "reply.keyword": T.CODE,  # STOP, START, YES, … (upper case)
}


@dataclass(frozen=True, slots=True)
class EventSpec:
    fields: Mapping[str, FieldType]
    required: frozenset[str] = frozenset()


def _spec(*groups: Mapping[str, FieldType], required: tuple[str, ...] = ()) -> EventSpec:
    merged: dict[str, FieldType] = dict(_COMMON)
    for group in groups:
        merged.update(group)
    return EventSpec(merged, frozenset(required))


E = Event
CATALOGUE: dict[Event, EventSpec] = {
    E.REFERRAL_CREATED: _spec(_REFERRAL, required=("patient.identifier",)),
    E.REFERRAL_UPDATED: _spec(_REFERRAL),
    E.REFERRAL_CANCELLED: _spec(_REFERRAL, _POLICY),
    E.REFERRAL_SENT: _spec(_REFERRAL, _DELIVERY),
    E.REFERRAL_DELIVERED: _spec(_REFERRAL, _DELIVERY),
    E.REFERRAL_ACCEPTED: _spec(_REFERRAL),
    E.REFERRAL_DECLINED: _spec(_REFERRAL),
    E.AUTHORIZATION_PENDING: _spec(_AUTH),
    E.AUTHORIZATION_APPROVED: _spec(_AUTH, _POLICY),
    E.AUTHORIZATION_DENIED: _spec(_AUTH),
    E.APPOINTMENT_BOOKED: _spec(_APPOINTMENT, required=("appointment_id",)),
    E.APPOINTMENT_RESCHEDULED: _spec(_APPOINTMENT, required=("appointment_id",)),
    E.APPOINTMENT_CANCELLED: _spec(_APPOINTMENT),
    E.APPOINTMENT_NO_SHOW: _spec(_APPOINTMENT),
    E.APPOINTMENT_COMPLETED: _spec(_APPOINTMENT),
    E.CONSULT_NOTE_RECEIVED: _spec(_NOTE),
    E.CONSULT_NOTE_AMENDED: _spec(_NOTE),
    E.REFERRAL_CLOSED: _spec(),
    E.REFERRAL_ESCALATED: _spec(_POLICY),
    E.REFERRAL_CLOSED_BY_HAND: _spec(_POLICY),
    E.WORKLIST_ACKNOWLEDGED: _spec(_POLICY),
    E.WORKLIST_ASSIGNED: _spec(_POLICY),
    E.WORKLIST_SNOOZED: _spec(_POLICY),
    E.WORKLIST_RESOLVED: _spec(_POLICY),
    E.PATIENT_REPLIED: _spec(_POLICY),
    E.OUTREACH_PLANNED: _spec(_POLICY),
    E.OUTREACH_SKIPPED: _spec(_POLICY),
    E.DELIVERY_SUCCEEDED: _spec(_DELIVERY),
    E.DELIVERY_FAILED: _spec(_DELIVERY),
}

#: Fields whose identifier becomes a correlation key of the referral once applied.
INDEXED_FIELDS: dict[str, KeyKind] = {
    **CORRELATE,
    "appointment_id": KeyKind.APPOINTMENT,
}


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where an event came from: enough to find the message and the exact mapping text."""

    message_id: int
    mapping_id: str
    mapping_digest: str  # sha256 of the mapping set's files, first 16 hex digits
    rule_id: str


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    type: Event
    fields: Mapping[str, Any]
    rule_id: str
    ordinal: int = 0  # position among this message's events: part of the deterministic id

    def keys(self) -> tuple[Key, ...]:
        """The correlation keys this event offers (``correlate.*`` and appointment ids)."""
        out: list[Key] = []
        for name, kind in INDEXED_FIELDS.items():
            value = self.fields.get(name)
            if isinstance(value, Mapping) and value.get("value"):
                out.append(
                    Key(kind, str(value["value"]), str(value.get("namespace") or "")).normalised()
                )
        return tuple(out)

    @property
    def correlating_keys(self) -> tuple[Key, ...]:
        """Keys from ``correlate.*`` only (an appointment id is a key only once linked)."""
        return tuple(k for k in self.keys() if f"correlate.{k.kind.value}" in self.fields)


class Outcome(StrEnum):
    """What normalisation decided for a message; also its status in the message store."""

    PROCESSED = "processed"  # events emitted (applied, or parked until they correlate)
    IGNORED = "ignored"  # recognised as not referral traffic, by a named rule
    MAPPING_ERROR = "mapping_error"  # stored with diagnostics, replayable after a fix


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding about a message. Never carries a field's value (PHI stays in the store)."""

    code: str  # required_value_missing, unmapped_code, timezone_assumed, no_mapping …
    message: str
    rule: str = ""
    field: str = ""
    path: str = ""
    severity: str = "error"  # error | warning | info

    def as_dict(self) -> dict[str, str]:
        out = {"code": self.code, "severity": self.severity, "message": self.message}
        for name in ("rule", "field", "path"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Normalised:
    """The pure result of normalising one message with one mapping set."""

    outcome: Outcome
    events: tuple[CanonicalEvent, ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()
    mapping_id: str = ""
    mapping_digest: str = ""
    rule_id: str = ""  # IGNORED: the rule that ignored it; MAPPING_ERROR: the rule that failed
    clues: Mapping[str, str] = field(default_factory=dict)  # patient token etc. for heuristics
    fired: tuple[str, ...] = ()  # every rule whose condition held, even if it then failed


_EVENT_NAMESPACE = uuid.UUID("6f1d3c1e-5b8e-4a53-9b1c-2f0f6f1a7e42")


def event_id(message_id: int, event: CanonicalEvent) -> str:
    """A stable id for an event: the same message normalised again yields the same ids,
    so replay never appends a duplicate (the event log ignores an id it already has)."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{message_id}/{event.ordinal}/{event.type.value}"))
