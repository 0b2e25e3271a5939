"""Patient outreach end to end in a running daemon: the scheduler plans a reminder, the
dispatcher texts it through the sms channel to a real HTTP server playing Twilio, the
patient answers STOP on the reply webhook, and the next reminder is not sent."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select
from werkzeug import Response

from engine.domain.referral import Event
from engine.outbound.routing import EMPTY
from engine.policy.language import load_policy
from engine.services.outreach_runtime import planner_for
from engine.services.policy_runtime import NewEvent, record
from engine.services.scheduler import Scheduler
from engine.store.database import open_engine
from engine.store.eventlog import LogConnection
from engine.store.schema import (
    deliveries,
    patient_preferences,
    referral_events,
    referrals,
    worklist_items,
)
from tests.channels.http_peer import (
    Peer,
    http_server_fixture,  # noqa: F401 (a fixture)
    peer_fixture,  # noqa: F401 (a fixture)
)
from tests.conftest import running
from tests.helpers import MAPPINGS, RawMllp, segments, wait_for
from tests.loop_messages import orm

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
PHONE = "+15550100123"  # synthetic (555-01xx)
TOKEN = "reply-secret-for-tests"
POLICY = load_policy(MAPPINGS)


@pytest.fixture
def peer_path() -> str:
    return MESSAGES


def awake_hours() -> tuple[str, str]:
    """Quiet hours that do not cover now (or now + 4 days) in the default zone."""
    hour = datetime.now(ZoneInfo("America/New_York")).hour
    return f"{(hour + 3) % 24:02d}:00", f"{(hour + 4) % 24:02d}:00"


def add(url: str, rid: str, kind: Event, at: datetime, fields: dict[str, object]) -> None:
    eng = open_engine(url)
    log = LogConnection(eng)
    try:
        eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rid}/{kind}"))
        record(log, rid, [NewEvent(eid, kind, fields, at)], at, policy=POLICY)
    finally:
        log.close()
        eng.dispose()


def rows(url: str, query):  # type: ignore[no-untyped-def]
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return conn.execute(query).all()
    finally:
        eng.dispose()


async def test_a_reminder_is_texted_and_stop_ends_the_outreach(
    tmp_path, upgraded_url, config_for, peer: Peer, monkeypatch
):
    peer.answer(
        Response(
            json.dumps({"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"}),
            status=201,
            content_type="application/json",
        )
    )
    (tmp_path / "twilio.token").write_text("twilio-auth-token-test\n")
    monkeypatch.setenv("REFLOOP_TEST_REPLY_TOKEN", TOKEN)
    quiet_start, quiet_end = awake_hours()
    cfg = config_for(
        source=tmp_path / "engine.toml",
        channels={
            "sms": {
                "type": "sms",
                "base_url": peer.base_url(),
                "account_sid": ACCOUNT_SID,
                "auth_token": {"file": "twilio.token"},
                "from_number": "+15550100100",
            }
        },
        outbound={"poll_seconds": 0.05, "render_processes": 0},
        policy={"poll_seconds": 0.05},
        outreach={
            "quiet_start": quiet_start,
            "quiet_end": quiet_end,
            "reply_token": {"env": "REFLOOP_TEST_REPLY_TOKEN"},
        },
    )
    async with running(cfg) as d:
        assert d.scheduler is not None
        client = await RawMllp.connect(d.listeners[0].port)
        ack = await client.send(orm("OUT1-O", "POUT1"))
        assert segments(ack)["MSA"][1] == "AA"
        await client.close()
        found = await wait_for(lambda: rows(upgraded_url, select(referrals.c.id)), timeout=15)
        rid = found[0][0]
        # The patient's mobile and consent (as an order's PID would carry them), and the
        # packet sent four days ago: the 2-hour text and the 1-day reminder are due now
        # (the second prefers e-mail; this patient has none, so it is a text too).
        sent = datetime.now(UTC) - timedelta(days=4)
        contact = {"patient.phone": PHONE, "patient.consent.sms": "yes", "patient.language": "es"}
        add(upgraded_url, rid, Event.REFERRAL_UPDATED, sent - timedelta(hours=1), contact)
        add(upgraded_url, rid, Event.REFERRAL_SENT, sent, {})
        d.scheduler.wake()
        await wait_for(lambda: len(peer.seen) >= 2, timeout=15)
        text = peer.seen[0].form
        assert text["To"] == PHONE
        assert "ALTO" in text["Body"]  # the Spanish template, with its opt-out words
        outreach = rows(
            upgraded_url,
            select(deliveries.c.status, deliveries.c.channel).where(
                deliveries.c.kind == "outreach"
            ),
        )
        assert [o.channel for o in outreach] == ["sms", "sms"]

        # The patient answers STOP on the gateway; the gateway posts it to refloop.
        async with httpx.AsyncClient() as http:
            bad = await http.post(
                f"http://127.0.0.1:{d.http_port}/sms/replies/sms",
                data={"From": PHONE, "Body": "STOP", "MessageSid": "SMreply1"},
                headers={"X-Refloop-Token": "wrong"},
            )
            answer = await http.post(
                f"http://127.0.0.1:{d.http_port}/sms/replies/sms",
                data={"From": PHONE, "Body": "STOP", "MessageSid": "SMreply1"},
                headers={"X-Refloop-Token": TOKEN},
            )
        assert bad.status_code in (401, 403)
        assert answer.status_code == 200
        prefs = rows(upgraded_url, select(patient_preferences.c.sms_consent))
        assert [p.sms_consent for p in prefs] == [False]
        reasons = {r.reason for r in rows(upgraded_url, select(worklist_items.c.reason))}
        assert "patient_reply" in reasons

        # The day-7 reminder comes due (another scheduler, in virtual time: the daemon's
        # holds its own connection): consent was withdrawn, nothing is texted.
        eng = open_engine(upgraded_url)
        later = Scheduler(
            eng,
            policy=lambda: POLICY,
            outbound=lambda: EMPTY,
            outreach=planner_for(cfg, POLICY),
        )
        try:
            fired = await asyncio.to_thread(later.tick, sent + timedelta(days=7, minutes=1))
        finally:
            later.close()
            eng.dispose()
        assert "outreach" in fired.effects
    types = [
        t
        for (t,) in rows(
            upgraded_url,
            select(referral_events.c.type)
            .where(referral_events.c.referral_id == rid)
            .order_by(referral_events.c.sequence),
        )
    ]
    assert types.count(Event.OUTREACH_PLANNED.value) == 2
    assert types[-1] == Event.OUTREACH_SKIPPED.value
    assert Event.PATIENT_REPLIED.value in types
    assert len(peer.of("POST")) == 2
