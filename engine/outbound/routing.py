"""Outbound routing: which deliveries an applied event causes (pure, deterministic).

Theory of operation
-------------------
Analysts write three kinds of file under the mappings folder:

* ``outbound/*.yaml`` with ``schema: referral-routes/v1`` — routes: *on* these events,
  *when* the referral looks like this, *send* a packet / write-back / notification *to*
  the recipient (a specialist of the directory) or the source (the system the referral
  came from);
* ``outbound/*.yaml`` with ``schema: referral-writeback/v1`` — per source (a listener
  name): the channel, formats and MSH-5/6 receiver its status updates go back with;
* ``directory/*.yaml|*.csv`` — the specialists (:mod:`engine.outbound.directory`).

:func:`load_outbound` reads and checks them all at once, collecting every error as
``file:line:column: message``, and compiles them into an :class:`Outbound` whose
:meth:`Outbound.route` turns a :class:`Trigger` into :class:`DeliveryRequest` rows.

Routes are tried in file order and every matching route yields its deliveries; a route
that matches but cannot be delivered (no specialist, no write-back for the source) is an
:class:`Unrouted` with a reason naming configuration only, never patient data.

``to: recipient`` asks the directory (:meth:`Directory.choose`): the named recipient,
else by specialty, in network for the referral's ``insurance.plan``, nearest its
``location`` first. When nobody can take it the :class:`Unrouted` carries a ``code``
(``no_specialist``, ``no_in_network_specialist``, ``declined_no_alternative``), also at
the end of its reason as ``[code]``, which the pipeline turns into a worklist item. A
named recipient passed over for another (out of network, already tried) is a *warning*
``Unrouted`` beside the delivery: said, not an exception.

A ``referral.declined`` trigger routes away from whoever declined: the directory ids in
the referral's ``routing.tried`` (the pipeline keeps that list on each decline), the
last ``delivery.recipient`` and the named recipient are left out, so the route on
``referral.declined`` sends the packet to the next candidate — or, with none left, a
``declined_no_alternative`` item.

Each delivery's idempotency key is a UUID 5 of the event id, the route id and the
target's position (``source`` for the source), so routing a replayed event again yields
the same keys and the outbox keeps one row. Channel names are checked against
``engine.toml`` only where something can actually be sent: enabled routes, active
specialists and enabled write-backs. That lets the shipped examples name channels a
fresh install does not define yet.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine.domain.referral import Event, State
from engine.mapping.checker import hint
from engine.mapping.source import Document, KeyPath, SourceError, loads
from engine.outbound.directory import (
    DECLINED_NO_ALTERNATIVE,
    NO_IN_NETWORK,
    NO_SPECIALIST,
    YAML_SUFFIXES,
    Checker,
    Choice,
    Directory,
    OutboundError,
    read_directory,
)
from engine.outbound.model import DeliveryRequest, Party, Specialist, Trigger

__all__ = [
    "EMPTY",
    "NAMESPACE",
    "TRIED_FIELD",
    "Outbound",
    "OutboundError",
    "Route",
    "Routed",
    "Unrouted",
    "When",
    "WritebackTarget",
    "delivery_key",
    "load_outbound",
    "unrouted_code",
]

ROUTES_SCHEMA = "referral-routes/v1"
WRITEBACK_SCHEMA = "referral-writeback/v1"
OUTBOUND_DIR = "outbound"
DIRECTORY_DIR = "directory"

ROUTE_KEYS = (
    "id",
    "description",
    "on",
    "when",
    "send",
    "to",
    "targets",
    "format",
    "channel",
    "endpoint",
    "options",
    "enabled",
)
#: Renderer options a route may set (PacketContext.options), each with what it does.
ROUTE_OPTIONS = {
    "profile": "hl7v2.omg_o19: 360X sets MSH-21 360X, MSH-15/16 NE",
    "identifier_system": "fhir.*: the system of refloop's referral identifier",
    "placer_system": "fhir.*: the system of the placer order number",
    "service_request_status": "fhir.status_update: off leaves ServiceRequest.status alone",
    "page": "document.pdf: Letter (default) or A4",
}
WHEN_KEYS = ("state", "state_before", "specialty", "priority", "source", "recipient")
SENDS = ("packet", "writeback", "notification")
TOS = ("recipient", "source")
TARGET_CHOICES = ("all", "first")
WRITEBACK_KEYS = (
    "description",
    "enabled",
    "channel",
    "endpoint",
    "status_format",
    "note_format",
    "receiver",
    "events",
)
#: ``state_before: new`` — the event created the referral (there was no state before).
NEW = "new"
NOTE_EVENTS = frozenset({Event.CONSULT_NOTE_RECEIVED, Event.CONSULT_NOTE_AMENDED})
EVENTS = tuple(e.value for e in Event)
STATES = tuple(s.value for s in State)

#: Fixed forever: changing it would re-key (and so re-send) every replayed delivery.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://refloop.dev/outbound/delivery")

_ROUTE_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def delivery_key(event_id: str, route_id: str, part: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{event_id}/{route_id}/{part}"))


@dataclass(frozen=True)
class Unrouted:
    route_id: str
    reason: str  # configuration only, no PHI
    code: str = ""  # a worklist reason when nobody could take the referral (see above)
    warning: bool = False  # said beside a delivery that went (to another specialist)


#: Field of the referral group: directory ids that declined it (kept by the pipeline).
TRIED_FIELD = "routing.tried"
_CODE_SUFFIX = re.compile(r"\[([a-z_]+)\]$")


def unrouted_code(reason: str) -> str | None:
    """The worklist code at the end of an unrouted reason (``… [no_specialist]``)."""
    found = _CODE_SUFFIX.search(reason)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Routed:
    deliveries: tuple[DeliveryRequest, ...]
    unrouted: tuple[Unrouted, ...]


@dataclass(frozen=True)
class When:
    """Filters of a route; None: not filtered. Every given filter must hold."""

    state: frozenset[str] | None = None  # after the event
    state_before: frozenset[str] | None = None  # NEW: there was no referral
    specialty: frozenset[str] | None = None
    priority: frozenset[str] | None = None
    source: frozenset[str] | None = None
    recipient: frozenset[str] | None = None  # directory ids


@dataclass(frozen=True)
class Route:
    id: str
    on: frozenset[Event]
    send: str  # packet | writeback | notification
    to: str  # recipient | source
    when: When = field(default_factory=When)
    targets: str = "all"  # all | first (to: recipient)
    format: str = ""  # overrides
    channel: str = ""
    endpoint: str = ""
    enabled: bool = True
    where: str = ""  # file:line:column of the route
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class WritebackTarget:
    """Where a source's status updates go back (``referral-writeback/v1``)."""

    source: str
    channel: str
    status_format: str
    note_format: str  # consult_note.* events; defaults to status_format
    endpoint: str = ""
    receiver: Party = field(default_factory=lambda: Party(application="", facility=""))
    events: frozenset[Event] | None = None  # None: every event a route sends back
    enabled: bool = True
    where: str = ""

    def format_for(self, event: Event) -> str:
        return self.note_format if event in NOTE_EVENTS else self.status_format


