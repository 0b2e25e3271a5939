"""FHIR subscription notifications and Subscription resources (pure).

Theory of operation
-------------------
A FHIR source's server tells us about changes in one of three shapes, and
:func:`classify` turns each into one :class:`Notification`:

* **R4 core rest-hook** (criteria-based Subscription): the changed resource itself,
  ``PUT {endpoint}/{type}/{id}`` (update style) or ``POST {endpoint}``, or an empty
  ``POST`` when the Subscription asked for no payload (a ping that names nothing).
  R4 core has no event numbers, so nothing can be said about gaps.
* **R4 Subscriptions Backport IG** (topic-based): a ``history`` Bundle whose first entry
  is a ``Parameters`` resource (profile backport-subscription-status-r4) holding the
  notification's type (handshake, heartbeat, event-notification, query-status,
  query-event), the subscription, its topic, ``events-since-subscription-start`` and one
  ``notification-event`` per event (event-number, timestamp, focus, additional-context);
  the focus resources follow as entries (full-resource), as entries without a resource
  (id-only) or not at all (empty).
* **pre-standard drafts** of the IG (the Argonaut draft, and athenahealth's platform)
  put an R5-style ``SubscriptionStatus`` resource first instead; the same facts, in
  camelCase elements.

What refloop does with a notification depends on its :attr:`Notification.payload`:
included resources are stored; an id-only focus is read back from the source's server;
an empty event means "something matching changed": a search by ``_lastUpdated``.

Gap detection is :func:`missing_events`: Backport event numbers count up from 1 per
subscription, so given the last number seen, the numbers a notification skips are the
events that never reached us (a failed delivery the server gave up on, a notification
lost in transit). A heartbeat or handshake carries the count too, so a quiet
subscription that missed its only event is noticed at its next heartbeat.
:func:`next_last_seen` is what to remember afterwards.

Reasons in :class:`NotificationError` name an element path, never a value: they go
back to the sender in an OperationOutcome and into logs.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from engine.protocol.fhir import FHIR_JSON, is_id

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
SUBSCRIPTION_PROFILE = f"{BACKPORT}/backport-subscription"
STATUS_PROFILE = f"{BACKPORT}/backport-subscription-status-r4"
EXT_FILTER = f"{BACKPORT}/backport-filter-criteria"
EXT_CONTENT = f"{BACKPORT}/backport-payload-content"
EXT_HEARTBEAT = f"{BACKPORT}/backport-heartbeat-period"
#: Marks the Subscriptions refloop keeps on a server (``meta.tag``), so a create that
#: lost its answer is found again by ``_tag`` instead of being made twice.
TAG_SYSTEM = "urn:refloop:subscription"
#: The header each of our Subscriptions sends back, naming which of a source's
#: Subscriptions a notification belongs to (R4 core notifications do not say).
KEY_HEADER = "X-Refloop-Subscription"

NotificationType = Literal[
    "handshake", "heartbeat", "event-notification", "query-status", "query-event"
]
PayloadKind = Literal["full-resource", "id-only", "empty"]
Style = Literal["rest-hook", "backport", "backport-draft"]
NOTIFICATION_TYPES: tuple[NotificationType, ...] = (
    "handshake",
    "heartbeat",
    "event-notification",
    "query-status",
    "query-event",
)
#: At most this many missing numbers are listed; a larger gap is reconciled the same way.
MAX_LISTED_GAP = 1000

_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
# [base/]Type/id[/_history/vid]
_REFERENCE = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
_NUMBER = re.compile(r"[0-9]{1,18}")


class NotificationError(ValueError):
    """Not a notification we can read; ``expression`` is the FHIRPath of the problem."""

    def __init__(self, reason: str, expression: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expression = expression


@dataclass(frozen=True, slots=True)
class Reference:
    """A resource named by type and logical id (any base and version dropped)."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}/{self.id}"


def parse_reference(value: object) -> Reference | None:
    """``Type/id`` of a relative or absolute reference (``_history`` dropped); None when
    it names no resource by id (a ``urn:uuid``, a search, a proprietary endpoint)."""
    if not isinstance(value, str) or value.startswith(("urn:", "#")):
        return None
    found = _REFERENCE.search(value.split("?", 1)[0].rstrip("/"))
    return Reference(found.group(1), found.group(2)) if found else None


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    number: int | None  # None: not sent, or not a number
    timestamp: str | None
    focus: Reference | None
    resource: Mapping[str, Any] | None  # the focus resource, when the notification carries it
    context: tuple[Reference, ...] = ()


