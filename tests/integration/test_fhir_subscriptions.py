"""FHIR subscriptions end to end: SEKMET (a real FHIR R4 server, PEERS.md §1) holds the
Subscriptions our manager creates and calls our notification endpoints, served by
uvicorn on 127.0.0.1 with the real group-commit writer on a real SQLite database.

Covered: R4 rest-hook update-style notifications (full resource) and pings (reconciled by
search), Backport topic subscriptions with full-resource, id-only (read back) and empty
(searched) payloads, handshakes and heartbeats (no rows, the subscription's time
updated), a gap in the event numbers (reconciled against SEKMET), an outage after which
SEKMET gave up on the subscription (the watchdog finds it quiet, asks ``$status``,
requests it again and reconciles what was missed), athenahealth-style HMAC-signed id-only
events (401 and nothing stored when unsigned or badly signed), the watchdog on an
injected clock, and the rejections a developer at the EHR side can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from structlog.testing import capture_logs

from engine.config import Config
from engine.edges.fhir_api import fhir_routes
from engine.edges.fhir_auth import FhirAuth
from engine.edges.fhir_notify import NotifyContext, notify_routes
from engine.metrics import Metrics
from engine.protocol.fhir_notify import KEY_HEADER, TAG_SYSTEM
from engine.services.subscriptions import SubscriptionManager, subscription_key
from engine.services.writer import GroupCommitWriter
from engine.store import subscriptions as store
from engine.store.database import open_engine
from engine.store.schema import fhir_followups, messages
from tests.conftest import migrated
from tests.helpers import QuietServer, make_config, wait_for
from tests.peers.sekmet import Sekmet, SekmetHandle

SOURCE = "ehr-fhir"
SOURCE_TOKEN = "source-token-7f3a"  # what the source's server presents to us
SERVER_TOKEN = "server-token-91c2"  # what we present to the source's server
HMAC_SECRET = "athena-signing-secret"
TOKEN_ENV = "REFLOOP_TEST_FHIR_SOURCE_TOKEN"
SERVER_TOKEN_ENV = "REFLOOP_TEST_FHIR_SERVER_TOKEN"
HMAC_ENV = "REFLOOP_TEST_FHIR_HMAC"
TOPICS = "http://sekmet.dev/fhir/SubscriptionTopic"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "Bundle"
WAIT = 15.0


class Clock:
    """Real time, or real time moved on by ``advance`` (the watchdog's tests)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass
class Harness:
    config: Config
    engine: Engine
    metrics: Metrics
    writer: GroupCommitWriter
    manager: SubscriptionManager
    port: int
    clock: Clock
    _server: QuietServer | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def notify_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/r4/_notify/{SOURCE}"

    async def serve(self) -> None:
        """Our endpoints as the daemon mounts them: beside the REST API, one FhirAuth."""
        sock = socket.create_server(("127.0.0.1", self.port))
        auth = FhirAuth.from_config(self.config)
        notify = NotifyContext(self.config, self.writer, self.metrics, self.manager, auth=auth)
        routes = fhir_routes(
            self.config,
            self.writer,
            self.metrics,
            self.engine,
            notify_routes=notify_routes(notify),
            auth=auth,
        )
        self._server = QuietServer(
            uvicorn.Config(
                Starlette(routes=routes), log_config=None, access_log=False, lifespan="off"
            )
        )
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        server = self._server
        await wait_for(lambda: server.started, WAIT)

    async def close_http(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server, self._task = None, None

    def rows(self, message_type: str | None = None) -> list[dict[str, Any]]:
        query = select(messages).order_by(messages.c.id)
        if message_type is not None:
            query = query.where(messages.c.message_type == message_type)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def states(self) -> list[store.SubscriptionState]:
        with self.engine.connect() as conn:
            return store.list_subscriptions(conn, SOURCE)

    def state(self, key: str) -> store.SubscriptionState:
        with self.engine.connect() as conn:
            found = store.get_subscription(conn, SOURCE, key)
        assert found is not None
        return found

    def followups(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(fhir_followups))]

    def metric(self, name: str, **labels: str) -> float:
        page = self.metrics.exposition().decode()
        for family in text_string_to_metric_families(page):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, SOURCE_TOKEN)
    monkeypatch.setenv(SERVER_TOKEN_ENV, SERVER_TOKEN)
    monkeypatch.setenv(HMAC_ENV, HMAC_SECRET)