class _Facts:
    """What the filters and deliveries read from one trigger, resolved at most once."""

    def __init__(self, trigger: Trigger, directory: Directory) -> None:
        self.trigger = trigger
        self.directory = directory
        self.identifier = _identifier(_value(trigger, "recipient.identifier"))
        self.specialty = _code(_value(trigger, "specialty"))
        self.priority = _code(_value(trigger, "priority"))
        # Only the order's own plan and location: an appointment's location is not where
        # the patient asked to be seen.
        self.plan = _code(trigger.referral.get("referral", "insurance.plan"))
        self.location = _code(trigger.referral.get("referral", "location"))
        self._choice: Choice | None = None

    def tried(self) -> frozenset[str]:
        """Who declined: only a decline routes away from anyone."""
        if self.trigger.event.type is not Event.REFERRAL_DECLINED:
            return frozenset()
        referral = self.trigger.referral
        listed = referral.get("referral", TRIED_FIELD)
        out = {str(x) for x in listed} if isinstance(listed, list) else set()
        last = referral.get("referral", "delivery.recipient")
        if isinstance(last, str) and last:
            out.add(last)
        if self.identifier:
            named = self.directory.find(self.identifier)
            if named is not None:
                out.add(named.id)
        return frozenset(out)

    @property
    def choice(self) -> Choice:
        if self._choice is None:
            self._choice = self.directory.choose(
                self.identifier,
                self.specialty,
                plan=self.plan,
                location=self.location,
                exclude=self.tried(),
            )
            declined = self.trigger.event.type is Event.REFERRAL_DECLINED
            if declined and self._choice.specialist is None:
                # Whatever else is missing, what a person must decide is where it goes now.
                self._choice = replace(self._choice, code=DECLINED_NO_ALTERNATIVE)
        return self._choice

    @property
    def recipient(self) -> Specialist | None:
        return self.choice.specialist

    def admits(self, when: When) -> bool:
        before = self.trigger.event.state_before
        checks: list[tuple[frozenset[str] | None, str | None]] = [
            # The referral as the trigger shows it: right after the event.
            (when.state, self.trigger.referral.state.value),
            (when.state_before, before.value if before is not None else NEW),
            (when.specialty, self.specialty),
            (when.priority, self.priority),
            (when.source, self.trigger.source),
        ]
        if any(allowed is not None and value not in allowed for allowed, value in checks):
            return False
        if when.recipient is not None:
            found = self.recipient
            return found is not None and found.id in when.recipient
        return True

    def no_recipient(self) -> str:
        choice = self.choice
        code = choice.code or NO_SPECIALIST
        if choice.note:
            named = f" ({choice.note})"
        elif self.identifier:
            named = " (the named recipient is not an active entry)"
        else:
            named = ""
        if not self.specialty:
            text = f"no specialist in the directory for this referral: it has no specialty{named}"
        elif code == NO_IN_NETWORK:
            text = (
                f"no in-network specialist in the directory for specialty {self.specialty}: "
                f"none takes the referral's plan{named}"
            )
        elif code == DECLINED_NO_ALTERNATIVE:
            text = (
                f"no other specialist in the directory for specialty {self.specialty}: "
                f"every candidate declined or was tried{named}"
            )
        else:
            text = f"no specialist in the directory for specialty {self.specialty}{named}"
        return f"{text} [{code}]"