@dataclass(frozen=True, slots=True)
class Notification:
    style: Style
    type: NotificationType
    payload: PayloadKind
    subscription: Reference | None = None
    topic: str | None = None
    status: str | None = None  # the Subscription's status as the server reports it
    events_since_start: int | None = None
    events: tuple[NotificationEvent, ...] = ()
    # Every resource the notification carries (focus and additional context), in order.
    resources: tuple[Mapping[str, Any], ...] = ()

    @property
    def read_backs(self) -> tuple[Reference, ...]:
        """Focus resources named but not included (id-only): read them from the server."""
        out = [e.focus for e in self.events if e.focus is not None and e.resource is None]
        return tuple(dict.fromkeys(out))

    @property
    def needs_search(self) -> bool:
        """Something changed but the notification names nothing: search for it."""
        if self.type != "event-notification":
            return False
        return not self.events or any(e.focus is None for e in self.events)


# -- classification ---------------------------------------------------------------------


def ping() -> Notification:
    """An empty R4 rest-hook POST: a change matched, and that is all it says."""
    return Notification(style="rest-hook", type="event-notification", payload="empty")


def classify(
    body: Any, *, path_type: str | None = None, path_id: str | None = None
) -> Notification:
    """A parsed notification body (None: the request had no body).

    ``path_type``/``path_id`` come from ``PUT|POST {endpoint}/{type}/{id}``. Raises
    :class:`NotificationError` when the body cannot be one."""
    if path_type is not None or path_id is not None:
        return _update(body, path_type or "", path_id or "")
    if body is None:
        return ping()
    if not isinstance(body, Mapping):
        raise NotificationError("the body is not a JSON object (a FHIR resource)", "$this")
    rtype = body.get("resourceType")
    if not isinstance(rtype, str) or not _TYPE.fullmatch(rtype):
        raise NotificationError("the body has no valid resourceType", "resourceType")
    if rtype == "Bundle" and body.get("type") == "history":
        first = _first_resource(body)
        if first is not None and first.get("resourceType") in ("Parameters", "SubscriptionStatus"):
            return _backport(body, first)
    if rtype in ("Parameters", "SubscriptionStatus"):
        raise NotificationError(
            f"a bare {rtype} is not a notification; send it as entry[0] of a history Bundle",
            rtype,
        )
    return _full_resource(body)


def _update(body: Any, path_type: str, path_id: str) -> Notification:
    if not _TYPE.fullmatch(path_type) or not is_id(path_id):
        raise NotificationError("the URL does not end in {type}/{id}", "$this")
    focus = Reference(path_type, path_id)
    if body is None:
        # Named but not sent: read it back, as for a Backport id-only event.
        return Notification(
            style="rest-hook",
            type="event-notification",
            payload="id-only",
            events=(NotificationEvent(None, None, focus, None),),
        )
    if not isinstance(body, Mapping):
        raise NotificationError("the body is not a JSON object (a FHIR resource)", "$this")
    if body.get("resourceType") != path_type:
        raise NotificationError(f"the body is not a {path_type} (the URL's type)", "resourceType")
    if body.get("id") != path_id:
        raise NotificationError(f"{path_type}.id does not match the URL's id", f"{path_type}.id")
    return _full_resource(body)


def _full_resource(body: Mapping[str, Any]) -> Notification:
    rid = body.get("id")
    focus = Reference(str(body["resourceType"]), rid) if isinstance(rid, str) and rid else None
    return Notification(
        style="rest-hook",
        type="event-notification",
        payload="full-resource",
        events=(NotificationEvent(None, None, focus, body),),
        resources=(body,),
    )


def _first_resource(bundle: Mapping[str, Any]) -> Mapping[str, Any] | None:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], Mapping):
        return None
    first = entries[0].get("resource")
    return first if isinstance(first, Mapping) else None