@pytest.fixture(scope="module")
def sekmet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SekmetHandle]:
    """One SEKMET for the module (it takes a second to start): each test works on its
    own patient, and its Subscriptions are deleted after it."""
    handle = Sekmet.start(
        tmp_path_factory.mktemp("sekmet"),
        bearer_tokens=[SERVER_TOKEN],
        # One try per notification: a failed delivery turns the Subscription to error
        # at once (the outage test), not after three tries and seven seconds.
        settings={"subscriptions": {"retries": 1}},
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def fhir(sekmet_server: SekmetHandle, secrets_env: None) -> Iterator[SekmetHandle]:
    yield sekmet_server
    with sekmet_server.client() as client:
        for sub in sekmet_server.search("Subscription"):
            client.delete(f"/Subscription/{sub['id']}")


@pytest.fixture
def patient(fhir: SekmetHandle) -> str:
    """A patient of this test's own, on SEKMET."""
    pid = f"p-{uuid.uuid4().hex[:12]}"
    sekmet_put(fhir, {"resourceType": "Patient", "id": pid})
    return f"Patient/{pid}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    subscriptions: list[dict[str, Any]] | None = None,
    sekmet: SekmetHandle | None = None,
    signed: bool = False,
    start: bool = True,
    background: bool = True,
    clock: Clock | None = None,
    max_body_bytes: int | None = None,
    **manager_options: Any,
) -> AsyncIterator[Harness]:
    url = migrated(f"sqlite:///{tmp_path}/refloop.db")
    port = free_port()
    source: dict[str, Any] = {
        "name": SOURCE,
        "notify_url": f"http://127.0.0.1:{port}/fhir/r4/_notify/{SOURCE}",
        "allowed_cidrs": ["127.0.0.0/8"],
        "subscriptions": subscriptions or [],
    }
    if max_body_bytes is not None:
        source["max_body_bytes"] = max_body_bytes
    if signed:
        source["hmac_secret"] = {"env": HMAC_ENV}
    else:
        source["token"] = {"env": TOKEN_ENV}
    channels: dict[str, Any] = {}
    if sekmet is None and subscriptions:
        # Subscriptions need a server in the config: one nobody answers at (port 9, the
        # discard port, is closed here), for tests that drive the manager by hand.
        source["server"] = "ehr-server"
        channels["ehr-server"] = {
            "type": "fhir",
            "base_url": "http://127.0.0.1:9/fhir",
            "timeout_seconds": 2,
        }
    if sekmet is not None:
        source["server"] = "ehr-server"
        channels["ehr-server"] = {
            "type": "fhir",
            "base_url": sekmet.base_url,
            "auth": "bearer",
            "token": {"env": SERVER_TOKEN_ENV},
            "timeout_seconds": 10,
        }
    config = make_config(url, listeners=[], fhir={"sources": [source]}, channels=channels)
    engine = open_engine(url)
    metrics = Metrics()
    writer = GroupCommitWriter(engine, metrics)
    writer.start()
    clock = clock or Clock()
    manager = SubscriptionManager(config, engine, writer, metrics, clock=clock, **manager_options)
    h = Harness(config, engine, metrics, writer, manager, port, clock)
    try:
        await h.serve()
        if start:
            await manager.start(background=background)
        yield h
    finally:
        await manager.stop()
        await h.close_http()
        await asyncio.to_thread(writer.stop)
        engine.dispose()