def _value(trigger: Trigger, name: str) -> Any:
    """A projected field, from the ``referral`` group first (as the projection reads it)."""
    data = trigger.referral.data
    for group in ["referral", *(g for g in sorted(data) if g != "referral")]:
        found = data.get(group, {}).get(name)
        if found is not None:
            return found
    return None


def _code(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value.get("code"):
        return str(value["code"])
    return None


def _identifier(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value.get("value"):
        return str(value["value"])
    return None


@dataclass(frozen=True)
class Outbound:
    digest: str  # sha256 of the files, first 16 hex digits
    directory: Directory
    routes: tuple[Route, ...] = ()
    writeback: Mapping[str, WritebackTarget] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[Path, ...] = ()

    def route(self, trigger: Trigger) -> Routed:
        """Every delivery ``trigger`` causes, in route order (pure: no clock, no I/O)."""
        facts = _Facts(trigger, self.directory)
        deliveries: list[DeliveryRequest] = []
        unrouted: list[Unrouted] = []
        for route in self.routes:
            if not route.enabled or trigger.event.type not in route.on:
                continue
            if not facts.admits(route.when):
                continue
            if route.to == "recipient":
                outcome = self._to_recipient(route, facts)
            else:
                outcome = self._to_source(route, trigger)
            if isinstance(outcome, Unrouted):
                unrouted.append(outcome)
            else:
                deliveries.extend(outcome)
                if outcome and route.to == "recipient" and facts.choice.note:
                    unrouted.append(Unrouted(route.id, facts.choice.note, warning=True))
        return Routed(tuple(deliveries), tuple(unrouted))

    def route_named(self, route_id: str, trigger: Trigger) -> Routed:
        """The deliveries of one route, whatever its ``on`` (its ``when`` still holds):
        a policy's ``notify`` step names the route its notice goes by. Unknown or
        disabled: an :class:`Unrouted` saying so."""
        route = next((r for r in self.routes if r.id == route_id), None)
        if route is None or not route.enabled:
            why = "is not defined" if route is None else "is disabled"
            return Routed((), (Unrouted(route_id, f"route {route_id!r} {why}"),))
        facts = _Facts(trigger, self.directory)
        if not facts.admits(route.when):
            return Routed((), ())
        outcome = (
            self._to_recipient(route, facts)
            if route.to == "recipient"
            else self._to_source(route, trigger)
        )
        if isinstance(outcome, Unrouted):
            return Routed((), (outcome,))
        # A notice sent to another specialist than the named one went: no exception.
        return Routed(tuple(outcome), ())

    def _to_recipient(self, route: Route, facts: _Facts) -> list[DeliveryRequest] | Unrouted:
        specialist = facts.recipient
        if specialist is None:
            return Unrouted(route.id, facts.no_recipient(), facts.choice.code or NO_SPECIALIST)
        targets = specialist.targets[:1] if route.targets == "first" else specialist.targets
        out: list[DeliveryRequest] = []
        seen: set[tuple[str, str, str]] = set()
        for index, target in enumerate(targets):
            # An endpoint belongs to its channel: a route that picks another channel
            # does not carry the target's address over to it.
            channel = route.channel or target.channel
            endpoint = route.endpoint or ("" if route.channel else target.endpoint)
            fmt = route.format or target.format
            if (channel, fmt, endpoint) in seen:
                continue  # overrides made two targets the same delivery
            seen.add((channel, fmt, endpoint))
            out.append(
                DeliveryRequest(
                    key=delivery_key(facts.trigger.event.id, route.id, str(index)),
                    route_id=route.id,
                    kind=route.send,
                    channel=channel,
                    format=fmt,
                    endpoint=endpoint,
                    recipient_id=specialist.id,
                    receiver=specialist.receiver,
                )
            )
        return out

    def _to_source(self, route: Route, trigger: Trigger) -> list[DeliveryRequest] | Unrouted:
        entry = self.writeback.get(trigger.source)
        if entry is None:
            return Unrouted(route.id, f"no write-back configured for source {trigger.source!r}")
        if not entry.enabled:
            return Unrouted(route.id, f"write-back for source {trigger.source!r} is disabled")
        event = trigger.event
        if entry.events is not None and event.type not in entry.events:
            return []  # the source chose not to take this event back
        return [
            DeliveryRequest(
                key=delivery_key(event.id, route.id, "source"),
                route_id=route.id,
                kind=route.send,
                channel=route.channel or entry.channel,
                format=route.format or entry.format_for(event.type),
                endpoint=route.endpoint or ("" if route.channel else entry.endpoint),
                receiver=entry.receiver,
            )
        ]

    def channels(self) -> frozenset[str]:
        """Every channel a delivery can go out on: named by an enabled route, a target of
        an active specialist or an enabled write-back (disabled ones are not checked)."""
        return (
            frozenset(r.channel for r in self.routes if r.enabled and r.channel)
            | self.directory.channels()
            | frozenset(w.channel for w in self.writeback.values() if w.enabled)
        )

    def formats(self) -> frozenset[str]:
        """Every format a delivery can carry (the same scope as :meth:`channels`)."""
        return (
            frozenset(r.format for r in self.routes if r.enabled and r.format)
            | self.directory.formats()
            | frozenset(
                f
                for w in self.writeback.values()
                if w.enabled
                for f in (w.status_format, w.note_format)
            )
        )

    def options(self, route_id: str) -> Mapping[str, str]:
        """The renderer options of a route (empty when it no longer exists)."""
        for route in self.routes:
            if route.id == route_id:
                return route.options
        return MappingProxyType({})

    def specialist(self, id: str) -> Specialist | None:
        return self.directory.get(id)


EMPTY = Outbound(digest=hashlib.sha256().hexdigest()[:16], directory=Directory())


# ---- loading ------------------------------------------------------------------------


@dataclass
class _Loading:
    known_formats: Collection[str] | None
    known_channels: Collection[str] | None
    routes: list[Route] = field(default_factory=list)
    route_ids: dict[str, str] = field(default_factory=dict)  # id → where
    writeback: dict[str, WritebackTarget] = field(default_factory=dict)
    # (document, key path, directory id) of every `when: recipient`, checked at the end
    references: list[tuple[Document, KeyPath, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_outbound(
    root: Path,
    *,
    known_formats: Collection[str] | None = None,
    known_channels: Collection[str] | None = None,
) -> Outbound:
    """Read, check and compile ``root/outbound/*.yaml`` and ``root/directory/*``; raises
    :class:`OutboundError` with every problem. Missing folders: no routes, no directory."""
    if not root.is_dir():
        raise OutboundError([f"{root}:1:1: no such mappings directory"])
    digest = hashlib.sha256()
    files: list[Path] = []

    def record(path: Path, raw: bytes) -> None:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + raw + b"\0")
        files.append(path)

    loading = _Loading(known_formats, known_channels)
    folder = root / OUTBOUND_DIR
    paths = sorted(
        p
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.is_file() and not p.name.startswith(".") and p.suffix in YAML_SUFFIXES
    )
    for path in paths:
        raw = path.read_bytes()
        record(path, raw)
        _outbound_file(path, raw, loading)
    directory, errors = read_directory(
        root / DIRECTORY_DIR,
        known_formats=known_formats,
        known_channels=known_channels,
        record=record,
    )
    loading.errors.extend(errors)
    for doc, at, ident in loading.references:
        if directory.get(ident) is None:
            loading.errors.append(str(doc.error(at, f"no specialist {ident!r} in the directory")))
    if loading.errors:
        raise OutboundError(loading.errors)
    return Outbound(
        digest=digest.hexdigest()[:16],
        directory=directory,
        routes=tuple(loading.routes),
        writeback=MappingProxyType(dict(loading.writeback)),
        files=tuple(files),
    )


def _outbound_file(path: Path, raw: bytes, loading: _Loading) -> None:
    try:
        doc = loads(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        loading.errors.append(f"{path}:1:1: not UTF-8 text (byte {exc.start})")
        return
    except SourceError as exc:
        loading.errors.append(str(exc))
        return
    check = Checker(doc)
    schema = check.schema((ROUTES_SCHEMA, WRITEBACK_SCHEMA))
    if schema == ROUTES_SCHEMA:
        check.attempt(_routes, check, loading)
    elif schema == WRITEBACK_SCHEMA:
        check.attempt(_writebacks, check, loading)
    loading.errors.extend(check.errors)


def _routes(check: Checker, loading: _Loading) -> None:
    data = check.mapping(check.doc.data, (), "the file")
    check.known_keys(data, (), ("schema", "routes"))
    for i, item in enumerate(check.items(data.get("routes", []), ("routes",), "routes")):
        route = check.attempt(_route, check, item, ("routes", i), loading)
        if route is None:
            continue
        if route.id in loading.route_ids:
            check.report(
                ("routes", i, "id"),
                f"route id {route.id!r} is also used at {loading.route_ids[route.id]}",
            )
            continue
        loading.route_ids[route.id] = check.where(("routes", i, "id"))
        loading.routes.append(route)


def _route(check: Checker, value: Any, at: KeyPath, loading: _Loading) -> Route:
    data = check.mapping(value, at, "a route")
    check.known_keys(data, at, ROUTE_KEYS)
    check.required(data, at, ("id", "on", "send"), "a route")
    ident = check.text(data["id"], (*at, "id"), "id")
    if not _ROUTE_ID.match(ident):
        check.fail((*at, "id"), "a route id is lower-case letters, digits, '_', '.' and '-'")
    if "description" in data:
        check.text(data["description"], (*at, "description"), "description")
    on = _events(check, data["on"], (*at, "on"))
    send = check.choice(data["send"], (*at, "send"), "send", SENDS)
    enabled = (
        check.flag(data["enabled"], (*at, "enabled"), "enabled") if "enabled" in data else True
    )
    to = _to(check, data, at, send)
    targets = "all"
    if "targets" in data:
        targets = check.choice(data["targets"], (*at, "targets"), "targets", TARGET_CHOICES)
        if to != "recipient":
            check.fail(
                (*at, "targets"),
                "targets chooses among a specialist's targets: it only goes with to: recipient",
            )
    overrides = {k: check.optional(data, k, at) for k in ("format", "channel", "endpoint")}
    if send == "notification" and not overrides["format"]:
        check.fail(at, "a notification names its format (e.g. format: json.event)")
    if overrides["format"]:
        check.name("format", overrides["format"], (*at, "format"), loading.known_formats)
    if overrides["channel"] and enabled:
        check.name("channel", overrides["channel"], (*at, "channel"), loading.known_channels)
    when = _when(check, data["when"], (*at, "when"), loading) if "when" in data else When()
    options: dict[str, str] = {}
    if "options" in data:
        table = check.mapping(data["options"], (*at, "options"), "options")
        check.known_keys(table, (*at, "options"), tuple(ROUTE_OPTIONS))
        options = {
            k: check.text(v, (*at, "options", k), k) for k, v in table.items() if k in ROUTE_OPTIONS
        }
    return Route(
        options=MappingProxyType(options),
        id=ident,
        on=on,
        send=send,
        to=to,
        when=when,
        targets=targets,
        enabled=enabled,
        where=check.where(at),
        **overrides,
    )


def _to(check: Checker, data: dict[str, Any], at: KeyPath, send: str) -> str:
    default = {"packet": "recipient", "writeback": "source"}.get(send)
    if "to" not in data:
        if default is None:
            check.fail(at, "a notification says who it goes to: to: recipient or to: source")
        return default
    to = check.choice(data["to"], (*at, "to"), "to", TOS)
    if send == "packet" and to != "recipient":
        check.fail(
            (*at, "to"),
            "a packet goes to the recipient (to: recipient); to tell the "
            "source, use send: writeback or send: notification",
        )
    if send == "writeback" and to != "source":
        check.fail(
            (*at, "to"),
            "a write-back goes to the source (to: source); to tell the "
            "specialist, use send: notification",
        )
    return to


def _events(check: Checker, value: Any, at: KeyPath) -> frozenset[Event]:
    names = check.texts(value, at, "an event type")
    for i, name in enumerate(names):
        if name not in EVENTS:
            check.fail(
                _item(at, value, i),
                f"unknown event {name!r}{hint(name, EVENTS)}; events are {', '.join(EVENTS)}",
            )
    return frozenset(Event(n) for n in names)


def _item(at: KeyPath, value: Any, i: int) -> KeyPath:
    """Where the i-th name of a `text or list of text` value was written."""
    return (*at, i) if isinstance(value, list) else at


def _when(check: Checker, value: Any, at: KeyPath, loading: _Loading) -> When:
    data = check.mapping(value, at, "when")
    check.known_keys(data, at, WHEN_KEYS)
    sets: dict[str, frozenset[str]] = {}
    for key, raw in data.items():
        where = (*at, key)
        names = check.texts(raw, where, key)
        allowed = {"state": STATES, "state_before": (NEW, *STATES)}.get(key)
        for i, name in enumerate(names):
            if allowed is not None and name not in allowed:
                check.fail(
                    _item(where, raw, i),
                    f"unknown state {name!r}{hint(name, allowed)}; states are {', '.join(allowed)}",
                )
            if key == "recipient":
                loading.references.append((check.doc, _item(where, raw, i), name))
        sets[key] = frozenset(names)
    return When(**sets)


def _writebacks(check: Checker, loading: _Loading) -> None:
    data = check.mapping(check.doc.data, (), "the file")
    check.known_keys(data, (), ("schema", "sources"))
    sources = check.mapping(data.get("sources") or {}, ("sources",), "sources")
    for source, item in sources.items():
        at: KeyPath = ("sources", source)
        entry = check.attempt(_writeback, check, source, item, at, loading)
        if entry is None:
            continue
        if source in loading.writeback:
            check.errors.append(
                str(
                    check.doc.key_error(
                        at,
                        f"source {source!r} already has a write-back at "
                        f"{loading.writeback[source].where}",
                    )
                )
            )
            continue
        loading.writeback[source] = entry


def _writeback(
    check: Checker, source: str, value: Any, at: KeyPath, loading: _Loading
) -> WritebackTarget:
    data = check.mapping(value, at, f"the write-back of {source!r}")
    check.known_keys(data, at, WRITEBACK_KEYS)
    check.required(data, at, ("channel", "status_format"), "a write-back")
    if "description" in data:
        check.text(data["description"], (*at, "description"), "description")
    enabled = (
        check.flag(data["enabled"], (*at, "enabled"), "enabled") if "enabled" in data else True
    )
    channel = check.text(data["channel"], (*at, "channel"), "channel")
    if enabled:
        check.name("channel", channel, (*at, "channel"), loading.known_channels)
    status = check.text(data["status_format"], (*at, "status_format"), "status_format")
    check.name("format", status, (*at, "status_format"), loading.known_formats)
    note = status
    if data.get("note_format") is not None:
        note = check.text(data["note_format"], (*at, "note_format"), "note_format")
        check.name("format", note, (*at, "note_format"), loading.known_formats)
    events = _events(check, data["events"], (*at, "events")) if "events" in data else None
    receiver = (
        check.party(data["receiver"], (*at, "receiver"))
        if data.get("receiver") is not None
        else Party(application="", facility="")
    )
    return WritebackTarget(
        source=source,
        channel=channel,
        status_format=status,
        note_format=note,
        endpoint=check.optional(data, "endpoint", at),
        receiver=receiver,
        events=events,
        enabled=enabled,
        where=f"{check.doc.file}:{_key_where(check.doc, at)}",
    )


def _key_where(doc: Document, at: KeyPath) -> str:
    err = doc.key_error(at, "")
    return f"{err.line}:{err.column}"
