"""The FHIR REST endpoints over real HTTP: uvicorn on loopback, the real group-commit
writer, a real SQLite / PostgreSQL database, httpx as the EHR."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import structlog
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.servicerequest import ServiceRequest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, delete, insert, select, text
from sqlalchemy.engine import make_url

from engine.config import Config
from engine.domain.projection import LoggedEvent, fold
from engine.domain.referral import State
from engine.edges.fhir_api import fhir_routes
from engine.edges.http_app import build_app
from engine.metrics import Metrics
from engine.outbound.model import PacketContext, Party, ReferralView, Specialist, TriggerEvent
from engine.outbound.packets.fhir import render_referral_bundle
from engine.services.normaliser import Processor, Source
from engine.services.writer import GroupCommitWriter
from engine.store.database import open_engine
from engine.store.schema import (
    deliveries,
    messages,
    parked_keys,
    referral_events,
    referral_keys,
    referrals,
)
from tests import loop_messages as lm
from tests.conftest import migrated, require_postgres
from tests.helpers import SHARED, make_config, pg_url, serve_app
from tests.normalising import drain, shipped

# One server per database for the whole module (starting uvicorn and migrating a
# database per test would cost more than the tests); each test starts from empty tables.
pytestmark = pytest.mark.asyncio(loop_scope="module")

CORPUS = SHARED / "corpus" / "fhir"
TOKEN = "ehr-token-1f2e3d"
OTHER_TOKEN = "outside-token-9a8b7c"
SMALL_TOKEN = "small-token-5d6e7f"
HMAC_SECRET = "signing-secret-42"
FHIR = "application/fhir+json"

COMMUNICATION = {
    "resourceType": "Communication",
    "id": "comm-1",
    "meta": {"versionId": "1"},
    "status": "completed",
    "subject": {"reference": "Patient/example"},
    "payload": [{"contentString": "Consult note sent to the referring clinic"}],
}


def corpus(resource_type: str) -> list[Path]:
    return sorted((CORPUS / resource_type).glob("*.json"))


def task(tid: str = "t1", version: str | None = "1", status: str = "requested") -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Task",
        "id": tid,
        "status": status,
        "intent": "order",
        "for": {"identifier": {"system": "urn:oid:1.2.3", "value": "12345"}},
    }
    if version:
        out["meta"] = {"versionId": version}
    return out


def body(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode()


@dataclass
class Harness:
    base: str
    engine: Engine
    metrics: Metrics
    http: httpx.AsyncClient
    baseline: dict[tuple[str, str, str], float] = dataclasses.field(default_factory=dict)

    def reset(self) -> None:
        with self.engine.begin() as conn:
            for table in (deliveries, referral_keys, referral_events, parked_keys, messages):
                conn.execute(delete(table))
            conn.execute(delete(referrals))
        self.baseline = self._counts()

    def _counts(self) -> dict[tuple[str, str, str], float]:
        page = self.metrics.exposition().decode()
        out = {}
        for family in text_string_to_metric_families(page):
            if family.name == "refloop_fhir_requests":
                for s in family.samples:
                    key = (s.labels["source"], s.labels["resource"], s.labels["outcome"])
                    out[key] = float(s.value)
        return out

    async def post(
        self, path: str, content: bytes, token: str | None = TOKEN, **headers: str
    ) -> httpx.Response:
        hdrs = {"Content-Type": FHIR, **headers}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        return await self.http.post(self.base + path, content=content, headers=hdrs)

    async def put(self, path: str, content: bytes, token: str = TOKEN) -> httpx.Response:
        hdrs = {"Content-Type": FHIR, "Authorization": f"Bearer {token}"}
        return await self.http.put(self.base + path, content=content, headers=hdrs)

    async def get(self, path: str, token: str | None = TOKEN, **params: str) -> httpx.Response:
        hdrs = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.http.get(self.base + path, headers=hdrs, params=params)

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            query = select(messages).order_by(messages.c.id)
            return [dict(r._mapping) for r in conn.execute(query)]

    def entry_rows(self) -> list[dict[str, Any]]:
        """The rows of resources, without the records of the Bundles that brought them."""
        return [r for r in self.rows() if r["message_type"] != "FHIR:Bundle"]

    def counted(self, source: str, resource: str, outcome: str) -> float:
        """Requests counted with these labels since the test began."""
        key = (source, resource, outcome)
        return self._counts().get(key, 0.0) - self.baseline.get(key, 0.0)


def fhir_config(url: str, tmp_path: Path) -> Config:
    (tmp_path / "other.token").write_text(OTHER_TOKEN + "\n")
    return make_config(
        url,
        source=tmp_path / "engine.toml",
        fhir={
            "sources": [
                {"name": "ehr", "token": {"env": "REFLOOP_TEST_FHIR_TOKEN"}},
                {
                    "name": "outside",
                    "token": {"file": "other.token"},
                    "allowed_cidrs": ["10.0.0.0/8", "fd00::/8"],
                },
                {
                    "name": "small",
                    "token": {"env": "REFLOOP_TEST_FHIR_SMALL"},
                    "max_body_bytes": 1024,
                },
                {"name": "signer", "hmac_secret": {"env": "REFLOOP_TEST_FHIR_HMAC"}},
            ]
        },
    )


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Harness]:
    engine = open_engine(config.database_url())
    metrics = Metrics()
    writer = GroupCommitWriter(engine, metrics)
    writer.start()
    app = build_app(
        metrics,
        database_ok=lambda: True,
        listeners_ok=lambda: [],
        extra_routes=fhir_routes(config, writer, metrics, engine),
    )
    try:
        async with serve_app(app) as port, httpx.AsyncClient(timeout=10) as http:
            yield Harness(f"http://127.0.0.1:{port}/fhir/r4", engine, metrics, http)
    finally:
        writer.stop()
        engine.dispose()


@pytest.fixture(scope="module")
def secrets_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("REFLOOP_DATABASE_URL", raising=False)
        env.setenv("REFLOOP_TEST_FHIR_TOKEN", TOKEN)
        env.setenv("REFLOOP_TEST_FHIR_SMALL", SMALL_TOKEN)
        env.setenv("REFLOOP_TEST_FHIR_HMAC", HMAC_SECRET)
        yield


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def module_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield migrated(f"sqlite:///{tmp_path_factory.mktemp('fhirdb')}/refloop.db")
        return
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = make_url(pg_url()).set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield migrated(url.render_as_string(hide_password=False))
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    module_db: str, tmp_path_factory: pytest.TempPathFactory, secrets_env: None
) -> AsyncIterator[Harness]:
    async with serving(fhir_config(module_db, tmp_path_factory.mktemp("fhircfg"))) as harness:
        yield harness


@pytest.fixture
def api(served: Harness) -> Harness:
    served.reset()
    return served


def issues(resp: httpx.Response) -> list[dict[str, Any]]:
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return list(outcome["issue"])


def expressions(resp: httpx.Response) -> list[str]:
    return [e for i in issues(resp) for e in i.get("expression", [])]


# -- accepted and stored ---------------------------------------------------------------

WRITABLE_FILES = [
    *corpus("ServiceRequest")[:3],  # the fourth (nhs-bars) is invalid R4: see below
    *corpus("Task"),
    *corpus("Appointment"),
    *corpus("DocumentReference"),
    *corpus("DiagnosticReport"),
]


async def test_every_writable_resource_type_is_stored_raw_before_201(api: Harness) -> None:
    sent: list[tuple[dict[str, Any], bytes, httpx.Response]] = []
    for path in WRITABLE_FILES:
        raw = path.read_bytes()
        resource = json.loads(raw)
        sent.append((resource, raw, await api.post(f"/{resource['resourceType']}", raw)))
    raw = body(COMMUNICATION)
    sent.append((COMMUNICATION, raw, await api.post("/Communication", raw)))

    rows = api.rows()
    assert len(rows) == len(sent)
    for (resource, raw, resp), row in zip(sent, rows, strict=True):
        rtype = resource["resourceType"]
        assert resp.status_code == 201, (rtype, resp.text)
        assert row["raw"] == raw
        assert row["status"] == "received"
        assert row["message_type"] == f"FHIR:{rtype}"
        assert row["listener"] == "ehr"
        assert row["sending_application"] == "ehr"
        assert row["version"] == "R4"
        assert row["charset"] == "utf-8"
        assert row["payload_sha256"] == hashlib.sha256(raw).hexdigest()
        assert row["peer"].startswith("127.0.0.1:")
        version = resource.get("meta", {}).get("versionId")
        rid = resource.get("id")
        if rid:
            expected = f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
            assert row["control_id"] == expected
        else:
            # No id: refloop names it, deterministically, from the source and the bytes.
            assert row["control_id"].startswith(f"{rtype}/")
            uuid.UUID(row["control_id"].split("/")[1])
        assert (row["dedup_key"] is not None) == bool(rid and version)
        assert resp.headers["location"] == f"{api.base}/{row['control_id']}"
        assert resp.headers["content-type"].startswith(FHIR)
        assert issues(resp)[0]["severity"] == "information"
    assert api.counted("ehr", "Task", "accepted") == len(corpus("Task"))
    assert api.counted("ehr", "Communication", "accepted") == 1


async def test_a_post_without_an_id_gets_the_same_generated_location_every_time(
    api: Harness,
) -> None:
    raw = body({k: v for k, v in task().items() if k not in ("id", "meta")})
    first = await api.post("/Task", raw)
    again = await api.post("/Task", raw)
    other = await api.post("/Task", raw.replace(b"requested", b"received"))
    assert first.status_code == again.status_code == other.status_code == 201
    assert first.headers["location"] == again.headers["location"]
    assert first.headers["location"] != other.headers["location"]
    assert "_history" not in first.headers["location"]


async def test_put_stores_the_update_and_answers_200_with_its_version(api: Harness) -> None:
    resp = await api.put("/Task/t9", body(task("t9", "3")))
    assert resp.status_code == 200, resp.text
    assert resp.headers["location"] == f"{api.base}/Task/t9/_history/3"
    assert resp.headers["etag"] == 'W/"3"'
    [row] = api.rows()
    assert row["control_id"] == "Task/t9/_history/3"


async def test_prefer_return_representation_echoes_the_resource_and_minimal_sends_nothing(
    api: Harness,
) -> None:
    raw = body(task("t2"))
    echoed = await api.post("/Task", raw, Prefer="return=representation")
    minimal = await api.post("/Task", body(task("t3")), Prefer="return=minimal")
    assert echoed.status_code == minimal.status_code == 201
    assert echoed.content == raw
    assert minimal.content == b""


async def test_a_code_outside_its_value_set_is_accepted_for_the_mapping_to_report(
    api: Harness,
) -> None:
    # fhir.resources checks structure, not code values; the mapping's on_unmapped decides.
    resp = await api.post("/Task", body(task(status="not-a-task-status")))
    assert resp.status_code == 201
    assert [r["status"] for r in api.rows()] == ["received"]


async def test_a_signed_request_names_its_source_by_hmac(api: Harness) -> None:
    raw = body(task("signed"))
    signature = hmac.new(HMAC_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    good = await api.post("/Task", raw, token=None, **{"X-Hub-Signature": f"sha256={signature}"})
    bad = await api.post("/Task", raw, token=None, **{"X-Hub-Signature": "sha256=" + "0" * 64})
    assert good.status_code == 201, good.text
    assert bad.status_code == 401
    [row] = api.rows()
    assert row["listener"] == "signer"


# -- refused, nothing stored -------------------------------------------------------------


async def test_malformed_json_is_400_saying_where_without_quoting(api: Harness) -> None:
    raw = b'{"resourceType": "Task", "status": "requested" "intent": "SECRETVALUE"}'
    resp = await api.post("/Task", raw)
    assert resp.status_code == 400
    [issue] = issues(resp)
    assert issue["code"] == "structure"
    assert "line 1 column 48" in issue["diagnostics"]
    assert "SECRETVALUE" not in resp.text
    assert api.rows() == []
    assert api.counted("ehr", "Task", "invalid") == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[1, 2]",
        b'{"status": "requested"}',
        b'{"resourceType": "Task", "status": "a", "status": "b"}',
        b"\xff\xfe{}",
        b'{"resourceType": "Task", "x": NaN}',
        b"[" * 100_000,
    ],
    ids=["empty", "array", "no-type", "repeated-member", "not-utf8", "nan", "deep"],
)
async def test_unusable_bodies_are_400_structure(api: Harness, raw: bytes) -> None:
    resp = await api.post("/Task", raw)
    assert resp.status_code == 400
    assert issues(resp)[0]["code"] in ("structure", "required")
    assert api.rows() == []


async def test_a_task_posted_to_servicerequest_is_400_naming_resource_type(api: Harness) -> None:
    resp = await api.post("/ServiceRequest", body(task()))
    assert resp.status_code == 400
    [issue] = issues(resp)
    assert issue["code"] == "invalid"
    assert issue["expression"] == ["resourceType"]
    assert api.rows() == []


async def test_an_invalid_resource_is_422_naming_element_paths_never_values(api: Harness) -> None:
    raw = (CORPUS / "ServiceRequest" / "nhs-bars__service_request_GET-success.json").read_bytes()
    resp = await api.post("/ServiceRequest", raw)
    assert resp.status_code == 422
    assert set(expressions(resp)) == {
        "ServiceRequest.basedOn",
        "ServiceRequest.PatientInstruction",
    }
    synthetic = task()
    synthetic["authoredOn"] = "TESTPATIENT ALPHA 1970"
    synthetic["note"] = [{"text": 12345678}]
    synthetic["Jane Doe 555-0100"] = "x"
    resp = await api.post("/Task", body(synthetic))
    assert resp.status_code == 422
    assert set(expressions(resp)) == {
        "Task.authoredOn",
        "Task.note[0].text",
        "Task.(unknown member)",
    }
    for leak in ("TESTPATIENT", "12345678", "Jane", "555-0100"):
        assert leak not in resp.text
    assert api.rows() == []


async def test_put_with_another_id_than_the_url_is_400(api: Harness) -> None:
    other = await api.put("/Task/t1", body(task("t2")))
    missing = await api.put("/Task/t1", body({k: v for k, v in task().items() if k != "id"}))
    assert other.status_code == missing.status_code == 400
    assert expressions(other) == expressions(missing) == ["Task.id"]
    assert api.rows() == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/fhir+json; charset=latin-1"]
)
async def test_other_media_types_are_415(api: Harness, content_type: str) -> None:
    resp = await api.post("/Task", body(task()), **{"Content-Type": content_type})
    assert resp.status_code == 415
    assert issues(resp)[0]["code"] == "not-supported"
    assert api.rows() == []


async def test_json_with_utf8_charset_is_accepted(api: Harness) -> None:
    resp = await api.post(
        "/Task", body(task()), **{"Content-Type": "application/json; charset=UTF-8"}
    )
    assert resp.status_code == 201


async def test_a_body_over_the_source_limit_is_413_declared_or_streamed(api: Harness) -> None:
    big = task()
    big["description"] = "x" * 2000
    raw = body(big)
    declared = await api.post("/Task", raw, token=SMALL_TOKEN)

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(0, len(raw), 256):
            yield raw[n : n + 256]

    streamed = await api.http.post(
        api.base + "/Task",
        content=chunks(),
        headers={"Content-Type": FHIR, "Authorization": f"Bearer {SMALL_TOKEN}"},
    )
    assert declared.status_code == streamed.status_code == 413
    assert issues(streamed)[0]["code"] == "too-long"
    assert api.rows() == []
    assert api.counted("small", "Task", "too_large") == 2
    fits = await api.post("/Task", body(task()), token=SMALL_TOKEN)
    assert fits.status_code == 201


async def test_types_without_an_endpoint_and_unknown_paths(api: Harness) -> None:
    patient = await api.post("/Patient", b'{"resourceType": "Patient"}')
    unknown = await api.post("/NotAType", b"{}")
    nowhere = await api.get("/Task/t1/_history")
    delete = await api.http.delete(api.base + "/Task/t1")
    assert patient.status_code == 400
    assert issues(patient)[0]["code"] == "not-supported"
    assert unknown.status_code == nowhere.status_code == 404
    assert delete.status_code == 405
    assert delete.headers["allow"] == "PUT"
    assert api.rows() == []


# -- duplicates and conflicts -------------------------------------------------------------


async def test_the_same_version_again_is_a_duplicate_with_no_new_effects(api: Harness) -> None:
    raw = body(task("t5", "2"))
    first = await api.post("/Task", raw)
    again = await api.post("/Task", raw)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.headers["location"] == again.headers["location"]
    original, dup = api.rows()
    assert original["status"] == "received"
    assert (dup["status"], dup["duplicate_of"]) == ("duplicate", original["id"])
    assert dup["dedup_key"] is None
    assert api.counted("ehr", "Task", "duplicate") == 1


async def test_the_same_version_serialised_otherwise_is_a_duplicate(api: Harness) -> None:
    first = await api.post("/Task", body(task("t5", "2")))
    resent = task("t5", "2")
    resent["meta"]["lastUpdated"] = "2026-12-01T10:00:00Z"
    again = await api.post("/Task", json.dumps(resent, indent=2, sort_keys=True).encode())
    assert (first.status_code, again.status_code) == (201, 200)
    assert [r["status"] for r in api.rows()] == ["received", "duplicate"]


async def test_a_conditional_create_matching_again_is_a_duplicate_whatever_its_content(
    api: Harness,
) -> None:
    condition = {"If-None-Exist": "identifier=urn:oid:1.2.3|T-78"}
    first = await api.post(
        "/Task",
        body({"resourceType": "Task", "status": "requested", "intent": "order"}),
        **condition,
    )
    again = await api.post(
        "/Task",
        body({"resourceType": "Task", "status": "received", "intent": "order"}),
        **condition,
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.headers["location"] == again.headers["location"]


async def test_the_same_if_none_exist_again_is_a_duplicate_of_the_first(api: Harness) -> None:
    raw = body({k: v for k, v in task().items() if k not in ("id", "meta")})
    condition = {"If-None-Exist": "identifier=urn:oid:1.2.3|T-77"}
    first = await api.post("/Task", raw, **condition)
    again = await api.post("/Task", raw, **condition)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.headers["location"] == again.headers["location"]
    original, dup = api.rows()
    assert dup["duplicate_of"] == original["id"]
    assert original["dedup_key"] is not None
    # The headers that give the body its meaning are stored with it.
    kept = json.loads(original["headers"])
    assert kept["if-none-exist"] == "identifier=urn:oid:1.2.3|T-77"
    assert kept["content-type"].startswith("application/fhir+json")


async def test_a_known_version_with_other_content_is_409_and_stored_rejected(api: Harness) -> None:
    first = await api.post("/Task", body(task("t6", "1")))
    changed = await api.post("/Task", body(task("t6", "1", status="completed")))
    assert first.status_code == 201
    assert changed.status_code == 409
    [issue] = issues(changed)
    assert issue["code"] == "conflict"
    assert issue["expression"] == ["Task.meta.versionId"]
    original, conflict = api.rows()
    assert (conflict["status"], conflict["duplicate_of"]) == ("rejected", original["id"])
    assert api.counted("ehr", "Task", "conflict") == 1


# -- auth -------------------------------------------------------------------------------


async def test_every_credential_failure_gets_the_same_401(api: Harness) -> None:
    raw = body(task())
    answers = [
        await api.post("/Task", raw, token=None),
        await api.post("/Task", raw, token="wrong-token"),
        await api.post("/Task", raw, token=None, Authorization=f"Basic {TOKEN}"),
        await api.post("/Task", raw, token=TOKEN[:-1]),
        await api.get("/ServiceRequest/" + str(uuid.uuid4()), token="wrong-token"),
    ]
    assert {a.status_code for a in answers} == {401}
    assert len({a.content for a in answers}) == 1
    assert {a.headers["www-authenticate"] for a in answers} == {'Bearer realm="refloop"'}
    assert issues(answers[0])[0]["code"] == "login"
    assert api.rows() == []
    assert api.counted("unknown", "Task", "unauthorized") == 4


async def test_a_valid_token_from_outside_the_cidrs_is_403(api: Harness) -> None:
    resp = await api.post("/Task", body(task()), token=OTHER_TOKEN)
    assert resp.status_code == 403
    assert issues(resp)[0]["code"] == "forbidden"
    assert "10.0.0.0" not in resp.text
    assert api.rows() == []
    assert api.counted("outside", "Task", "forbidden") == 1


# -- Bundles ----------------------------------------------------------------------------


def entry(resource: dict[str, Any], method: str = "POST", url: str | None = None) -> dict[str, Any]:
    rtype = resource["resourceType"]
    default = f"{rtype}/{resource['id']}" if method == "PUT" else rtype
    return {"resource": resource, "request": {"method": method, "url": url or default}}


def bundle(kind: str, *entries: dict[str, Any]) -> bytes:
    return body({"resourceType": "Bundle", "type": kind, "entry": list(entries)})


async def test_a_transaction_with_a_broken_entry_stores_nothing(api: Harness) -> None:
    broken = task("t2")
    del broken["status"]
    raw = bundle("transaction", entry(task("t1")), entry(broken, "PUT"))
    resp = await api.post("", raw)
    assert resp.status_code == 422
    assert expressions(resp) == ["Bundle.entry[1].resource.status"]
    assert api.rows() == []
    assert api.counted("ehr", "Bundle", "invalid") == 1


async def test_a_transaction_is_stored_entry_by_entry_and_answered_per_entry(api: Harness) -> None:
    sr = json.loads(
        (CORPUS / "ServiceRequest" / "fhirR4spec__servicerequest-example-di.json").read_bytes()
    )
    raw = bundle("transaction", entry(sr, "PUT"), entry(task("t1")), entry(COMMUNICATION))
    resp = await api.post("/Bundle", raw)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    Bundle.model_validate(answer)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == [
        "200 OK",
        "201 Created",
        "201 Created",
    ]
    assert [e["response"].get("location") for e in answer["entry"]] == [
        "ServiceRequest/di",
        "Task/t1/_history/1",
        "Communication/comm-1/_history/1",
    ]
    record, *rows = api.rows()
    assert [r["message_type"] for r in rows] == [
        "FHIR:ServiceRequest",
        "FHIR:Task",
        "FHIR:Communication",
    ]
    assert json.loads(rows[0]["raw"]) == sr
    assert {r["status"] for r in [record, *rows]} == {"received"}
    # The Bundle as sent is kept too, and each entry names it.
    assert (record["message_type"], bytes(record["raw"])) == ("FHIR:Bundle", raw)
    assert record["control_id"].startswith("Bundle/")
    entry_headers = [json.loads(r["headers"]) for r in rows]
    assert [h["bundle-entry"] for h in entry_headers] == [f"transaction {n}" for n in range(3)]
    assert {h["bundle-sha256"] for h in entry_headers} == {record["payload_sha256"]}


async def test_a_batch_stores_its_good_entries_and_answers_the_bad_one(api: Harness) -> None:
    broken = task("t2")
    broken["authoredOn"] = "not a date"
    raw = bundle(
        "batch",
        entry(task("t1")),
        entry(broken),
        entry(task("t3"), "DELETE", "Task/t3"),
        entry(COMMUNICATION),
    )
    resp = await api.post("", raw)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    Bundle.model_validate(answer)
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "400 Bad Request", "201 Created"]
    bad = answer["entry"][1]["response"]["outcome"]["issue"]
    assert [i["expression"] for i in bad] == [["Bundle.entry[1].resource.authoredOn"]]
    assert [r["control_id"] for r in api.entry_rows()] == [
        "Task/t1/_history/1",
        "Communication/comm-1/_history/1",
    ]
    assert [r["message_type"] for r in api.rows()].count("FHIR:Bundle") == 1


async def test_a_batch_resent_is_answered_from_the_originals(api: Harness) -> None:
    raw = bundle("batch", entry(task("t1")), entry(task("t2", "4")))
    await api.post("", raw)
    resp = await api.post("", raw)
    answer = resp.json()
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "200 OK"]
    assert [r["status"] for r in api.entry_rows()] == [
        "received",
        "received",
        "duplicate",
        "duplicate",
    ]
    # The same bytes again: the record of the Bundle is a duplicate too.
    records = [r for r in api.rows() if r["message_type"] == "FHIR:Bundle"]
    assert [r["status"] for r in records] == ["received", "duplicate"]
    assert records[1]["duplicate_of"] == records[0]["id"]
    assert api.counted("ehr", "Bundle", "duplicate") == 1


async def test_a_corpus_batch_of_many_types_is_stored(api: Harness) -> None:
    raw = (CORPUS / "Bundle" / "fhirconverter__SIU-S26-01-expected.json").read_bytes()
    resp = await api.post("", raw)
    assert resp.status_code == 200, resp.text
    count = len(json.loads(raw)["entry"])
    assert len(resp.json()["entry"]) == count
    rows = api.entry_rows()
    assert len(rows) == count
    assert "FHIR:Appointment" in {r["message_type"] for r in rows}
    assert len(api.rows()) == count + 1  # and the Bundle itself


def refloops_referral_bundle(state: State) -> tuple[bytes, frozenset[Any]]:
    """refloop's own ``fhir.referral_bundle`` for the test loop's order (as
    tests/unit/test_packets_fhir.py builds it), and the correlating keys of that order."""
    now = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    order = lm.orm("C1", "PO1").decode()
    (event,) = shipped().normalise(order, received_at=now).events
    referral, step = fold(None, "rid-1", LoggedEvent(event.type, event.fields, now, now))
    assert referral is not None
    ctx = PacketContext(
        delivery_id=1,
        idempotency_key="key-1",
        control_id="C1",
        now=now,
        referral=ReferralView(referral.id, state, now, now, referral.data),
        event=TriggerEvent("ev-1", event.type, event.fields, now, 1, None, step.state_after),
        sender=Party(facility="ACME_MAIN"),
        receiver=Party("EHR", "ACME"),
        recipient=Specialist(id="cardio-1", name="Cardio", targets=(), npi="1234567893"),
        sources={"order": order, "trigger": order},
        options={},
    )
    return render_referral_bundle(ctx).payload, frozenset(event.correlating_keys)


def normalise_stored(engine: Engine) -> None:
    """Run the real normaliser, with the shipped mappings, over what is ``received``."""
    proc = Processor(engine, shipped, {"ehr": Source()})
    try:
        drain(proc)
    finally:
        proc.close()


async def test_refloops_own_referral_bundle_reads_back_entry_by_entry(api: Harness) -> None:
    """The entries' urn:uuid references are made self-standing when the Bundle is split,
    so the stored ServiceRequest names its patient and the Task its ServiceRequest: one
    referral, created and then accepted, with the patient of the HL7 order."""
    raw, order_keys = refloops_referral_bundle(State.ACCEPTED)
    resp = await api.post("", raw)
    assert resp.status_code == 200, resp.text
    assert {e["response"]["status"] for e in resp.json()["entry"]} == {"201 Created"}
    rows = {r["message_type"]: r for r in api.rows()}
    sr = json.loads(rows["FHIR:ServiceRequest"]["raw"])
    assert sr["subject"]["type"] == "Patient"
    assert sr["subject"]["identifier"]["value"] == "100001"
    tsk = json.loads(rows["FHIR:Task"]["raw"])
    assert tsk["focus"]["type"] == "ServiceRequest"
    assert tsk["focus"]["identifier"]["value"] == "PO1"
    assert bytes(rows["FHIR:Bundle"]["raw"]) == raw

    await asyncio.to_thread(normalise_stored, api.engine)

    with api.engine.connect() as conn:
        (referral,) = conn.execute(select(referrals)).all()
        events = conn.execute(
            select(referral_events.c.type, referral_events.c.message_id).order_by(
                referral_events.c.sequence
            )
        ).all()
        keys = {(k.kind, k.value) for k in conn.execute(select(referral_keys))}
    assert referral.state == "accepted"
    patient = json.loads(referral.data)["referral"]["patient.identifier"]
    assert (patient["value"], patient.get("type")) == ("100001", "MR")
    assert events == [
        ("referral.created", rows["FHIR:ServiceRequest"]["id"]),
        ("referral.accepted", rows["FHIR:Task"]["id"]),
    ]
    # The HL7 order's own keys meet the FHIR copy's: an ORR for it would find it.
    assert {(k.kind.value, k.value) for k in order_keys} <= keys
    statuses = {r["message_type"]: r["status"] for r in api.rows()}
    assert statuses["FHIR:Bundle"] == statuses["FHIR:Patient"] == "ignored"
    assert statuses["FHIR:ServiceRequest"] == statuses["FHIR:Task"] == "processed"


async def test_references_to_entries_with_ids_are_stored_as_type_and_id(api: Harness) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "pat-7",
        "identifier": [
            {"system": "urn:oid:1.2.3", "value": "SSN-LIKE"},
            {
                "type": {"coding": [{"code": "MR"}]},
                "system": "urn:oid:1.2.9",
                "value": "MRN-7",
            },
        ],
    }
    tsk = task("t7")
    tsk["for"] = {"reference": "urn:uuid:0b3a9d3e-6f2c-4c1e-9d1b-2f6f1a2b3c4d"}
    tsk["focus"] = {"reference": "urn:uuid:elsewhere", "display": "not in this Bundle"}
    raw = bundle(
        "transaction",
        {**entry(patient, "PUT"), "fullUrl": "urn:uuid:0b3a9d3e-6f2c-4c1e-9d1b-2f6f1a2b3c4d"},
        entry(tsk),
    )
    resp = await api.post("", raw)
    assert resp.status_code == 200, resp.text
    stored = json.loads(api.entry_rows()[1]["raw"])
    assert stored["for"] == {
        "reference": "Patient/pat-7",
        "type": "Patient",
        "identifier": {
            "type": {"coding": [{"code": "MR"}]},
            "system": "urn:oid:1.2.9",
            "value": "MRN-7",
        },
    }
    assert stored["focus"] == tsk["focus"]  # names no entry: left as sent


@pytest.mark.parametrize(
    "name",
    [
        "inferno-subscriptions__heartbeat_bundle_example.json",
        "nhs-bars__process_message_Booking.json",
    ],
)
async def test_bundles_other_than_transaction_or_batch_are_422(api: Harness, name: str) -> None:
    resp = await api.post("", (CORPUS / "Bundle" / name).read_bytes())
    assert resp.status_code == 422
    assert expressions(resp) == ["Bundle.type"]
    assert api.rows() == []


async def test_a_resource_that_is_not_a_bundle_at_the_base_is_400(api: Harness) -> None:
    resp = await api.post("", body(task()))
    assert resp.status_code == 400
    assert expressions(resp) == ["resourceType"]


# -- the database down -------------------------------------------------------------------


async def test_a_storage_failure_is_503_with_retry_after(api: Harness) -> None:
    with api.engine.begin() as conn:
        conn.execute(text("ALTER TABLE messages RENAME TO messages_away"))
    try:
        resp = await api.post("/Task", body(task()))
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "10"
        assert issues(resp)[0]["code"] == "transient"
        assert api.counted("ehr", "Task", "unavailable") == 1
    finally:
        with api.engine.begin() as conn:
            conn.execute(text("ALTER TABLE messages_away RENAME TO messages"))
    assert api.rows() == []
    resent = await api.post("/Task", body(task()))
    assert resent.status_code == 201


# -- the read facade ---------------------------------------------------------------------


def seed_referral(engine: Engine, state: str) -> str:
    rid = str(uuid.uuid4())
    data = {
        "referral": {
            "correlate.placer_order": {"value": "PLC1", "namespace": "EHR"},
            "correlate.filler_order": {"value": "FIL9", "namespace": "SPEC"},
            "patient.identifier": {"value": "12345", "namespace": "HOSP", "type": "MR"},
            "priority": "urgent",
        }
    }
    now = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(referrals).values(
                id=rid,
                state=state,
                created_at=now,
                updated_at=now,
                last_sequence=4,
                needs_review=False,
                data=json.dumps(data),
            )
        )
    return rid


@pytest.mark.parametrize(
    ("state", "sr_status", "task_status", "business"),
    [
        ("scheduled", "active", "in-progress", "5.1.1"),
        ("closed", "completed", "completed", "7.0"),
        ("declined", "revoked", "rejected", "4.0"),
    ],
)
async def test_the_read_facade_shows_refloops_view_of_a_referral(
    api: Harness, state: str, sr_status: str, task_status: str, business: str
) -> None:
    rid = seed_referral(api.engine, state)
    with structlog.testing.capture_logs() as logs:
        sr = await api.get(f"/ServiceRequest/{rid}")
        found = await api.get("/Task", **{"based-on": f"ServiceRequest/{rid}"})
    assert sr.status_code == 200
    resource = sr.json()
    ServiceRequest.model_validate(resource)
    assert resource["status"] == sr_status
    assert resource["meta"]["versionId"] == "4"
    ids = {
        (i.get("type", {}).get("coding", [{}])[0].get("code"), i["value"])
        for i in resource["identifier"]
    }
    assert ids == {("PLAC", "PLC1"), ("FILL", "FIL9"), (None, rid)}
    assert found.status_code == 200
    searchset = found.json()
    Bundle.model_validate(searchset)
    assert (searchset["type"], searchset["total"]) == ("searchset", 1)
    task_ = searchset["entry"][0]["resource"]
    assert task_["status"] == task_status
    assert task_["businessStatus"]["coding"][0]["code"] == business
    assert task_["basedOn"] == [{"reference": f"ServiceRequest/{rid}"}]
    reads = [e for e in logs if e["event"] == "fhir.read"]
    assert [(e["source"], e["resource"], e["referral_id"]) for e in reads] == [
        ("ehr", "ServiceRequest", rid),
        ("ehr", "Task", rid),
    ]
    assert "12345" not in json.dumps(reads)


async def test_the_read_facade_for_an_unknown_referral(api: Harness) -> None:
    unknown = str(uuid.uuid4())
    read = await api.get(f"/ServiceRequest/{unknown}")
    junk = await api.get("/ServiceRequest/not-a-uuid")
    search = await api.get("/Task", **{"based-on": f"ServiceRequest/{unknown}"})
    no_param = await api.get("/Task")
    assert read.status_code == junk.status_code == 404
    assert issues(read)[0]["code"] == "not-found"
    assert (search.status_code, search.json()["total"]) == (200, 0)
    assert no_param.status_code == 400
    assert api.counted("ehr", "ServiceRequest", "not_found") == 2


async def test_the_read_facade_needs_a_credential(api: Harness) -> None:
    rid = seed_referral(api.engine, "sent")
    assert (await api.get(f"/ServiceRequest/{rid}", token=None)).status_code == 401
    assert (await api.get("/Task", token=None, **{"based-on": rid})).status_code == 401
    outside = await api.get(f"/ServiceRequest/{rid}", token=OTHER_TOKEN)
    assert outside.status_code == 403