def _backport(bundle: Mapping[str, Any], status: Mapping[str, Any]) -> Notification:
    where = "Bundle.entry[0].resource"
    if status.get("resourceType") == "Parameters":
        facts = _parameters(status, where)
        style: Style = "backport"
    else:
        facts = _subscription_status(status, where)
        style = "backport-draft"
    included, by_url = _included(bundle)
    events = tuple(
        NotificationEvent(
            number=e.number,
            timestamp=e.timestamp,
            focus=e.focus,
            resource=_match(e.focus, e.focus_url, included, by_url),
            context=e.context,
        )
        for e in facts.events
    )
    return Notification(
        style=style,
        type=facts.type,
        payload=_payload_kind(facts.type, events),
        subscription=facts.subscription,
        topic=facts.topic,
        status=facts.status,
        events_since_start=facts.events_since_start,
        events=events,
        resources=tuple(r for _, r in included),
    )


def _payload_kind(ntype: str, events: Sequence[NotificationEvent]) -> PayloadKind:
    focused = [e for e in events if e.focus is not None]
    if ntype not in ("event-notification", "query-event") or not focused:
        return "empty"
    return "full-resource" if all(e.resource is not None for e in focused) else "id-only"


def _included(
    bundle: Mapping[str, Any],
) -> tuple[list[tuple[Reference | None, Mapping[str, Any]]], dict[str, Mapping[str, Any]]]:
    out: list[tuple[Reference | None, Mapping[str, Any]]] = []
    by_url: dict[str, Mapping[str, Any]] = {}
    for entry in (bundle.get("entry") or [])[1:]:
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
            continue  # id-only entries name the focus in fullUrl and carry nothing
        rid = resource.get("id")
        ref = Reference(resource["resourceType"], rid) if isinstance(rid, str) and rid else None
        out.append((ref, resource))
        url = entry.get("fullUrl")
        if isinstance(url, str):
            by_url[url] = resource
    return out, by_url


def _match(
    focus: Reference | None,
    focus_url: str | None,
    included: Sequence[tuple[Reference | None, Mapping[str, Any]]],
    by_url: Mapping[str, Mapping[str, Any]],
) -> Mapping[str, Any] | None:
    if focus is None:
        return None
    if focus_url and focus_url in by_url:
        return by_url[focus_url]
    return next((r for ref, r in included if ref == focus), None)


@dataclass(frozen=True, slots=True)
class _Event:
    number: int | None
    timestamp: str | None
    focus: Reference | None
    focus_url: str | None
    context: tuple[Reference, ...]


@dataclass(frozen=True, slots=True)
class _Facts:
    type: NotificationType
    subscription: Reference | None
    topic: str | None
    status: str | None
    events_since_start: int | None
    events: tuple[_Event, ...]


def _name(value: object) -> str:
    # The IG names parameters in kebab-case; early servers sent camelCase.
    return (
        re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), value)
        if isinstance(value, str)
        else ""
    )


def _value(part: Mapping[str, Any]) -> Any:
    return next((v for k, v in part.items() if k.startswith("value")), None)


def _reference_value(value: Any) -> tuple[Reference | None, str | None]:
    raw = value.get("reference") if isinstance(value, Mapping) else None
    return parse_reference(raw), raw if isinstance(raw, str) else None


def _number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _type(value: Any, where: str) -> NotificationType:
    for known in NOTIFICATION_TYPES:
        if value == known:
            return known
    raise NotificationError(
        "the SubscriptionStatus has no notification type (handshake, heartbeat, "
        "event-notification, query-status or query-event)",
        where,
    )


def _parameters(status: Mapping[str, Any], where: str) -> _Facts:
    params = status.get("parameter")
    if not isinstance(params, list):
        raise NotificationError("the Parameters resource has no parameter", f"{where}.parameter")
    found: dict[str, Any] = {}
    events: list[_Event] = []
    for index, param in enumerate(params):
        if not isinstance(param, Mapping):
            continue
        name = _name(param.get("name"))
        if name == "notification-event":
            events.append(_parameters_event(param, f"{where}.parameter[{index}]"))
        elif name and name not in found:
            found[name] = _value(param)
    if "type" not in found and "subscription" not in found:
        raise NotificationError(
            "entry[0] is a Parameters resource but not a SubscriptionStatus "
            f"(profile {STATUS_PROFILE})",
            where,
        )
    topic = found.get("topic")
    status_code = found.get("status")
    return _Facts(
        type=_type(found.get("type"), f"{where}.parameter.type"),
        subscription=_reference_value(found.get("subscription"))[0],
        topic=topic if isinstance(topic, str) else None,
        status=status_code if isinstance(status_code, str) else None,
        events_since_start=_number(found.get("events-since-subscription-start")),
        events=tuple(events),
    )


