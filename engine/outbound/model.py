"""The outbound vocabulary (pure): who we send to, what triggers a delivery, what to render.

Data flow: an event is applied (normaliser or dispatcher) → :func:`engine.outbound.routing`
turns the :class:`Trigger` into :class:`DeliveryRequest` rows of the outbox, in the same
transaction → the dispatcher claims a row, builds a :class:`PacketContext`, renders it
with the row's ``format`` (:mod:`engine.outbound.packets`) into a :class:`Rendered`, and
hands that to the channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.domain.referral import Event, State


class RenderError(Exception):
    """The payload cannot be built or does not validate: a permanent delivery failure.
    The reason names what is missing or wrong (a field, a segment), never a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Party:
    """An application/facility pair: MSH-3/4 (us) or MSH-5/6 (them)."""

    application: str = "REFLOOP"
    facility: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how a delivery goes: a configured channel, a payload format, an address."""

    channel: str  # a [channels.<name>] of engine.toml
    format: str  # a key of engine.outbound.packets.RENDERERS (hl7v2.ref_i12, document.pdf …)
    endpoint: str = ""  # channel-specific address (host:port, e-mail, fax number, URL)


@dataclass(frozen=True, slots=True)
class Specialist:
    """One entry of the specialist directory (``mappings/directory/``)."""

    id: str
    name: str  # organisation or practice name
    targets: tuple[Target, ...]  # how they take packets, in preference order
    npi: str = ""
    provider_names: tuple[str, ...] = ()  # clinicians, "Family, Given"
    specialties: tuple[str, ...] = ()  # canonical specialty codes (cardiology, ...)
    accepted_plans: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    receiver: Party = field(default_factory=Party)  # MSH-5/6 of packets to them
    active: bool = True


@dataclass(frozen=True, slots=True)
class ReferralView:
    """The referral as the projection holds it (``referrals.data``: fields by group:
    ``referral``, ``appointment``, ``consult_note``, ``authorization`` …)."""

    id: str
    state: State
    created_at: datetime
    updated_at: datetime
    data: Mapping[str, Mapping[str, Any]]

    def get(self, group: str, name: str) -> Any:
        return self.data.get(group, {}).get(name)


@dataclass(frozen=True, slots=True)
class TriggerEvent:
    """The event a delivery was made for, as the event log holds it."""

    id: str
    type: Event
    fields: Mapping[str, Any]
    occurred_at: datetime
    sequence: int
    state_before: State | None
    state_after: State | None
    message_id: int | None = None


@dataclass(frozen=True, slots=True)
class Trigger:
    """What routing looks at: one applied event and the referral right after it."""

    event: TriggerEvent
    referral: ReferralView
    source: str  # the listener (or FHIR source) the referral came from
    message_source: str = ""  # the listener this event's message arrived on


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    """One delivery routing decided on; becomes an outbox row."""

    key: str  # idempotency key: deterministic from the event and the route
    route_id: str
    kind: str  # "packet" | "writeback" | "notification"
    channel: str
    format: str
    endpoint: str = ""
    recipient_id: str = ""  # directory id (packets)
    receiver: Party = field(default_factory=Party)


@dataclass(frozen=True, slots=True)
class PacketContext:
    """Everything a renderer may read. Renderers are pure: no clock, no I/O."""

    delivery_id: int
    idempotency_key: str
    control_id: str  # MSH-10 for HL7 payloads: stable for the delivery, at most 20 chars
    now: datetime  # aware; when the payload is rendered (MSH-7)
    referral: ReferralView
    event: TriggerEvent
    sender: Party  # us (MSH-3/4)
    receiver: Party  # them (MSH-5/6)
    recipient: Specialist | None = None  # packets: the specialist it goes to
    # Source messages, as text: "order" — the message that created the referral;
    # "trigger" — the trigger event's message (the SIU, the ORU with the note). HL7 v2
    # ER7 with \r segment ends; absent when the referral came from elsewhere.
    sources: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)  # route options


@dataclass(frozen=True, slots=True)
class Rendered:
    payload: bytes
    content_type: str  # one of channels.base.CONTENT_TYPES
    metadata: Mapping[str, str] = field(default_factory=dict)  # control_id, subject, …
