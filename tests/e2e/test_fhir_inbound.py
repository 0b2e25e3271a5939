"""FHIR R4 inbound through the whole daemon: REST writes and real SEKMET notifications
become referral events, and the read facade shows refloop's view of the referral."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from engine.store.database import open_engine
from engine.store.schema import deliveries, messages, referral_events, referrals
from tests.conftest import running
from tests.helpers import free_port, make_config
from tests.peers.mllp_peer import MllpPeer
from tests.peers.sekmet import Sekmet, require_sekmet

TOKEN = "e2e-source-token"
SERVER_TOKEN = "e2e-server-token"
FHIR = "application/fhir+json"
PLAC = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}]}


def service_request(rid: str, placer: str, patient: str = "Patient/p-e2e") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "meta": {"versionId": "1"},
        "identifier": [{"type": PLAC, "system": "urn:oid:2.16.840.1.113883.19.5", "value": placer}],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "57133-1"}]},
        "subject": {
            "reference": patient,
            "identifier": {"system": "urn:oid:2.16.840.1.113883.19.5.1", "value": "MRN-E2E"},
        },
        "authoredOn": "2026-12-01T10:00:00-06:00",
        "performerType": {"coding": [{"system": "http://snomed.info/sct", "code": "394579002"}]},
    }


def task(tid: str, sr: str, status: str, business: str, version: str = "1") -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": tid,
        "meta": {"versionId": version},
        "status": status,
        "businessStatus": {
            "coding": [
                {
                    "system": "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS",
                    "code": business,
                }
            ]
        },
        "intent": "order",
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]
        },
        "focus": {"reference": f"ServiceRequest/{sr}"},
        "for": {"reference": "Patient/p-e2e"},
    }


async def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := check()):
            await asyncio.sleep(0.05)
    return found


def referral(url: str) -> Any:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return conn.execute(select(referrals)).first()
    finally:
        eng.dispose()


def event_types(url: str) -> list[str]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            q = select(referral_events.c.type).order_by(referral_events.c.sequence)
            return list(conn.execute(q).scalars())
    finally:
        eng.dispose()


def statuses(url: str) -> list[tuple[str, str]]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            q = select(messages.c.message_type, messages.c.status).order_by(messages.c.id)
            return [(t, s) for t, s in conn.execute(q)]
    finally:
        eng.dispose()


def source(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "ehr-fhir",
        "token": {"env": "REFLOOP_E2E_FHIR_TOKEN"},
        "allowed_cidrs": ["127.0.0.0/8"],
        "notify_url": f"http://127.0.0.1:{port}/fhir/r4/_notify/ehr-fhir",
        **extra,
    }


@pytest.mark.slow
async def test_rest_writes_become_referral_events_and_the_facade_shows_them(
    upgraded_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFLOOP_E2E_FHIR_TOKEN", TOKEN)
    port = free_port()
    config = make_config(upgraded_url, http_port=port, fhir={"sources": [source(port)]})
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": FHIR}
    base = f"http://127.0.0.1:{port}/fhir/r4"
    async with running(config), httpx.AsyncClient(timeout=10) as client:
        created = await client.put(
            f"{base}/ServiceRequest/sr-e2e",
            content=json.dumps(service_request("sr-e2e", "E2E-1")).encode(),
            headers=auth,
        )
        assert created.status_code in (200, 201), created.text
        row = await until(lambda: referral(upgraded_url))
        assert row.placer_order_number == "E2E-1"
        assert row.specialty == "cardiology"

        accepted = await client.put(
            f"{base}/Task/t-e2e",
            content=json.dumps(task("t-e2e", "sr-e2e", "accepted", "3.0")).encode(),
            headers=auth,
        )
        assert accepted.status_code in (200, 201), accepted.text
        await until(lambda: referral(upgraded_url).state == "accepted")

        # A resend of the same version has no new effect.
        again = await client.put(
            f"{base}/Task/t-e2e",
            content=json.dumps(task("t-e2e", "sr-e2e", "accepted", "3.0")).encode(),
            headers=auth,
        )
        assert again.status_code == 200

        # No credential, or a wrong one: the same 401, nothing stored.
        before = len(statuses(upgraded_url))
        for headers in ({"Content-Type": FHIR}, {**auth, "Authorization": "Bearer nope"}):
            refused = await client.post(f"{base}/Task", content=b"{}", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["resourceType"] == "OperationOutcome"
        assert len(statuses(upgraded_url)) == before

        rid = referral(upgraded_url).id
        sr = (await client.get(f"{base}/ServiceRequest/{rid}", headers=auth)).json()
        assert sr["resourceType"] == "ServiceRequest"
        assert sr["status"] == "active"
        bundle = (
            await client.get(
                f"{base}/Task", params={"based-on": f"ServiceRequest/{rid}"}, headers=auth
            )
        ).json()
        [entry] = bundle["entry"]
        assert entry["resource"]["status"] == "accepted"
        assert entry["resource"]["businessStatus"]["coding"][0]["code"] == "3.0"
    assert event_types(upgraded_url) == ["referral.created", "referral.accepted"]
    assert ("FHIR:Task", "duplicate") in statuses(upgraded_url)


@pytest.mark.slow
async def test_sekmet_notifications_become_referral_events(
    upgraded_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_sekmet()
    monkeypatch.setenv("REFLOOP_E2E_FHIR_TOKEN", TOKEN)
    monkeypatch.setenv("REFLOOP_E2E_SERVER_TOKEN", SERVER_TOKEN)
    port = free_port()
    patient = f"p-{uuid.uuid4().hex[:8]}"
    fhir = Sekmet.start(tmp_path / "sekmet", bearer_tokens=[SERVER_TOKEN])
    try:
        subscriptions = [
            {"resource": "ServiceRequest", "criteria": f"ServiceRequest?patient=Patient/{patient}"},
            {"resource": "Task", "criteria": f"Task?patient=Patient/{patient}"},
        ]
        config = make_config(
            upgraded_url,
            http_port=port,
            fhir={"sources": [source(port, server="ehr-server", subscriptions=subscriptions)]},
            channels={
                "ehr-server": {
                    "type": "fhir",
                    "base_url": fhir.base_url,
                    "auth": "bearer",
                    "token": {"env": "REFLOOP_E2E_SERVER_TOKEN"},
                    "timeout_seconds": 10,
                }
            },
        )
        server = {"Authorization": f"Bearer {SERVER_TOKEN}", "Content-Type": FHIR}
        async with running(config), httpx.AsyncClient(timeout=10) as client:
            await client.put(
                f"{fhir.base_url}/Patient/{patient}",
                json={"resourceType": "Patient", "id": patient},
                headers=server,
            )
            sr = service_request("sr-sek", "SEK-1", patient=f"Patient/{patient}")
            del sr["meta"]
            made = await client.put(
                f"{fhir.base_url}/ServiceRequest/sr-sek", json=sr, headers=server
            )
            assert made.status_code in (200, 201), made.text
            row = await until(lambda: referral(upgraded_url))
            assert row.placer_order_number == "SEK-1"

            t = task("t-sek", "sr-sek", "accepted", "3.0")
            del t["meta"]
            t["for"] = {"reference": f"Patient/{patient}"}
            made = await client.put(f"{fhir.base_url}/Task/t-sek", json=t, headers=server)
            assert made.status_code in (200, 201), made.text
            await until(lambda: referral(upgraded_url).state == "accepted")
    finally:
        fhir.stop()
    types = event_types(upgraded_url)
    assert types[:2] == ["referral.created", "referral.accepted"]


def delivery_rows(url: str) -> list[Any]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(deliveries)))
    finally:
        eng.dispose()


@pytest.mark.slow
async def test_a_fhir_referral_without_a_patient_name_is_dead_lettered_with_the_reason(
    upgraded_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServiceRequest names its patient by identifier only; REF^I12 needs PID-5, so
    the packet is refused before anything is sent, and says why (never with a value)."""
    monkeypatch.setenv("REFLOOP_E2E_FHIR_TOKEN", TOKEN)
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples"
    port = free_port()
    async with MllpPeer() as specialist:
        config = make_config(
            upgraded_url,
            http_port=port,
            listeners=[{"name": "ehr", "host": "127.0.0.1", "port": 0}],
            fhir={"sources": [source(port)]},
            outbound={"dir": str(example / "closed-loop")},
            channels={
                "specialist": {"type": "mllp", "host": "127.0.0.1", "port": specialist.port},
                "ehr": {"type": "mllp", "host": "127.0.0.1", "port": free_port()},
            },
        )
        body = (example / "fhir-referral.json").read_bytes()
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": FHIR}
        async with running(config), httpx.AsyncClient(timeout=10) as client:
            answer = await client.put(
                f"http://127.0.0.1:{port}/fhir/r4/ServiceRequest/sr-try-1",
                content=body,
                headers=auth,
            )
            assert answer.status_code in (200, 201), answer.text
            [row] = await until(
                lambda: [r for r in delivery_rows(upgraded_url) if r.status == "dead"]
            )
        assert specialist.messages == []
    assert row.format == "hl7v2.ref_i12"
    assert "PID-5" in row.last_error
    assert "SYNTH-0042" not in row.last_error
    assert referral(upgraded_url).placer_order_number == "FHIR-2001"