def _parameters_event(param: Mapping[str, Any], where: str) -> _Event:
    number: int | None = None
    timestamp: str | None = None
    focus: Reference | None = None
    focus_url: str | None = None
    context: list[Reference] = []
    for part in param.get("part") or []:
        if not isinstance(part, Mapping):
            continue
        name = _name(part.get("name"))
        value = _value(part)
        if name == "event-number":
            number = _number(value)
        elif name == "timestamp" and isinstance(value, str):
            timestamp = value
        elif name == "focus":
            focus, focus_url = _reference_value(value)
        elif name == "additional-context":
            ref = _reference_value(value)[0]
            if ref is not None:
                context.append(ref)
    return _Event(number, timestamp, focus, focus_url, tuple(context))


def _subscription_status(status: Mapping[str, Any], where: str) -> _Facts:
    events: list[_Event] = []
    for item in status.get("notificationEvent") or []:
        if not isinstance(item, Mapping):
            continue
        focus, focus_url = _reference_value(item.get("focus"))
        timestamp = item.get("timestamp")
        context = tuple(
            ref
            for ref in (_reference_value(c)[0] for c in item.get("additionalContext") or [])
            if ref is not None
        )
        events.append(
            _Event(
                _number(item.get("eventNumber")),
                timestamp if isinstance(timestamp, str) else None,
                focus,
                focus_url,
                context,
            )
        )
    topic = status.get("topic")
    code = status.get("status")
    return _Facts(
        type=_type(status.get("type"), f"{where}.type"),
        subscription=_reference_value(status.get("subscription"))[0],
        topic=topic if isinstance(topic, str) else None,
        status=code if isinstance(code, str) else None,
        events_since_start=_number(status.get("eventsSinceSubscriptionStart")),
        events=tuple(events),
    )


def status_results(bundle: Any) -> tuple[Notification, ...]:
    """The SubscriptionStatus resources of a ``$status`` answer (a searchset Bundle).

    Each comes back as a ``query-status`` :class:`Notification` whatever type the server
    wrote into it: a status report is not a delivery, so it carries no events to act on,
    only the count (for :func:`missing_events`) and the Subscription's status."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("a $status answer is a Bundle", "$this")
    out: list[Notification] = []
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping):
            continue
        where = f"Bundle.entry[{index}].resource"
        kind = resource.get("resourceType")
        if kind == "Parameters":
            facts = _parameters(resource, where)
            style: Style = "backport"
        elif kind == "SubscriptionStatus":
            facts = _subscription_status(resource, where)
            style = "backport-draft"
        else:
            continue
        out.append(
            Notification(
                style=style,
                type="query-status",
                payload="empty",
                subscription=facts.subscription,
                topic=facts.topic,
                status=facts.status,
                events_since_start=facts.events_since_start,
            )
        )
    return tuple(out)


# -- gaps -------------------------------------------------------------------------------


def _highest(notification: Notification) -> int | None:
    numbers = [e.number for e in notification.events if e.number is not None]
    if notification.events_since_start is not None:
        numbers.append(notification.events_since_start)
    return max(numbers) if numbers else None


def missing_events(last_seen: int | None, notification: Notification) -> tuple[int, ...]:
    """The event numbers between ``last_seen`` and this notification that never came.

    Nothing is missing without a baseline (the first contact sets it), nor when the
    numbers go down (a redelivery of older events). At most :data:`MAX_LISTED_GAP`
    numbers are listed."""
    high = _highest(notification)
    if last_seen is None or high is None or high <= last_seen:
        return ()
    here = {e.number for e in notification.events}
    out: list[int] = []
    for n in range(last_seen + 1, high + 1):
        if n not in here:
            out.append(n)
            if len(out) >= MAX_LISTED_GAP:
                break
    return tuple(out)


def next_last_seen(last_seen: int | None, notification: Notification) -> int | None:
    """The event number to remember after handling ``notification``.

    A handshake starts (or restarts) the count: a Subscription the server recreated under
    the same id may count from 0 again."""
    high = _highest(notification)
    if high is None:
        return last_seen
    if last_seen is None or notification.type == "handshake":
        return high
    return max(last_seen, high)


# -- searches and Subscriptions ---------------------------------------------------------


def instant(value: datetime) -> str:
    """A FHIR instant in UTC, to the second (rounded down, so ``ge`` loses nothing)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def search_of(resource: str, criteria: str | None, filter: str | None) -> str:
    """``Type?params`` naming what a Subscription watches: its criteria (R4 core), its
    topic filter (Backport; ``Type?params`` or bare ``params``), or the whole type."""
    text = (criteria or filter or "").strip()
    if not text:
        return f"{resource}?"
    if "?" in text:
        head, _, query = text.partition("?")
        return f"{head or resource}?{query}"
    if "=" in text:
        return f"{resource}?{text}"
    return f"{text}?"


