"""The FHIR subscription manager: Subscriptions on the sources' servers, and the work
their notifications leave behind.

Theory of operation
-------------------
**At start**, for each ``[[fhir.sources]]`` with a ``server`` and ``subscriptions``, every
configured Subscription is created on the source's server, or refreshed when we already
know its id there (a PUT of what we want now: the endpoint, a rotated token, the
payload), with ``status = requested`` so the server (re)activates it. R4 core gets a
criteria-based rest-hook; a spec with a ``topic`` gets an R4 Backport topic-based one
(filter, payload content and heartbeat period as the IG's extensions). Its channel
carries two headers the server sends back with every notification: the source's own
bearer token (so notifications authenticate as that source) and ``X-Refloop-Subscription``,
the key of the spec, because an R4 core notification does not say which Subscription it
is for. Each Subscription is tagged (``meta.tag``) with that key, and a create is
conditional on the tag, so a create whose answer was lost is found, not repeated. A
server that cannot be reached at start is logged and tried again by the watchdog.

**Notifications** come in through :mod:`engine.edges.fhir_notify`, which calls
:meth:`SubscriptionManager.prepare` before storing anything and
:meth:`SubscriptionManager.commit` once stored. ``prepare`` finds the subscription's row,
detects gaps in the event numbers (:func:`engine.protocol.fhir_notify.missing_events`) and
writes the follow-ups the notification needs to ``fhir_followups``: a read-back
(``GET {base}/{Type}/{id}``) per id-only focus, a reconciliation search per gap or empty
event. Only then is the notification answered, so the answer can be quick (athenahealth
allows a few seconds) and a crash after it loses nothing. ``commit`` records the event
number and when we last heard from the subscription.

**Follow-ups** are run by a worker task here: each is claimed with a lease, done, and
deleted; one that fails (the server down, 5xx) is postponed with a growing delay, never
dropped. A reconciliation is ``GET {base}/{search}&_lastUpdated=ge{since}``, paged by the
Bundle's ``next`` link (only while it stays on the server's origin, which our token is
for), where ``since`` reaches :data:`SKEW` back before the last event we saw: clocks
differ, and an event is stamped before it is sent. Everything found is offered to intake
(:func:`engine.services.fhir_intake.accept_resources`): what we already hold is a
duplicate there and has no new effects, so looking too far back costs only requests.
Outcomes count in ``refloop_fhir_reconciliations_total{source,outcome}``.

**The heartbeat watchdog** looks every few seconds at each configured subscription: one
not heard from (event, heartbeat or handshake) for longer than its ``heartbeat_seconds``
is logged once as ``fhir.subscription.quiet`` and its status is checked on the server
(``$status`` for Backport, a read for R4 core): a Subscription the server turned to
``error`` or ``off``, or deleted, is requested again, and a ``$status`` count above the
last event number seen is a gap, reconciled like any other.
``refloop_fhir_subscription_last_event_seconds{source}`` is the silence of the source's
quietest subscription. The clock is injected; :meth:`SubscriptionManager.check_heartbeats`
and :meth:`SubscriptionManager.run_due` are the loops' single steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine

from channels._http import async_client, classify_exception, httpx_verify
from channels.base import ChannelContext, ChannelError
from channels.fhir import FhirSettings
from channels.smart import SmartTokenClient
from engine.config import Config, FhirSourceConfig, FhirSubscriptionConfig
from engine.logs import get_logger
from engine.metrics import Metrics
from engine.protocol.fhir import FHIR_JSON, compact
from engine.protocol.fhir_notify import (
    KEY_HEADER,
    TAG_SYSTEM,
    Notification,
    NotificationError,
    Reference,
    missing_events,
    next_last_seen,
    next_link,
    parse_reference,
    reconcile_request,
    search_matches,
    search_of,
    status_results,
    subscription_resource,
    subscription_status,
)
from engine.services.fhir_intake import FhirRejected, accept_resources
from engine.services.writer import GroupCommitWriter
from engine.store import subscriptions as store
from engine.store.subscriptions import Followup, NewFollowup, SubscriptionState

log = get_logger("refloop.fhir.subscriptions")

#: Reconciliation looks this far back before the last event seen (clock skew, and the
#: time between an event and its notification).
SKEW = timedelta(minutes=5)
#: A claimed follow-up is not claimed again for this long (its worker may have died).
LEASE = timedelta(minutes=2)
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 300.0
#: A reconciliation reads at most this many pages (of PAGE_SIZE) per run; the rest is
#: left to a follow-up that starts at the next page.
MAX_PAGES = 200
PAGE_SIZE = 100
#: Statuses after which a server no longer notifies: the Subscription is requested again.
DEAD_STATUSES = frozenset({"error", "off"})
#: Reconciliation outcomes (the ``outcome`` label).
RECONCILE_OUTCOMES = ("ok", "invalid", "error")


def subscription_key(spec: FhirSubscriptionConfig) -> str:
    """Stable per what a spec watches; payload, heartbeat and endpoint changes refresh
    the same Subscription rather than make a new one."""
    what = json.dumps([spec.resource, spec.criteria, spec.topic, spec.filter])
    return "cfg-" + hashlib.sha256(what.encode()).hexdigest()[:24]


def spec_search(spec: FhirSubscriptionConfig) -> str:
    return search_of(spec.resource, spec.criteria, spec.filter)


def heartbeat_period(spec: FhirSubscriptionConfig) -> int:
    """The heartbeat we ask a Backport server for: twice per watchdog period, so one
    late heartbeat does not make a healthy subscription look quiet."""
    return max(1, spec.heartbeat_seconds // 2)


def retry_delay(attempts: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** max(0, attempts - 1)))


class ServerError(Exception):
    """A request to a source's server failed; ``reason`` is safe to log."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SourceServer:
    """HTTP to one source's FHIR server, authenticated as its ``[channels.<name>]`` says
    (none, a bearer token, or SMART Backend Services). Redirects are never followed."""

    def __init__(self, settings: FhirSettings, context: ChannelContext) -> None:
        self.settings = settings
        self.base = settings.base_url.rstrip("/")
        self._context = context
        self._http = async_client(settings.timeout_seconds, self._tls())
        self._http.headers["Accept"] = FHIR_JSON
        self._smart = (
            SmartTokenClient(settings.smart, self._http, context)
            if settings.auth == "smart" and settings.smart is not None
            else None
        )

    def _tls(self) -> ssl.SSLContext | bool:
        if not self.settings.verify:
            return False
        return httpx_verify(self.settings.ca_file, self._context.base_dir)

    @property
    def peer(self) -> str:
        url = httpx.URL(self.base)
        return f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"[:64]

    def same_origin(self, url: str) -> bool:
        """True when ``url`` is under our base: a next link elsewhere would get our token."""
        try:
            there, here = httpx.URL(url), httpx.URL(self.base + "/")
        except httpx.InvalidURL:
            return False
        return (there.scheme, there.host, there.port) == (
            here.scheme,
            here.host,
            here.port,
        ) and there.path.startswith(here.path)

    async def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request; any answer comes back (the caller judges the status). No answer
        at all raises :class:`ServerError`. A SMART token the server refuses is dropped
        and the request tried once more with a fresh one."""
        url = path_or_url if "://" in path_or_url else f"{self.base}/{path_or_url.lstrip('/')}"
        send_headers = dict(headers or {})
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            send_headers["Content-Type"] = FHIR_JSON
        for attempt in (1, 2):
            token = None
            try:
                async with asyncio.timeout(self.settings.timeout_seconds):
                    if self._smart is not None:
                        token = await self._smart.token()
                        send_headers["Authorization"] = f"Bearer {token.value}"
                    elif self.settings.token is not None:
                        bearer = self.settings.token.read(self._context.base_dir)
                        send_headers["Authorization"] = f"Bearer {bearer}"
                    response = await self._http.request(
                        method,
                        url,
                        params=list(params) if params is not None else None,
                        content=content,
                        headers=send_headers,
                    )
            except ChannelError as exc:  # a secret or SMART token we could not get
                raise ServerError(exc.reason) from None
            except (httpx.RequestError, httpx.InvalidURL, TimeoutError) as exc:
                raise ServerError(classify_exception(exc).reason) from None
            if response.status_code == 401 and token is not None and self._smart is not None:
                self._smart.drop(token)
                if attempt == 1:
                    continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content) if response.content else None
    except (ValueError, RecursionError):
        return None


def _issue_codes(exc: FhirRejected) -> str:
    issues = exc.outcome.get("issue") if isinstance(exc.outcome, Mapping) else None
    codes = [i.get("code") for i in issues or [] if isinstance(i, Mapping)]
    return ",".join(sorted({c for c in codes if isinstance(c, str)})) or "invalid"


@dataclass(frozen=True, slots=True)
class Prepared:
    """What :meth:`SubscriptionManager.prepare` decided for one notification."""

    states: tuple[SubscriptionState, ...]  # the subscription(s) it belongs to, if known
    missing: tuple[int, ...]  # event numbers it shows we never got
    followups: int  # read-backs and searches written


@dataclass(slots=True)
class _Watched:
    source: FhirSourceConfig
    spec: FhirSubscriptionConfig
    key: str
    state_id: int | None = None
    quiet: bool = False
    checked_at: datetime | None = None  # the server last asked about it (while quiet)


class SubscriptionManager:
    """Created by the daemon; :meth:`start` after the HTTP server is up (the servers call
    it back at once), :meth:`stop` before the writer stops."""

    WATCH_SECONDS = 5.0
    POLL_SECONDS = 2.0

    def __init__(
        self,
        config: Config,
        engine: Engine,
        writer: GroupCommitWriter,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] | None = None,
        page_size: int = PAGE_SIZE,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.config = config
        self.page_size = page_size
        self.max_pages = max_pages
        self.engine = engine
        self.writer = writer
        self.metrics = metrics
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.base_dir: Path = config.source.parent
        self.sources = {s.name: s for s in config.fhir.sources}
        self.servers: dict[str, SourceServer] = {}
        self._watched = [
            _Watched(source, spec, subscription_key(spec))
            for source in config.fhir.sources
            for spec in source.subscriptions
        ]
        self._heard: dict[int, datetime] = {}  # state id -> last heard (the gauge's input)
        self._started_at = self.clock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle ---------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Create or refresh every configured Subscription, queue a catch-up search for
        the time we were away, and (``background``) start the worker and the watchdog."""
        context = ChannelContext(base_dir=self.base_dir, clock=lambda: self.clock().timestamp())
        for source in self.config.fhir.sources:
            settings = self.config.channels.get(source.server) if source.server else None
            if isinstance(settings, FhirSettings):
                self.servers[source.name] = SourceServer(settings, context)
        self._started_at = self.clock()
        await asyncio.to_thread(self._load)
        for source in self.config.fhir.sources:
            self.metrics.fhir_subscription_last_event.labels(source.name).set_function(
                functools.partial(self.silence, source.name)
            )
            for outcome in RECONCILE_OUTCOMES:
                self.metrics.fhir_reconciliations.labels(source.name, outcome)
        # Together: one unreachable server costs one timeout, not one per Subscription.
        await asyncio.gather(*(self._ensure_on_server(w) for w in self._watched))
        if background:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._work(), name="refloop-fhir-followups"),
                loop.create_task(self._watch(), name="refloop-fhir-watchdog"),
            ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for server in self.servers.values():
            await server.aclose()
        self.servers = {}

    def wake(self) -> None:
        """Follow-ups were written: run them now rather than at the next poll."""
        self._wake.set()

    def _load(self) -> None:
        """The rows of the configured subscriptions, and a catch-up search for each one
        heard from before this start: changes made while refloop was down (or while the
        server had given up on us) were never announced."""
        now = self.clock()
        catch_up = []
        with self.engine.begin() as conn:
            for watched in self._watched:
                state = store.ensure_subscription(
                    conn,
                    watched.source.name,
                    watched.key,
                    now=now,
                    resource=watched.spec.resource,
                    search=spec_search(watched.spec),
                )
                watched.state_id = state.id
                if state.last_heard_at is not None and state.search is not None:
                    catch_up.append(
                        NewFollowup(
                            watched.source.name,
                            "reconcile",
                            state.search,
                            "start",
                            since=self._since(state),
                            subscription_id=state.id,
                        )
                    )
            store.add_followups(conn, catch_up, now)
            for state in store.list_subscriptions(conn):
                if state.last_heard_at is not None:
                    self._heard[state.id] = state.last_heard_at

    # -- Subscriptions on the servers -----------------------------------------------------

    def _channel_headers(self, source: FhirSourceConfig, key: str) -> list[str]:
        headers = [f"{KEY_HEADER}: {key}"]
        token = source.token.read(self.base_dir) if source.token else None
        if token:
            headers.insert(0, f"Authorization: Bearer {token}")
        return headers

    def _desired(self, watched: _Watched) -> dict[str, Any]:
        spec = watched.spec
        assert watched.source.notify_url is not None
        return subscription_resource(
            key=watched.key,
            resource=spec.resource,
            endpoint=watched.source.notify_url,
            headers=self._channel_headers(watched.source, watched.key),
            criteria=spec.criteria,
            topic=spec.topic,
            filter=spec.filter,
            payload=spec.payload,
            heartbeat_seconds=heartbeat_period(spec) if spec.topic else None,
        )

    async def _ensure_on_server(self, watched: _Watched) -> bool:
        """Create or refresh one Subscription; False (logged) when the server said no or
        could not be reached."""
        name = watched.source.name
        server = self.servers.get(name)
        if server is None or watched.state_id is None:
            return False
        if not watched.source.notify_url:
            log.error("fhir.subscription.no_notify_url", source=name, subscription=watched.key)
            return False
        state = await asyncio.to_thread(self._state, watched.state_id)
        desired = self._desired(watched)
        try:
            response = None
            if state is not None and state.server_id:
                desired["id"] = state.server_id
                response = await server.request(
                    "PUT", f"Subscription/{state.server_id}", body=desired
                )
                if response.status_code in (404, 410):
                    desired.pop("id")
                    response = None
            if response is None:
                response = await server.request(
                    "POST",
                    "Subscription",
                    body=desired,
                    headers={"If-None-Exist": f"_tag={TAG_SYSTEM}|{watched.key}"},
                )
        except ServerError as exc:
            log.warning(
                "fhir.subscription.unreachable",
                source=name,
                subscription=watched.key,
                error=exc.reason,
            )
            return False
        if not 200 <= response.status_code < 300:
            log.error(
                "fhir.subscription.refused",
                source=name,
                subscription=watched.key,
                status=response.status_code,
            )
            return False
        body = _json(response)
        server_id = _created_id(response, body) or (state.server_id if state else None)
        status = subscription_status(body) or "requested"
        await asyncio.to_thread(self._set_server, watched.state_id, server_id, status)
        log.info(
            "fhir.subscription.ensured",
            source=name,
            subscription=watched.key,
            server_id=server_id,
            status=status,
        )
        return True

    def _state(self, state_id: int) -> SubscriptionState | None:
        with self.engine.connect() as conn:
            return store.subscription_by_id(conn, state_id)

    def _set_server(self, state_id: int, server_id: str | None, status: str) -> None:
        now = self.clock()
        with self.engine.begin() as conn:
            before = store.subscription_by_id(conn, state_id)
            store.set_server(conn, state_id, server_id=server_id, status=status, now=now)
            if before is not None and before.server_id and before.server_id != server_id:
                # A new Subscription on the server counts from scratch.
                store.restart_count(conn, state_id, None, now)

    async def check_status(self, watched: _Watched) -> str | None:
        """The server's view of one Subscription: refreshed when dead or gone, a gap in
        its ``$status`` count reconciled. Returns the status it reported (None: unknown)."""
        server = self.servers.get(watched.source.name)
        if server is None or watched.state_id is None:
            return None
        state = await asyncio.to_thread(self._state, watched.state_id)
        if state is None or not state.server_id:
            await self._ensure_on_server(watched)
            return None
        try:
            if watched.spec.topic:
                response = await server.request("GET", f"Subscription/{state.server_id}/$status")
            else:
                response = await server.request("GET", f"Subscription/{state.server_id}")
        except ServerError as exc:
            log.warning(
                "fhir.subscription.unreachable",
                source=watched.source.name,
                subscription=watched.key,
                error=exc.reason,
            )
            return None
        if response.status_code in (404, 410):
            status: str | None = "gone"
            count = None
        elif response.status_code != 200:
            return None
        elif watched.spec.topic:
            try:
                found = status_results(_json(response))
            except NotificationError:
                found = ()
            status = found[0].status if found else None
            count = found[0].events_since_start if found else None
        else:
            status, count = subscription_status(_json(response)), None
        gap = False
        if count is not None:
            report = Notification(
                style="backport", type="query-status", payload="empty", events_since_start=count
            )
            gap = bool(missing_events(state.last_event_number, report))
        if status in DEAD_STATUSES or status == "gone":
            log.warning(
                "fhir.subscription.inactive",
                source=watched.source.name,
                subscription=watched.key,
                status=status,
            )
            # Whatever happened while it was dead was never sent.
            gap = await self._ensure_on_server(watched) or gap
        elif status is not None:
            await asyncio.to_thread(self._set_server, state.id, state.server_id, status)
        if gap:
            await asyncio.to_thread(self._queue_gap, state, watched.source.name, "status")
        return status

    def _queue_gap(self, state: SubscriptionState, source: str, reason: str) -> None:
        if not state.search:
            return
        with self.engine.begin() as conn:
            store.add_followups(
                conn,
                [
                    NewFollowup(
                        source,
                        "reconcile",
                        state.search,
                        reason,
                        since=self._since(state),
                        subscription_id=state.id,
                    )
                ],
                self.clock(),
            )
        self.wake()

    # -- notifications (called by the edge) -----------------------------------------------

    def _since(self, state: SubscriptionState) -> datetime:
        anchor = state.last_event_at or state.last_heard_at or state.created_at
        return anchor - SKEW

    async def prepare(self, source: str, note: Notification, *, key: str | None = None) -> Prepared:
        """Before anything is stored or answered: which subscription, which events are
        missing, and the durable follow-ups (read-backs, searches) the notification needs."""
        return await asyncio.to_thread(self._prepare, source, note, key)

    def _prepare(self, source: str, note: Notification, key: str | None) -> Prepared:
        now = self.clock()
        with self.engine.begin() as conn:
            states = self._resolve(conn, source, note, key, now)
            items = [
                NewFollowup(
                    source,
                    "read",
                    str(ref),
                    "id-only",
                    subscription_id=states[0].id if states else None,
                )
                for ref in note.read_backs
            ]
            missing: tuple[int, ...] = ()
            for state in states:
                gap = missing_events(state.last_event_number, note)
                missing = missing or gap
                if gap or note.needs_search:
                    if state.search is None:
                        log.warning(
                            "fhir.notify.unreconcilable",
                            source=source,
                            subscription=state.key,
                            missed=len(gap),
                        )
                        continue
                    items.append(
                        NewFollowup(
                            source,
                            "reconcile",
                            state.search,
                            "gap" if gap else "empty",
                            since=self._since(state),
                            subscription_id=state.id,
                        )
                    )
            if note.needs_search and not states:
                log.warning("fhir.notify.unreconcilable", source=source, subscription=None)
            store.add_followups(conn, items, now)
        if missing:
            log.warning(
                "fhir.subscription.gap",
                source=source,
                subscription=states[0].key if states else None,
                missed=len(missing),
                first_missing=missing[0],
            )
        return Prepared(tuple(states), missing, len(items))

    def _resolve(
        self,
        conn: Any,
        source: str,
        note: Notification,
        key: str | None,
        now: datetime,
    ) -> list[SubscriptionState]:
        server_id = note.subscription.id if note.subscription else None
        if key:
            state = store.get_subscription(conn, source, key)
            if state is not None:
                if server_id and state.server_id is None:
                    # The handshake can overtake the answer to our create.
                    store.set_server(conn, state.id, server_id=server_id, status=None, now=now)
                return [state]
        if server_id:
            found = store.subscription_by_server_id(conn, source, server_id)
            if found is not None:
                return [found]
            # One the source's side set up (a portal, an operator): followed all the same.
            focus = next((e.focus for e in note.events if e.focus is not None), None)
            return [
                store.ensure_subscription(
                    conn,
                    source,
                    f"server:{server_id}",
                    now=now,
                    resource=focus.type if focus else None,
                    search=f"{focus.type}?" if focus else None,
                    server_id=server_id,
                )
            ]
        if note.style != "rest-hook":
            return []
        # An R4 core notification without our header: the source's criteria Subscriptions
        # on the focus's type (every one of them, for a ping that names nothing).
        focus_type = next((e.focus.type for e in note.events if e.focus is not None), None)
        out = []
        for watched in self._watched:
            if watched.source.name != source or watched.spec.topic:
                continue
            if focus_type is not None and watched.spec.resource != focus_type:
                continue
            state = store.get_subscription(conn, source, watched.key)
            if state is not None:
                out.append(state)
        return out

    async def commit(self, note: Notification, prepared: Prepared) -> None:
        """After the notification's rows are stored: remember its event number and that
        the subscription is alive."""
        if not prepared.states:
            return
        now = self.clock()
        await asyncio.to_thread(self._commit, note, prepared, now)
        for state in prepared.states:
            self._heard[state.id] = now
            for watched in self._watched:
                if watched.state_id == state.id and watched.quiet:
                    watched.quiet = False
                    watched.checked_at = None
                    log.info(
                        "fhir.subscription.resumed",
                        source=watched.source.name,
                        subscription=watched.key,
                    )

    def _commit(self, note: Notification, prepared: Prepared, now: datetime) -> None:
        with self.engine.begin() as conn:
            for state in prepared.states:
                store.record_contact(
                    conn,
                    state.id,
                    heard_at=now,
                    event=note.type == "event-notification",
                    number=next_last_seen(state.last_event_number, note),
                    restart=note.type == "handshake",
                    status=note.status,
                )

    # -- the watchdog ---------------------------------------------------------------------

    def silence(self, source: str) -> float:
        """Seconds since the quietest of ``source``'s configured subscriptions was heard
        from (since our start, when never); 0 when it has none."""
        now = self.clock()
        gaps = [
            (now - self._heard.get(w.state_id, self._started_at)).total_seconds()
            for w in self._watched
            if w.source.name == source and w.state_id is not None
        ]
        return max(0.0, *gaps) if gaps else 0.0

    async def check_heartbeats(self) -> list[str]:
        """One watchdog round: the keys of the subscriptions that just went quiet (each
        logged once per quiet spell, and its status checked on the server)."""
        now = self.clock()
        newly: list[str] = []
        for watched in self._watched:
            if watched.state_id is None:
                continue
            heard = self._heard.get(watched.state_id, self._started_at)
            silent = (now - heard).total_seconds()
            period = watched.spec.heartbeat_seconds
            if silent <= period:
                continue
            if not watched.quiet:
                watched.quiet = True
                newly.append(watched.key)
                log.warning(
                    "fhir.subscription.quiet",
                    source=watched.source.name,
                    subscription=watched.key,
                    resource=watched.spec.resource,
                    silent_seconds=int(silent),
                    heartbeat_seconds=period,
                )
            # Asked at once, then once a period while it stays quiet (a server that was
            # down may be back; a create that failed at start is tried again).
            checked = watched.checked_at
            if checked is None or (now - checked).total_seconds() >= period:
                watched.checked_at = now
                await self.check_status(watched)
        return newly

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.WATCH_SECONDS)
            try:
                await self.check_heartbeats()
            except Exception as exc:  # the watchdog must outlive a bad round
                log.error("fhir.watchdog.failed", error=type(exc).__name__)

    # -- follow-ups -----------------------------------------------------------------------

    async def _work(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                while await self.run_due():
                    pass
            except Exception as exc:  # a database outage: try again at the next poll
                log.error("fhir.followups.failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.POLL_SECONDS):
                    await self._wake.wait()

    async def run_due(self) -> int:
        """Run the follow-ups due now; returns how many were claimed."""
        now = self.clock()
        claimed = await asyncio.to_thread(self._claim, now)
        for followup in claimed:
            await self._run(followup)
        return len(claimed)

    def _claim(self, now: datetime) -> list[Followup]:
        with self.engine.begin() as conn:
            return store.claim_followups(conn, now, lease=LEASE)

    async def _run(self, followup: Followup) -> None:
        server = self.servers.get(followup.source)
        source = self.sources.get(followup.source)
        if server is None or source is None:
            # Kept, not dropped: once the source's server is configured it is done.
            await self._postpone(followup, "the source has no FHIR server configured", hours=1)
            return
        try:
            if followup.kind == "read":
                await self._read_back(server, source, followup)
            else:
                await self._reconcile(server, source, followup)
        except ServerError as exc:
            if followup.kind == "reconcile":
                self.metrics.fhir_reconciliations.labels(source.name, "error").inc()
            log.warning(
                "fhir.followup.retry",
                source=source.name,
                kind=followup.kind,
                reason=followup.reason,
                attempts=followup.attempts,
                error=exc.reason,
            )
            await self._postpone(followup, exc.reason)
            return
        await asyncio.to_thread(self._finish, followup.id)

    async def _postpone(self, followup: Followup, error: str, *, hours: float = 0.0) -> None:
        delay = timedelta(hours=hours) if hours else retry_delay(followup.attempts)
        until = self.clock() + delay

        def write() -> None:
            with self.engine.begin() as conn:
                store.postpone_followup(conn, followup.id, until=until, error=error)

        await asyncio.to_thread(write)

    def _finish(self, followup_id: int) -> None:
        with self.engine.begin() as conn:
            store.finish_followup(conn, followup_id)

    async def _read_back(
        self, server: SourceServer, source: FhirSourceConfig, followup: Followup
    ) -> None:
        ref = parse_reference(followup.target)
        if ref is None:
            log.error("fhir.readback.bad_target", source=source.name)
            return
        response = await server.request("GET", f"{ref.type}/{ref.id}")
        status = response.status_code
        if status in (404, 410):
            # Deleted since the event: there is nothing left to store.
            log.info("fhir.readback.gone", source=source.name, resource=ref.type, status=status)
            return
        if status != 200:
            raise ServerError(f"read-back HTTP {status}", status=status)
        resource = _json(response)
        if not _is(resource, ref):
            raise ServerError("read-back answer is not the resource asked for", status=status)
        await self._accept(source, [(resource, response.content)], server.peer, what="readback")

    async def _reconcile(
        self, server: SourceServer, source: FhirSourceConfig, followup: Followup
    ) -> None:
        url: str | None
        query: list[tuple[str, str]] | None
        if "://" in followup.target:
            # The rest of an earlier run: the page it stopped at.
            if not server.same_origin(followup.target):
                log.error("fhir.reconcile.foreign_page", source=source.name)
                return
            url, query = followup.target, None
        else:
            since = followup.since or (self.clock() - SKEW)
            path, params = reconcile_request(followup.target, since)
            url, query = path, [*params, ("_count", str(self.page_size))]
        found = stored = invalid = 0
        pages = 0
        while url is not None and pages < self.max_pages:
            response = await server.request("GET", url, params=query)
            if response.status_code != 200:
                raise ServerError(
                    f"search HTTP {response.status_code}", status=response.status_code
                )
            bundle = _json(response)
            matches = search_matches(bundle)
            found += len(matches)
            for resource in matches:
                ok = await self._accept(
                    source, [(resource, compact(resource))], server.peer, what="reconcile"
                )
                stored += ok
                invalid += not ok
            pages += 1
            link = next_link(bundle)
            url = link if link is not None and server.same_origin(link) else None
            query = None  # a next link carries its own query
        if url is not None:
            # Not a new _lastUpdated bound: many resources can share one second.
            await asyncio.to_thread(self._continue, followup, url)
        outcome = "invalid" if invalid else "ok"
        self.metrics.fhir_reconciliations.labels(source.name, outcome).inc()
        log.info(
            "fhir.reconciled",
            source=source.name,
            reason=followup.reason,
            found=found,
            stored=stored,
            invalid=invalid,
            pages=pages,
            more=url is not None,
        )

    def _continue(self, followup: Followup, page: str) -> None:
        with self.engine.begin() as conn:
            store.add_followups(
                conn,
                [
                    NewFollowup(
                        followup.source,
                        "reconcile",
                        page,
                        "continued",
                        subscription_id=followup.subscription_id,
                    )
                ],
                self.clock(),
            )

    async def _accept(
        self,
        source: FhirSourceConfig,
        items: Sequence[tuple[Mapping[str, Any], bytes]],
        peer: str,
        *,
        what: str,
    ) -> bool:
        """Hand resources to intake; False when it refused them (invalid: logged by issue
        code, never by content, and not retried — the server would send the same)."""
        try:
            await accept_resources(
                self.writer,
                source,
                items,
                peer=peer,
                received_at=self.clock(),
                headers={"X-Refloop-Followup": what},
                commit_timeout=self.config.ingest.commit_timeout_seconds,
            )
        except FhirRejected as exc:
            log.warning(
                f"fhir.{what}.invalid",
                source=source.name,
                resource=str(items[0][0].get("resourceType")) if items else None,
                issues=_issue_codes(exc),
            )
            return False
        return True


def _is(resource: Any, ref: Reference) -> bool:
    return (
        isinstance(resource, Mapping)
        and resource.get("resourceType") == ref.type
        and resource.get("id") == ref.id
    )


def _created_id(response: httpx.Response, body: Any) -> str | None:
    if isinstance(body, Mapping) and body.get("resourceType") == "Subscription":
        rid = body.get("id")
        if isinstance(rid, str) and rid:
            return rid
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    ref = parse_reference(location.split("/_history/")[0]) if location else None
    return ref.id if ref is not None and ref.type == "Subscription" else None


__all__ = [
    "Prepared",
    "ServerError",
    "SourceServer",
    "SubscriptionManager",
    "heartbeat_period",
    "retry_delay",
    "spec_search",
    "subscription_key",
]
