"""The whole closed loop through a real daemon and real peers, end to end.

ORM^O01 in over MLLP → the REF^I12 packet arrives at the specialist's MLLP peer and the
PDF packet at an SMTP server (STARTTLS and AUTH required) → the specialist's SIU S12,
SIU S14 and ORU^R01 come in on its own listener → the order status (ORM^O01, ORC-1 SC)
and the consult note (ORU^R01) arrive at the referring EHR's MLLP peer, and the FHIR
Task / ServiceRequest updates land in a real FHIR server (SEKMET).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hl7
import pytest
from sqlalchemy import select

from engine.store.database import open_engine
from engine.store.schema import deliveries, referral_events, referrals
from tests.conftest import running
from tests.helpers import RawMllp, make_config, segments
from tests.integration.certs import make_pki
from tests.loop_messages import orm, oru, siu
from tests.peers.mllp_peer import MllpPeer
from tests.peers.sekmet import Sekmet, require_sekmet
from tests.peers.smtp_peer import SmtpPeer

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "closed-loop"


def outbound_dir(tmp: Path, smtp_to: str) -> Path:
    """The closed-loop example's routes and write-back, a directory whose specialist also
    takes the PDF by e-mail, and a FHIR update of each status to the EHR's FHIR server."""
    out = tmp / "outbound-set"
    (out / "outbound").mkdir(parents=True)
    (out / "directory").mkdir()
    routes = (EXAMPLE / "outbound" / "routes.yaml").read_text()
    routes += """
  - id: fhir_status_to_source
    on: [appointment.booked, appointment.completed, consult_note.received]
    send: notification
    to: source
    channel: ehr-fhir
    format: fhir.status_update
    options: {service_request_status: "off"}   # SEKMET has no conditional PATCH
"""
    (out / "outbound" / "routes.yaml").write_text(routes)
    (out / "outbound" / "writeback.yaml").write_text(
        (EXAMPLE / "outbound" / "writeback.yaml").read_text()
    )
    (out / "directory" / "specialists.yaml").write_text(
        f"""schema: referral-directory/v1
specialists:
  - id: example-cardiology
    name: Example Heart Clinic (FAKE)
    npi: "1234567893"
    specialties: [cardiology]
    targets:
      - {{channel: specialist, format: hl7v2.ref_i12}}
      - {{channel: specialist-email, format: document.pdf, endpoint: "{smtp_to}"}}
    receiver: {{application: CARDIO_EMR, facility: EXAMPLEHEART}}
"""
    )
    return out


async def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := check()):
            await asyncio.sleep(0.05)
    return found


async def send(port: int, payload: bytes) -> None:
    peer = await RawMllp.connect(port)
    try:
        ack = await peer.send(payload)
    finally:
        await peer.close()
    assert segments(ack)["MSA"][1] == "AA"


def types_of(messages: list[bytes]) -> list[str]:
    return [str(hl7.parse(m.decode()).segment("MSH")[9]) for m in messages]


@pytest.mark.slow
async def test_the_closed_loop_end_to_end(
    upgraded_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_sekmet()
    monkeypatch.setenv("REFLOOP_TEST_SMTP_PASSWORD", "s3cret")
    pki = make_pki(tmp_path / "pki")
    async with MllpPeer() as specialist, MllpPeer() as ehr:
        with (
            SmtpPeer(pki.server_cert, pki.server_key, auth={"engine": "s3cret"}) as smtp,
            Sekmet.start(tmp_path / "sekmet") as fhir,
        ):
            config = make_config(
                upgraded_url,
                listeners=[
                    {"name": "ehr", "host": "127.0.0.1", "port": 0},
                    {"name": "specialist", "host": "127.0.0.1", "port": 0},
                ],
                outbound={"dir": str(outbound_dir(tmp_path, "intake@cardio.example"))},
                channels={
                    "specialist": {"type": "mllp", "host": "127.0.0.1", "port": specialist.port},
                    "ehr": {"type": "mllp", "host": "127.0.0.1", "port": ehr.port},
                    "specialist-email": {
                        "type": "smtp",
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "ca_file": str(pki.ca_cert),
                        "username": "engine",
                        "password": {"env": "REFLOOP_TEST_SMTP_PASSWORD"},
                        "from_address": "referrals@clinic.example",
                    },
                    "ehr-fhir": {"type": "fhir", "base_url": fhir.base_url},
                },
            )
            if True:
                async with running(config) as d:
                    ehr_port, specialist_port = (x.port for x in d.listeners)
                    await send(ehr_port, orm("CL-O", "CL100"))

                    [packet] = await specialist.wait_for(1, timeout=30)
                    ref = hl7.parse(packet.decode())
                    assert str(ref.segment("MSH")[9]).startswith("REF^I12")
                    assert str(ref.segment("RF1")[6]).startswith("CL100")
                    [mail] = await smtp.wait_for_async(1, timeout=30)
                    assert mail.tls_used
                    assert mail.attachments()[0].startswith(b"%PDF-")

                    for message in (
                        siu("CL-S12", "CL100"),
                        siu("CL-S14", "CL100", trigger="S14", status="Complete"),
                        oru("CL-R", "CL100"),
                    ):
                        await send(specialist_port, message)
                    back = await ehr.wait_for(3, timeout=30)
                    assert types_of(back)[:2] == ["ORM^O01^ORM_O01", "ORM^O01^ORM_O01"]
                    assert types_of(back)[2].startswith("ORU^R01")
                    statuses = [str(hl7.parse(m.decode()).segment("ORC")[5]) for m in back[:2]]
                    assert statuses[0] == "SC"  # booked: in process, scheduled
                    assert all(
                        str(hl7.parse(m.decode()).segment("ORC")[2]).startswith("CL100")
                        for m in back
                    )

                    def fhir_task() -> Any:
                        return [t for t in fhir.search("Task") if t.get("status") == "completed"]

                    [task] = await until(fhir_task)
                    assert task["businessStatus"]["coding"][0]["code"] == "7.0"

                    def all_delivered() -> bool:
                        eng = open_engine(upgraded_url)
                        try:
                            with eng.connect() as conn:
                                got = [r.status for r in conn.execute(select(deliveries))]
                        finally:
                            eng.dispose()
                        return bool(got) and all(s in ("delivered", "sent") for s in got)

                    await until(all_delivered)

    eng = open_engine(upgraded_url)
    try:
        with eng.connect() as conn:
            [state] = conn.execute(select(referrals.c.state)).scalars()
            types = list(
                conn.execute(
                    select(referral_events.c.type).order_by(referral_events.c.sequence)
                ).scalars()
            )
    finally:
        eng.dispose()
    assert state == "note_received"
    assert "referral.sent" in types
    assert "referral.delivered" in types
    assert types.count("delivery.succeeded") >= 6  # 3 MLLP write-backs + 3 FHIR updates