def sekmet_post(fhir: SekmetHandle, resource: dict[str, Any]) -> dict[str, Any]:
    with fhir.client() as client:
        response = client.post(f"/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        location = response.headers["Location"]
    reference = location.split("/fhir/", 1)[1].split("/_history/")[0]
    return fhir.read(reference)  # type: ignore[no-any-return]


def sekmet_put(fhir: SekmetHandle, resource: dict[str, Any]) -> None:
    with fhir.client() as client:
        response = client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
        assert response.status_code in (200, 201), response.text


async def post(fhir: SekmetHandle, resource: dict[str, Any]) -> dict[str, Any]:
    """Create on SEKMET without blocking the loop our endpoint runs in."""
    return await asyncio.to_thread(sekmet_post, fhir, resource)


async def put(fhir: SekmetHandle, resource: dict[str, Any]) -> None:
    await asyncio.to_thread(sekmet_put, fhir, resource)


async def read(fhir: SekmetHandle, reference: str) -> Any:
    return await asyncio.to_thread(fhir.read, reference)


def task(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "for": {"reference": patient},
        **extra,
    }


def service_request(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": patient},
        **extra,
    }


def json_of(raw: bytes) -> Any:
    return json.loads(raw)


def ids_of(rows: list[dict[str, Any]]) -> set[str]:
    return {json_of(r["raw"])["id"] for r in rows}


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {SOURCE_TOKEN}", "Content-Type": "application/fhir+json"}


# -- R4 core rest-hook ---------------------------------------------------------------------


def completed(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resource": "Task",
        "criteria": f"Task?status=completed&patient={patient}",
        "heartbeat_seconds": 300,
        **extra,
    }


async def test_a_completed_task_on_sekmet_arrives_as_a_message(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    async with harness(tmp_path, subscriptions=[completed(patient)], sekmet=fhir) as h:
        key = subscription_key(h.config.fhir.sources[0].subscriptions[0])
        state = h.state(key)
        assert state.server_id
        sub = await read(fhir, f"Subscription/{state.server_id}")
        assert sub["status"] == "active"
        assert sub["criteria"] == f"Task?status=completed&patient={patient}"
        assert sub["channel"]["endpoint"] == h.notify_url
        assert sub["channel"]["payload"] == "application/fhir+json"
        assert f"Authorization: Bearer {SOURCE_TOKEN}" in sub["channel"]["header"]
        assert f"{KEY_HEADER}: {key}" in sub["channel"]["header"]
        assert sub["meta"]["tag"] == [{"system": TAG_SYSTEM, "code": key}]

        created = await post(fhir, task(patient))
        await put(fhir, {**created, "status": "completed"})
        (row,) = await wait_for(lambda: h.rows("FHIR:Task"), WAIT)
        assert json_of(row["raw"]) == await read(fhir, f"Task/{created['id']}")
        assert row["control_id"] == f"Task/{created['id']}/_history/2"
        assert (row["listener"], row["sending_application"]) == (SOURCE, SOURCE)
        assert (row["message_type"], row["status"]) == ("FHIR:Task", "received")
        assert h.state(key).last_event_at is not None
        accepted = {"source": SOURCE, "resource": "Task", "outcome": "accepted"}
        assert h.metric("refloop_fhir_requests_total", **accepted) == 1

        # The same update style without a body names the Task only: it is read back
        # (the version we hold already: a duplicate, no new effects).
        async with httpx.AsyncClient() as client:
            ping = await client.put(f"{h.notify_url}/Task/{created['id']}", headers=bearer())
        assert ping.status_code == 200, ping.text
        await wait_for(lambda: len(h.rows("FHIR:Task")) == 2, WAIT)
        assert [r["status"] for r in h.rows("FHIR:Task")] == ["received", "duplicate"]

    # A restart refreshes the same Subscription instead of making a second one.
    async with harness(tmp_path, subscriptions=[completed(patient)], sekmet=fhir) as again:
        assert again.state(key).server_id == state.server_id
        mine = [
            s
            for s in await asyncio.to_thread(fhir.search, "Subscription")
            if s.get("meta", {}).get("tag") == [{"system": TAG_SYSTEM, "code": key}]
        ]
        assert [s["id"] for s in mine] == [state.server_id]
        assert mine[0]["channel"]["endpoint"] == again.notify_url  # the new endpoint


async def test_a_ping_without_payload_is_reconciled_by_search(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    spec = completed(patient, payload="empty")
    async with harness(tmp_path, subscriptions=[spec], sekmet=fhir) as h:
        key = subscription_key(h.config.fhir.sources[0].subscriptions[0])
        sub = await read(fhir, f"Subscription/{h.state(key).server_id}")
        assert "payload" not in sub["channel"]  # R4 core: no payload is a ping
        done = await post(fhir, task(patient, status="completed"))
        await wait_for(lambda: ids_of(h.rows("FHIR:Task")) == {done["id"]}, WAIT)
        created = await post(fhir, task(patient))
        await put(fhir, {**created, "status": "completed"})
        await wait_for(lambda: created["id"] in ids_of(h.rows("FHIR:Task")), WAIT)
        await wait_for(lambda: h.followups() == [], WAIT)
        rows = h.rows("FHIR:Task")
        # The second search finds the first Task again: a duplicate, no new effects.
        assert [r["status"] for r in rows if json_of(r["raw"])["id"] == done["id"]] == [
            "received",
            "duplicate",
        ]
        (latest,) = [r for r in rows if json_of(r["raw"])["id"] == created["id"]]
        assert json_of(latest["raw"])["status"] == "completed"
        assert h.rows("FHIR:Bundle") == []  # a ping has no body to keep
        assert h.metric("refloop_fhir_reconciliations_total", source=SOURCE, outcome="ok") == 2


# -- R4 Backport topic subscriptions -----------------------------------------------------------


def new_orders(payload: str, patient: str, heartbeat: int = 600) -> dict[str, Any]:
    return {
        "resource": "ServiceRequest",
        "topic": f"{TOPICS}/servicerequest-new",
        "filter": f"ServiceRequest?patient={patient}",
        "payload": payload,
        "heartbeat_seconds": heartbeat,
    }


async def test_backport_events_by_payload_kind(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    """Three topic subscriptions, one per payload kind, each on its own patient: a full
    resource is stored as sent, an id-only focus is read back, an empty event searched."""
    kinds = ("full-resource", "id-only", "empty")
    patients = {kind: f"{patient}-{n}" for n, kind in enumerate(kinds)}
    for p in patients.values():
        await put(fhir, {"resourceType": "Patient", "id": p.split("/")[1]})
    specs = [new_orders(kind, patients[kind]) for kind in kinds]
    async with harness(tmp_path, subscriptions=specs, sekmet=fhir) as h:
        keys = {
            kind: subscription_key(s)
            for kind, s in zip(kinds, h.config.fhir.sources[0].subscriptions, strict=True)
        }
        # Handshakes: each subscription is alive and its count starts; nothing is stored.
        for key in keys.values():
            await wait_for(lambda key=key: h.state(key).last_heard_at, WAIT)
            state = h.state(key)
            assert (state.last_event_number, state.last_event_at) == (0, None)
            sub = await read(fhir, f"Subscription/{state.server_id}")
            assert sub["meta"]["profile"] == [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
            ]
        assert h.rows() == []

        created = {kind: await post(fhir, service_request(patients[kind])) for kind in kinds}
        await post(fhir, service_request(f"{patient}-elsewhere"))  # matches no filter
        want = {c["id"] for c in created.values()}
        await wait_for(lambda: ids_of(h.rows("FHIR:ServiceRequest")) == want, WAIT)
        await wait_for(lambda: h.followups() == [], WAIT)
        for kind, resource in created.items():
            (row,) = [
                r
                for r in h.rows("FHIR:ServiceRequest")
                if json_of(r["raw"])["id"] == resource["id"]
            ]
            assert json_of(row["raw"]) == await read(fhir, f"ServiceRequest/{resource['id']}")
            assert row["control_id"] == f"ServiceRequest/{resource['id']}/_history/1"
            state = h.state(keys[kind])
            assert state.last_event_number == 1
            assert state.last_event_at is not None
        # Each event notification is kept as it came (the announcement).
        announcements = [json_of(r["raw"]) for r in h.rows("FHIR:Bundle")]
        assert len(announcements) == 3
        assert {a["entry"][0]["resource"]["resourceType"] for a in announcements} == {"Parameters"}
        assert h.metric("refloop_fhir_reconciliations_total", source=SOURCE, outcome="ok") == 1


def notification_bundle(base: str, server_id: str, number: int, focus: str) -> dict[str, Any]:
    """An id-only event notification in SEKMET's own shape (backport.notification_bundle)."""
    now = datetime.now(UTC).isoformat()
    event = [
        {"name": "event-number", "valueString": str(number)},
        {"name": "timestamp", "valueInstant": now},
        {"name": "focus", "valueReference": {"reference": f"{base}/{focus}"}},
    ]
    parameters = [
        {
            "name": "subscription",
            "valueReference": {"reference": f"{base}/Subscription/{server_id}"},
        },
        {"name": "topic", "valueCanonical": f"{TOPICS}/servicerequest-new"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": str(number)},
        {"name": "notification-event", "part": event},
    ]
    status = {"resourceType": "Parameters", "id": str(uuid.uuid4()), "parameter": parameters}
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": now,
        "entry": [{"fullUrl": f"urn:uuid:{status['id']}", "resource": status}],
    }


async def test_a_skipped_event_number_is_reconciled_against_sekmet(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    """SEKMET numbers events 1, 2, 3 …; a notification for event 3 after event 1 means
    event 2 never reached us: a search by _lastUpdated fetches what it was about."""
    # Changed on the server with no notification reaching us (made before the
    # subscription existed, so SEKMET never announced it).
    missed = await post(fhir, service_request(patient))
    async with harness(tmp_path, subscriptions=[new_orders("id-only", patient)], sekmet=fhir) as h:
        key = subscription_key(h.config.fhir.sources[0].subscriptions[0])
        await wait_for(lambda: h.state(key).last_heard_at, WAIT)
        first = await post(fhir, service_request(patient))
        await wait_for(lambda: h.followups() == [] and h.rows("FHIR:ServiceRequest"), WAIT)
        assert ids_of(h.rows("FHIR:ServiceRequest")) == {first["id"]}
        assert h.state(key).last_event_number == 1

        # Event 3, worded as SEKMET words it, about a resource it holds (outside the
        # filter, so SEKMET itself stays silent): event 2 is missing.
        third = await post(fhir, service_request(f"{patient}-other"))
        body = notification_bundle(
            fhir.base_url, h.state(key).server_id or "", 3, f"ServiceRequest/{third['id']}"
        )
        with capture_logs() as logs:
            async with httpx.AsyncClient() as client:
                answer = await client.post(h.notify_url, json=body, headers=bearer())
            assert answer.status_code == 200, answer.text
            want = {missed["id"], first["id"], third["id"]}
            await wait_for(lambda: ids_of(h.rows("FHIR:ServiceRequest")) == want, WAIT)
            await wait_for(lambda: h.followups() == [], WAIT)
        gaps = [
            (e["missed"], e["first_missing"]) for e in logs if e["event"] == "fhir.subscription.gap"
        ]
        assert gaps == [(1, 2)]
        assert h.state(key).last_event_number == 3
        assert h.metric("refloop_fhir_reconciliations_total", source=SOURCE, outcome="ok") == 1


async def test_a_long_reconciliation_pages_and_goes_on_later(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    """Pages follow the Bundle's next link; past ``max_pages`` the rest is a new
    follow-up at the next page (the five share one _lastUpdated second: a new time
    bound could not move on)."""
    made = [await post(fhir, service_request(patient)) for _ in range(5)]
    async with harness(tmp_path, sekmet=fhir, background=False, page_size=1, max_pages=2) as h:
        with h.engine.begin() as conn:
            store.add_followups(
                conn,
                [
                    store.NewFollowup(
                        SOURCE,
                        "reconcile",
                        f"ServiceRequest?patient={patient}",
                        "gap",
                        since=h.clock() - timedelta(minutes=1),
                    )
                ],
                h.clock(),
            )
        reasons = []
        for _ in range(5):
            if not h.followups():
                break
            reasons += [f["reason"] for f in h.followups()]
            assert await h.manager.run_due() == 1
        assert reasons == ["gap", "continued", "continued"]
        assert ids_of(h.rows("FHIR:ServiceRequest")) == {m["id"] for m in made}
        assert h.metric("refloop_fhir_reconciliations_total", source=SOURCE, outcome="ok") == 3


async def sekmet_status(fhir: SekmetHandle, server_id: str) -> str:
    return str((await read(fhir, f"Subscription/{server_id}"))["status"])


async def has_status(fhir: SekmetHandle, server_id: str, wanted: str) -> bool:
    return await sekmet_status(fhir, server_id) == wanted


async def test_after_an_outage_the_watchdog_revives_the_subscription_and_reconciles(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    """Our endpoint is down when SEKMET has an event: it gives up and sets the
    Subscription to error, and sends nothing more. The watchdog finds it quiet, reads
    ``$status`` (error, 2 events since start, 1 seen), requests it again, and a search
    fetches the event that was never delivered."""
    spec = new_orders("id-only", patient)
    async with harness(tmp_path, subscriptions=[spec], sekmet=fhir) as h:
        key = subscription_key(h.config.fhir.sources[0].subscriptions[0])
        await wait_for(lambda: h.state(key).last_heard_at, WAIT)
        first = await post(fhir, service_request(patient))
        await wait_for(lambda: h.followups() == [] and h.rows("FHIR:ServiceRequest"), WAIT)
        server_id = h.state(key).server_id or ""

        await h.close_http()
        lost = await post(fhir, service_request(patient))
        await wait_for(lambda: has_status(fhir, server_id, "error"), WAIT)
        await h.serve()

        h.clock.advance(spec["heartbeat_seconds"] + 1)
        assert h.metric("refloop_fhir_subscription_last_event_seconds", source=SOURCE) > 600
        with capture_logs() as logs:
            assert await h.manager.check_heartbeats() == [key]
            await wait_for(lambda: lost["id"] in ids_of(h.rows("FHIR:ServiceRequest")), WAIT)
        events = {e["event"]: e for e in logs}
        assert events["fhir.subscription.quiet"]["subscription"] == key
        assert events["fhir.subscription.quiet"]["silent_seconds"] > 600
        assert events["fhir.subscription.inactive"]["status"] == "error"
        assert ids_of(h.rows("FHIR:ServiceRequest")) == {first["id"], lost["id"]}
        await wait_for(lambda: has_status(fhir, server_id, "active"), WAIT)  # after its handshake
        assert h.state(key).server_id == server_id  # the same Subscription, revived
        await wait_for(lambda: h.state(key).last_event_number == 2, WAIT)  # its handshake
        assert h.metric("refloop_fhir_subscription_last_event_seconds", source=SOURCE) < 60

        after = await post(fhir, service_request(patient))
        await wait_for(lambda: after["id"] in ids_of(h.rows("FHIR:ServiceRequest")), WAIT)
        await wait_for(lambda: h.state(key).last_event_number == 3, WAIT)
        await wait_for(lambda: h.followups() == [], WAIT)


BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


async def test_handshake_and_heartbeats_of_a_subscription_made_on_the_server_side(
    tmp_path: Path, fhir: SekmetHandle
) -> None:
    """A Subscription the source set up itself (a portal, an operator), with a one-second
    heartbeat: followed all the same; handshakes and heartbeats store nothing."""
    async with harness(tmp_path, sekmet=fhir) as h:
        content = {"url": f"{BACKPORT}/backport-payload-content", "valueCode": "id-only"}
        period = {"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": 1}
        sub = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "set up at the source",
            "criteria": f"{TOPICS}/appointment-booked",
            "channel": {
                "type": "rest-hook",
                "endpoint": h.notify_url,
                "payload": "application/fhir+json",
                "_payload": {"extension": [content]},
                "extension": [period],
                "header": [f"Authorization: Bearer {SOURCE_TOKEN}"],
            },
        }
        with capture_logs() as logs:
            created = await post(fhir, sub)

            def kinds() -> list[str]:
                return [e["type"] for e in logs if e["event"] == "fhir.notify.received"]

            await wait_for(lambda: "heartbeat" in kinds(), WAIT)
        assert kinds()[0] == "handshake"
        (state,) = h.states()
        assert (state.key, state.server_id) == (f"server:{created['id']}", created["id"])
        assert state.last_heard_at is not None
        assert state.last_event_at is None  # no event yet: only signs of life
        assert state.last_event_number == 0
        assert state.status == "active"
        assert h.rows() == []
        assert h.followups() == []


# -- athenahealth-style signed events ----------------------------------------------------------


def athena_event(focus: str, number: int = 1) -> dict[str, Any]:
    """The athenaOne platform's shape: a history Bundle whose only entry is an R5-style
    SubscriptionStatus naming the focus (id-only), sent signed instead of with a token."""
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": datetime.now(UTC).isoformat(),
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": str(number),
                    "notificationEvent": [
                        {
                            "eventNumber": str(number),
                            "timestamp": datetime.now(UTC).isoformat(),
                            "focus": {"reference": focus},
                        }
                    ],
                    "subscription": {
                        "reference": "https://api.platform.athenahealth.com/fhir/r4/Subscription/sub-789"
                    },
                    "topic": "https://api.platform.athenahealth.com/fhir/r4/SubscriptionTopic/task",
                },
            }
        ],
    }


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def test_signed_id_only_events_are_verified_before_anything_else(
    tmp_path: Path, fhir: SekmetHandle, patient: str
) -> None:
    async with harness(tmp_path, sekmet=fhir, signed=True, start=False) as h:
        created = await post(fhir, task(patient, status="completed"))
        body = json.dumps(athena_event(f"{fhir.base_url}/Task/{created['id']}")).encode()
        json_type = {"Content-Type": "application/fhir+json"}
        attempts = [
            {},  # unsigned
            {"X-Hub-Signature": signature(HMAC_SECRET, body + b" ")},  # another body's
            {"X-Hub-Signature": signature("not-the-secret", body)},
            {"X-Hub-Signature": signature(HMAC_SECRET, body).replace("sha256", "sha1")},
            {"X-Hub-Signature": "sha256=" + "0" * 64},
            {"Authorization": f"Bearer {SOURCE_TOKEN}"},  # this source has no token
        ]
        async with httpx.AsyncClient() as client:
            answers = [
                await client.post(h.notify_url, content=body, headers={**json_type, **extra})
                for extra in attempts
            ]
            assert {a.status_code for a in answers} == {401}
            assert len({a.content for a in answers}) == 1  # no hint which part failed
            assert h.rows() == []
            assert h.followups() == []
            assert h.states() == []
            refused = {"source": "unknown", "resource": "other", "outcome": "unauthorized"}
            assert h.metric("refloop_fhir_requests_total", **refused) == len(attempts)

            signed = await client.post(
                h.notify_url,
                content=body,
                headers={**json_type, "X-Hub-Signature": signature(HMAC_SECRET, body)},
            )
        assert signed.status_code == 200, signed.text
        # Answered before the read-back, which is promised durably: the announcement and
        # the follow-up are in the database, the Task not yet (no manager runs here, as
        # if the process died right after answering).
        (announcement,) = h.rows("FHIR:Bundle")
        assert announcement["raw"] == body
        assert h.rows("FHIR:Task") == []
        (followup,) = h.followups()
        assert (followup["kind"], followup["target"]) == ("read", f"Task/{created['id']}")
        (state,) = h.states()
        assert (state.key, state.resource, state.last_event_number) == ("server:sub-789", "Task", 1)

        # The next start does it.
        later = SubscriptionManager(h.config, h.engine, h.writer, h.metrics)
        await later.start()
        try:
            (row,) = await wait_for(lambda: h.rows("FHIR:Task"), WAIT)
            await wait_for(lambda: h.followups() == [], WAIT)
        finally:
            await later.stop()
        assert json_of(row["raw"]) == await read(fhir, f"Task/{created['id']}")
        assert row["control_id"] == f"Task/{created['id']}/_history/1"


# -- the watchdog ------------------------------------------------------------------------------


async def test_the_watchdog_reports_a_quiet_subscription_once(
    tmp_path: Path, secrets_env: None
) -> None:
    clock = Clock()
    spec = new_orders("id-only", "Patient/p1", heartbeat=60)
    async with harness(tmp_path, subscriptions=[spec], clock=clock, background=False) as h:
        key = subscription_key(h.config.fhir.sources[0].subscriptions[0])
        gauge = "refloop_fhir_subscription_last_event_seconds"
        clock.advance(59)
        assert 59 <= h.metric(gauge, source=SOURCE) < 60
        with capture_logs() as logs:
            assert await h.manager.check_heartbeats() == []
            clock.advance(2)
            assert await h.manager.check_heartbeats() == [key]
            assert await h.manager.check_heartbeats() == []  # once per quiet spell
        quiet = [e for e in logs if e["event"] == "fhir.subscription.quiet"]
        assert len(quiet) == 1
        assert quiet[0]["log_level"] == "warning"
        assert (quiet[0]["source"], quiet[0]["subscription"]) == (SOURCE, key)
        assert (quiet[0]["silent_seconds"], quiet[0]["heartbeat_seconds"]) == (61, 60)
        assert 61 <= h.metric(gauge, source=SOURCE) < 62

        # A heartbeat (the corpus sample, sent for our subscription) ends the spell.
        heartbeat = (CORPUS / "inferno-subscriptions__heartbeat_bundle_example.json").read_bytes()
        with capture_logs() as logs:
            async with httpx.AsyncClient() as client:
                answer = await client.post(
                    h.notify_url,
                    content=heartbeat,
                    headers={
                        "Authorization": f"Bearer {SOURCE_TOKEN}",
                        "Content-Type": "application/fhir+json",
                        KEY_HEADER: key,
                    },
                )
        assert answer.status_code == 200
        assert [e["event"] for e in logs if "resumed" in e["event"]] == [
            "fhir.subscription.resumed"
        ]
        assert h.metric(gauge, source=SOURCE) < 1
        state = h.state(key)
        assert state.last_heard_at is not None
        assert state.last_event_at is None
        assert state.last_event_number == 2  # the heartbeat's count is the baseline
        assert h.rows() == []
        clock.advance(61)
        assert await h.manager.check_heartbeats() == [key]


# -- what a developer at the EHR side gets back --------------------------------------------------


async def test_rejections_say_what_to_fix_and_store_nothing(
    tmp_path: Path, secrets_env: None
) -> None:
    async with harness(tmp_path, max_body_bytes=2048) as h:
        auth = {"Authorization": f"Bearer {SOURCE_TOKEN}", "Content-Type": "application/fhir+json"}
        valid = {"resourceType": "Task", "id": "t1", "status": "completed", "intent": "order"}
        cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
            ("POST", "", b'{"resourceType": "Task",', auth, 400, "malformed JSON at line 1"),
            ("POST", "", b"[]", auth, 400, "not a JSON object"),
            (
                "POST",
                "",
                json.dumps(valid).encode(),
                {**auth, "Content-Type": "text/plain"},
                415,
                "application/fhir+json",
            ),
            ("POST", "", b"{" + b" " * 4096 + b"}", auth, 413, "larger than 2048 bytes"),
            (
                "PUT",
                "/Task/t1",
                json.dumps({**valid, "resourceType": "ServiceRequest"}).encode(),
                auth,
                400,
                "not a Task",
            ),
            ("PUT", "/Task/t2", json.dumps(valid).encode(), auth, 400, "does not match"),
            (
                "PUT",
                "/Task/t1",
                json.dumps({**valid, "status": None}).encode(),
                auth,
                422,
                "Task.status",
            ),
            (
                "POST",
                "",
                json.dumps(valid).encode(),
                {**auth, "Authorization": "Bearer nope"},
                401,
                "authentication failed",
            ),
        ]
        async with httpx.AsyncClient() as client:
            for method, path, body, headers, status, says in cases:
                answer = await client.request(
                    method, h.notify_url + path, content=body, headers=headers
                )
                assert answer.status_code == status, (path, answer.text)
                outcome = answer.json()
                assert outcome["resourceType"] == "OperationOutcome"
                assert says in json.dumps(outcome), (path, outcome)
                assert "completed" not in answer.text  # never a value from the body
            unknown = await client.post(
                f"http://127.0.0.1:{h.port}/fhir/r4/_notify/nobody", content=b"", headers=auth
            )
            assert unknown.status_code == 401
        assert h.rows() == []
        assert h.followups() == []
        assert (
            h.metric(
                "refloop_fhir_requests_total", source=SOURCE, resource="other", outcome="invalid"
            )
            >= 2
        )
        assert (
            h.metric(
                "refloop_fhir_requests_total", source=SOURCE, resource="Task", outcome="invalid"
            )
            >= 1
        )
        assert (
            h.metric(
                "refloop_fhir_requests_total", source=SOURCE, resource="other", outcome="too_large"
            )
            == 1
        )


# -- the store, on SQLite and PostgreSQL ------------------------------------------------------


def test_subscription_state_and_followups_in_the_store(upgraded_url: str) -> None:
    engine = open_engine(upgraded_url)
    t0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            state = store.ensure_subscription(
                conn, SOURCE, "cfg-a", now=t0, resource="Task", search="Task?status=completed"
            )
            assert store.ensure_subscription(conn, SOURCE, "cfg-a", now=t0) == state
            store.record_contact(conn, state.id, heard_at=t0, event=True, number=5)
            # Handled out of order: an older number never moves the count back …
            store.record_contact(conn, state.id, heard_at=t0, event=True, number=3)
            assert store.subscription_by_id(conn, state.id).last_event_number == 5  # type: ignore[union-attr]
            # … but a handshake starts it again.
            store.record_contact(conn, state.id, heard_at=t0, event=False, number=0, restart=True)
            after = store.subscription_by_id(conn, state.id)
            assert after is not None
            assert (after.last_event_number, after.last_heard_at, after.last_event_at) == (
                0,
                t0,
                t0,
            )
            store.set_server(conn, state.id, server_id="s-1", status="active", now=t0)
            assert store.subscription_by_server_id(conn, SOURCE, "s-1") == store.get_subscription(
                conn, SOURCE, "cfg-a"
            )
            store.add_followups(
                conn,
                [
                    store.NewFollowup(SOURCE, "read", "Task/t1", "id-only"),
                    store.NewFollowup(SOURCE, "reconcile", "Task?", "gap", since=t0),
                ],
                t0,
            )
        lease = timedelta(minutes=2)
        with engine.begin() as conn:
            claimed = store.claim_followups(conn, t0, lease=lease)
            assert [(f.kind, f.target, f.attempts) for f in claimed] == [
                ("read", "Task/t1", 1),
                ("reconcile", "Task?", 1),
            ]
            assert claimed[1].since == t0
            # Leased: not due again until the lease ends.
            assert store.claim_followups(conn, t0 + timedelta(seconds=1), lease=lease) == []
            store.finish_followup(conn, claimed[0].id)
            store.postpone_followup(conn, claimed[1].id, until=t0 + lease * 2, error="HTTP 503")
            assert store.claim_followups(conn, t0 + lease, lease=lease) == []
            (again,) = store.claim_followups(conn, t0 + lease * 2, lease=lease)
            assert (again.id, again.attempts) == (claimed[1].id, 2)
            assert store.count_followups(conn, SOURCE) == 1
    finally:
        engine.dispose()