def reconcile_request(search: str, since: datetime) -> tuple[str, list[tuple[str, str]]]:
    """The path and query of a reconciliation search: ``search`` limited to resources
    changed since ``since`` (``_lastUpdated=ge…``), oldest first."""
    head, _, query = search.partition("?")
    if not _TYPE.fullmatch(head):
        raise ValueError(f"not a search on a resource type: {head!r}")
    params = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
        if k not in ("_lastUpdated", "_count", "_sort")
    ]
    params += [("_lastUpdated", f"ge{instant(since)}"), ("_sort", "_lastUpdated")]
    return head, params


def subscription_resource(
    *,
    key: str,
    resource: str,
    endpoint: str,
    headers: Sequence[str],
    criteria: str | None = None,
    topic: str | None = None,
    filter: str | None = None,
    payload: PayloadKind = "full-resource",
    heartbeat_seconds: int | None = None,
    status: str = "requested",
) -> dict[str, Any]:
    """The Subscription refloop asks a source's server to keep.

    With a ``topic``: R4 Backport (topic canonical as criteria, filter, payload content
    and heartbeat period as the IG's extensions). Otherwise R4 core criteria-based: a
    payload MIME type means full resource, none an empty ping (R4 core has no id-only;
    an id-only spec is sent as a ping, and the change is found by search)."""
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if headers:
        channel["header"] = list(headers)
    sub: dict[str, Any] = {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": key}]},
        "status": status,
        "reason": f"refloop: {resource} changes for closed-loop referrals",
        "channel": channel,
    }
    if topic:
        sub["meta"]["profile"] = [SUBSCRIPTION_PROFILE]
        sub["criteria"] = topic
        if filter:
            sub["_criteria"] = {"extension": [{"url": EXT_FILTER, "valueString": filter}]}
        channel["payload"] = FHIR_JSON
        channel["_payload"] = {"extension": [{"url": EXT_CONTENT, "valueCode": payload}]}
        if heartbeat_seconds:
            channel["extension"] = [{"url": EXT_HEARTBEAT, "valueUnsignedInt": heartbeat_seconds}]
    else:
        sub["criteria"] = search_of(resource, criteria, None)
        if payload == "full-resource":
            channel["payload"] = FHIR_JSON
    return sub


def subscription_status(resource: Any) -> str | None:
    """``Subscription.status`` of a read-back Subscription, when it is one."""
    if isinstance(resource, Mapping) and resource.get("resourceType") == "Subscription":
        value = resource.get("status")
        return value if isinstance(value, str) else None
    return None


def next_link(bundle: Any) -> str | None:
    """The ``next`` page of a searchset Bundle."""
    if not isinstance(bundle, Mapping):
        return None
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next":
            url = link.get("url")
            return url if isinstance(url, str) and url else None
    return None


def search_matches(bundle: Any) -> list[Mapping[str, Any]]:
    """The matched resources of a searchset page (``_include``d ones left out)."""
    if not isinstance(bundle, Mapping):
        return []
    out = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        search = entry.get("search")
        mode = search.get("mode", "match") if isinstance(search, Mapping) else "match"
        if isinstance(resource, Mapping) and mode == "match":
            out.append(resource)
    return out
