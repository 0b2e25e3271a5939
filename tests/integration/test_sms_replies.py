"""The SMS reply webhook over real HTTP: uvicorn on loopback (as the FHIR edge tests do),
httpx as the gateway, referrals made by the real normaliser on a real SQLite and
PostgreSQL database. A STOP flips the patient's consent and is a ``patient.replied``
event with its worklist item; an unknown number is an ``unmatched_reply`` item; bad
credentials never reach the database."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from engine.domain.referral import Event
from engine.edges.http_app import build_app
from engine.edges.sms_replies import ReplyAuth, SmsReplies, keyword_of, twilio_signature
from engine.metrics import Metrics
from engine.policy.language import load_policy
from engine.services.normaliser import Processor, Source
from engine.services.policy_runtime import NewEvent, record
from engine.store.eventlog import Changes, LogConnection
from engine.store.outbox import NewDelivery
from engine.store.preferences import PreferenceQueries
from engine.store.schema import deliveries, patient_preferences, referral_events, worklist_items
from tests.helpers import MAPPINGS, serve_app
from tests.loop_messages import orm
from tests.normalising import drain, open_, shipped, store

POLICY = load_policy(MAPPINGS)
NOW = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
TOKEN = "gateway-secret-7c1d"
TWILIO_TOKEN = "twilio-auth-token-55aa"
PUBLIC = "https://refloop.clinic.example/sms/replies/twilio"
PATIENT_PHONE = "(555) 555-0142"  # as the EHR wrote it
FROM = "+15555550142"  # as the gateway sends it


@dataclass
class Harness:
    base: str
    engine: Engine
    http: httpx.AsyncClient

    async def form(
        self, data: dict[str, str], *, token: str | None = TOKEN, channel: str = "sms", **hdrs: str
    ) -> httpx.Response:
        headers = dict(hdrs)
        if token is not None:
            raw = base64.b64encode(f"refloop:{token}".encode()).decode()
            headers["Authorization"] = f"Basic {raw}"
        return await self.http.post(
            f"{self.base}/sms/replies/{channel}", data=data, headers=headers
        )

    def rows(self, table: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(table))]

    def replied(self) -> list[dict[str, Any]]:
        return [
            {**r, "fields": json.loads(r["fields"])}
            for r in self.rows(referral_events)
            if r["type"] == Event.PATIENT_REPLIED.value
        ]

    def consent(self) -> dict[str, bool | None]:
        return {r["patient_key"]: r["sms_consent"] for r in self.rows(patient_preferences)}


def referral_with_phone(engine: Engine, placer: str, mrn: str, phone: str) -> str:
    """A referral from a real ORM through the real normaliser, its phone recorded by hand
    (the shipped ORM mapping has none)."""
    store(engine, [orm(f"C-{placer}", placer, mrn=mrn)], at=NOW - timedelta(days=2))
    proc = Processor(engine, shipped, {"test": Source()}, clock=lambda: NOW - timedelta(days=2))
    drain(proc)
    proc.close()
    log = LogConnection(engine)
    try:
        el = log.eventlog
        (rid,) = [
            r.id for r in el.all_referrals() if r.placer_order and r.placer_order[0] == placer
        ]
        el.end()
        event = NewEvent(
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"phone/{rid}")),
            Event.REFERRAL_UPDATED,
            {"patient.phone": phone},
            NOW - timedelta(days=1),
        )
        record(log, rid, [event], NOW - timedelta(days=1), policy=POLICY)
    finally:
        log.close()
    return rid


@contextlib.asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[Harness]:
    replies = SmsReplies(
        engine,
        policy=lambda: POLICY,
        channels={
            "sms": ReplyAuth(token=TOKEN),
            "twilio": ReplyAuth(twilio_auth_token=TWILIO_TOKEN, public_url=PUBLIC),
        },
        clock=lambda: NOW,
    )
    app = build_app(
        Metrics(),
        database_ok=lambda: True,
        listeners_ok=lambda: [],
        extra_routes=replies.routes(),
    )
    try:
        async with serve_app(app) as port, httpx.AsyncClient(timeout=10) as http:
            yield Harness(f"http://127.0.0.1:{port}", engine, http)
    finally:
        await asyncio.to_thread(replies.close)


@pytest.fixture
def engine(upgraded_url: str) -> Iterator[Engine]:
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


async def test_stop_flips_consent_records_the_reply_and_cancels_pending_outreach(
    engine: Engine,
) -> None:
    rid = referral_with_phone(engine, "PS1", "200001", PATIENT_PHONE)
    # A reminder waiting in the outbox for this patient.
    log = LogConnection(engine)
    try:
        el = log.eventlog
        el.begin(wait=True)
        (phone_event,) = [e.id for e in el.all_events() if e.type == "referral.updated"]
        nudge = NewDelivery(
            "nudge-1", rid, phone_event, "outreach", "outreach", "sms", "outreach.sms", FROM
        )
        el.write(Changes(deliveries=[nudge]), NOW)
        el.commit()
    finally:
        log.close()
    async with serving(engine) as api:
        resp = await api.form(
            {"MessageSid": "SM0001", "From": FROM, "To": "+15555550100", "Body": "Stop"}
        )
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/xml")
        assert resp.content.endswith(b"<Response></Response>")
        assert api.consent() == {"200001^ACME": False}
        (reply,) = api.replied()
        assert reply["referral_id"] == rid
        assert reply["correlation_method"] == "reply"
        assert reply["fields"] == {
            "actor": "patient",
            "reply.channel": "sms",
            "reply.keyword": "STOP",
            "reply.text": "Stop",
        }
        items = [(i["reason"], i["referral_id"]) for i in api.rows(worklist_items)]
        assert items == [("patient_reply", rid)]
        (detail,) = [i["detail"] for i in api.rows(worklist_items)]
        assert "555" not in detail  # the number never reaches the worklist
        (row,) = api.rows(deliveries)
        assert row["status"] == "cancelled"
        assert row["last_error"] == "the patient replied STOP"  # not "moved on"

        # The gateway retries the same message: nothing twice. Then the patient opts in.
        again = await api.form({"MessageSid": "SM0001", "From": FROM, "Body": "Stop"})
        assert again.status_code == 200
        assert len(api.replied()) == 1
        back = await api.form({"MessageSid": "SM0002", "From": FROM, "Body": " START "})
        assert back.status_code == 200
        assert api.consent() == {"200001^ACME": True}
        # A STOP retried after the START does not undo it.
        await api.form({"MessageSid": "SM0001", "From": FROM, "Body": "Stop"})
        assert api.consent() == {"200001^ACME": True}
        assert [r["fields"]["reply.keyword"] for r in api.replied()] == ["STOP", "START"]

        # Free text changes nothing but is recorded for the coordinator.
        await api.form({"MessageSid": "SM0003", "From": FROM, "Body": "yes but not Monday"})
        assert api.consent() == {"200001^ACME": True}
        assert api.replied()[-1]["fields"]["reply.keyword"] == ""


async def test_spanish_alto_and_json_posts(engine: Engine) -> None:
    referral_with_phone(engine, "PS2", "200002", "555.555.0142")
    async with serving(engine) as api:
        resp = await api.http.post(
            f"{api.base}/sms/replies/sms",
            json={"id": "gw-77", "from": "1 555 555 0142", "text": "ALTO por favor"},
            headers={"X-Refloop-Token": TOKEN},
        )
        assert resp.status_code == 204
        assert api.consent() == {"200002^ACME": False}
        assert api.replied()[0]["fields"]["reply.keyword"] == "ALTO"
        # the preferences are what planning reads
        log = LogConnection(engine)
        try:
            el = log.eventlog
            prefs = PreferenceQueries(el.conn, engine.dialect.name)
            found = prefs.get(["200002^ACME", "nobody^X"])
            el.end()
        finally:
            log.close()
        assert found["200002^ACME"].sms_consent is False
        assert "nobody^X" not in found


async def test_an_unknown_number_is_a_worklist_item_without_a_referral(engine: Engine) -> None:
    referral_with_phone(engine, "PS3", "200003", PATIENT_PHONE)
    async with serving(engine) as api:
        resp = await api.form({"MessageSid": "SM9001", "From": "+15555550999", "Body": "STOP"})
        assert resp.status_code == 200
        (item,) = api.rows(worklist_items)
        assert (item["reason"], item["referral_id"], item["status"]) == (
            "unmatched_reply",
            None,
            "open",
        )
        assert item["key"] == str(
            uuid.uuid5(uuid.UUID("0c6f7f0e-1b35-4b83-9d4e-6d7a9b1e2f51"), "unmatched/sms/SM9001")
        )
        assert "SM9001" in item["detail"]
        assert "0999" not in item["detail"]
        assert api.replied() == []
        assert api.consent() == {}  # the known patient's consent is untouched
        # The retry raises nothing twice.
        await api.form({"MessageSid": "SM9001", "From": "+15555550999", "Body": "STOP"})
        assert len(api.rows(worklist_items)) == 1


async def test_a_shared_phone_opts_out_every_patient_and_asks_a_person(engine: Engine) -> None:
    referral_with_phone(engine, "PS4", "200004", PATIENT_PHONE)
    referral_with_phone(engine, "PS5", "200005", "+1 555 555 0142")
    async with serving(engine) as api:
        resp = await api.form({"MessageSid": "SM0400", "From": FROM, "Body": "unsubscribe"})
        assert resp.status_code == 200
        assert api.consent() == {"200004^ACME": False, "200005^ACME": False}
        (item,) = api.rows(worklist_items)
        assert (item["reason"], item["referral_id"]) == ("unmatched_reply", None)
        assert "2 patients" in item["detail"]
        assert api.replied() == []


async def test_twilio_signatures(engine: Engine) -> None:
    referral_with_phone(engine, "PS6", "200006", PATIENT_PHONE)
    form = {"MessageSid": "SM0600", "AccountSid": "AC1", "From": FROM, "Body": "STOP"}
    good = twilio_signature(TWILIO_TOKEN, PUBLIC, list(form.items()))
    async with serving(engine) as api:
        forged = await api.form(
            form, token=None, channel="twilio", **{"X-Twilio-Signature": "AAAA"}
        )
        assert forged.status_code == 403
        tampered = {**form, "From": "+15555550001"}
        moved = await api.form(
            tampered, token=None, channel="twilio", **{"X-Twilio-Signature": good}
        )
        assert moved.status_code == 403
        assert api.consent() == {}
        ok = await api.form(form, token=None, channel="twilio", **{"X-Twilio-Signature": good})
        assert ok.status_code == 200
        assert api.consent() == {"200006^ACME": False}


async def test_refusals(engine: Engine) -> None:
    async with serving(engine) as api:
        body = {"MessageSid": "SM1", "From": FROM, "Body": "STOP"}
        assert (await api.form(body, token=None)).status_code == 401
        assert (await api.form(body, token="wrong")).status_code == 403
        assert (await api.form(body, channel="fax")).status_code == 404
        assert (await api.form({"Body": "STOP"})).status_code == 400
        raw = await api.http.post(
            f"{api.base}/sms/replies/sms",
            content=b"[1, 2]",
            headers={"Content-Type": "application/json", "X-Refloop-Token": TOKEN},
        )
        assert raw.status_code == 400
        text = await api.http.post(
            f"{api.base}/sms/replies/sms",
            content=b"STOP",
            headers={"Content-Type": "text/plain", "X-Refloop-Token": TOKEN},
        )
        assert text.status_code == 415
        huge = await api.http.post(
            f"{api.base}/sms/replies/sms",
            content=b"Body=" + b"x" * 70_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413
        assert api.rows(worklist_items) == []
        assert api.rows(patient_preferences) == []


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("STOP", "STOP"),
        ("stop.", "STOP"),
        ("Stop texting me", "STOP"),
        ("  quit ", "QUIT"),
        ("Alto", "ALTO"),
        ("parar", "PARAR"),
        ("START", "START"),
        ("Yes", "YES"),
        ("yes please call me", ""),
        ("HELP", "HELP"),
        ("ayuda", "AYUDA"),
        ("I can't make it Stop", ""),
        ("", ""),
        ("👍", ""),
    ],
)
def test_keywords(text: str, keyword: str) -> None:
    assert keyword_of(text) == keyword
