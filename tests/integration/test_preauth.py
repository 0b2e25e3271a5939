"""Pre-authorization through the real normaliser, the real dispatcher and a real MLLP
specialist, on SQLite and PostgreSQL: an order the payer table holds sends nothing until
``refloop referrals authorize``, which releases exactly one packet to the peer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select

from engine.config import Config, load_config
from engine.edges.cli import main as cli
from engine.edges.daemon import build_channels
from engine.metrics import Metrics
from engine.outbound.packets.registry import renderers
from engine.policy.authorization import AUTHORIZATION_FILE, load_authorization, requires
from engine.services.dispatcher import Dispatcher
from engine.services.mappings import load_outbound_checked, router_of
from engine.services.normaliser import Processor, Source
from engine.store.schema import deliveries, referral_events, referrals
from tests.integration.test_dispatcher import run_until
from tests.normalising import drain, open_, shipped, store
from tests.peers.mllp_peer import MllpPeer
from tests.unit.test_routing_network import write_network

T0 = datetime(2026, 3, 4, 16, 15, tzinfo=UTC)
TABLE = """\
schema: referral-authorization/v1
rules:
  - {id: hmo_orthopedics, payer: EXAMPLE-HMO, specialty: orthopedics, required: true}
"""


def order(control: str, placer: str, *, payer: str = "EXAMPLE-HMO") -> bytes:
    lines = [
        f"MSH|^~\\&|ACME_EHR|ACME|REFLOOP|HUB|20260304101500-0600||ORM^O01^ORM_O01|{control}|P|2.5.1",
        "PID|1||100001^^^ACME^MR||TESTPATIENT^AUTH||19800101|F",
        f"IN1|1|PLAN-HMO^Fake HMO|HMO0001^^^FAKENAIC^NIIP|{payer}",
        f"ORC|NW|{placer}^ACME|||||||20260304101200-0600",
        f"OBR|1|{placer}^ACME||REFORTHO^Orthopedics referral^L",
    ]
    return "\r".join(lines).encode() + b"\r"


@pytest.fixture
def engine(upgraded_url: str) -> Iterator[Engine]:
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


def write_config(tmp_path: Path, url: str, port: int) -> Path:
    """engine.toml: the database, the test network (routes, directory with every
    specialist at the peer), the payer table beside it, an MLLP channel to the peer."""
    root = write_network(tmp_path / "set", endpoint=f"127.0.0.1:{port}")
    (root / AUTHORIZATION_FILE).parent.mkdir(exist_ok=True)
    (root / AUTHORIZATION_FILE).write_text(TABLE, encoding="utf-8")
    path = tmp_path / "engine.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n\n[mappings]\ndir = "set"\n\n'
        "[policy]\nenabled = false\n\n"  # no timers: this is about the gate
        '[[mllp.listeners]]\nname = "test"\nport = 2575\n\n'
        f'[channels.specialist]\ntype = "mllp"\nhost = "127.0.0.1"\nport = {port}\n',
        encoding="utf-8",
    )
    return path


class Pipeline:
    """The real normaliser with the router and the gate the daemon gives it."""

    def __init__(self, engine: Engine, config: Config) -> None:
        channels = list(config.channels)
        self.outbound = load_outbound_checked(config.outbound_dir(), channels)
        table = load_authorization(config.mappings_dir())
        router = router_of(self.outbound, channels)
        mapping_set = shipped()
        self.engine = engine
        self.processor = Processor(
            engine,
            lambda: mapping_set,
            {"test": Source()},
            clock=lambda: T0,
            router=lambda: router,
            needs_auth=lambda r: requires(table, r),
        )

    def normalise(self, *payloads: bytes) -> None:
        store(self.engine, payloads, at=T0)
        drain(self.processor)

    def close(self) -> None:
        self.processor.close()


def dispatcher(engine: Engine, config: Config, pipeline: Pipeline) -> Dispatcher:
    outbound = pipeline.outbound
    return Dispatcher(
        engine,
        build_channels(config),
        renderers(),
        outbound.specialist,
        config.outbound,
        Metrics(),
        route_options=outbound.options,
    )


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def referral(engine: Engine, placer: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(referrals).where(referrals.c.placer_order_number == placer)
        ).one()


def outbox(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(deliveries.c.route_id, deliveries.c.recipient_id, deliveries.c.status).order_by(
                deliveries.c.id
            )
        )
        return [(r.route_id, r.recipient_id, r.status) for r in rows]


def timeline(engine: Engine, rid: str) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_events.c.type, referral_events.c.rule_id, referral_events.c.fields)
            .where(referral_events.c.referral_id == rid)
            .order_by(referral_events.c.sequence)
        )
        return [(r.type, r.rule_id, r.fields) for r in rows]


async def test_a_held_referral_sends_nothing_until_authorized(
    engine: Engine, tmp_path: Path, upgraded_url: str
) -> None:
    async with MllpPeer(idempotent=True) as peer:
        path = write_config(tmp_path, upgraded_url, peer.port)
        config = load_config(path)
        pipeline = Pipeline(engine, config)
        try:
            pipeline.normalise(order("PA-1", "PA100"), order("PA-2", "PA200", payer="OTHER"))
        finally:
            pipeline.close()
        held = referral(engine, "PA100")
        assert held.state == "auth_pending"
        assert [t for t, _, _ in timeline(engine, held.id)] == [
            "referral.created",
            "authorization.pending",
        ]
        assert timeline(engine, held.id)[1][1] == "auth:hmo_orthopedics"
        # Only the referral the table does not hold has a packet waiting.
        assert outbox(engine) == [("packet_to_specialist", "ortho-south", "pending")]
        d = dispatcher(engine, config, pipeline)
        await run_until(d, lambda: len(peer.messages) == 1, timeout=20)
        assert outbox(engine)[0][2] == "delivered"

        # Actions that do not fit are refused and write nothing.
        refused = CliRunner().invoke(
            cli,
            [
                "referrals",
                "authorize",
                referral(engine, "PA200").id,
                "--config",
                str(path),
                "--by",
                "ana",
            ],
        )
        assert refused.exit_code == 1
        assert "not auth_pending: it is not waiting for an authorization" in refused.output
        unknown = CliRunner().invoke(
            cli, ["referrals", "authorize", "NOPE", "--config", str(path), "--by", "ana"]
        )
        assert unknown.exit_code == 1
        assert "no referral with id or placer order number NOPE" in unknown.output

        done = invoke(
            "referrals",
            "authorize",
            "PA100",
            "--config",
            str(path),
            "--by",
            "ana",
            "--number",
            "PA-7788",
            "--payer",
            "EXAMPLE-HMO",
        )
        assert f"referral {held.id}: auth_pending -> created" in done.output
        assert "packet_after_authorization" in done.output
        after = referral(engine, "PA100")
        assert after.state == "created"
        approved = timeline(engine, held.id)[-1]
        assert (approved[0], approved[1]) == ("authorization.approved", "hand:authorize")
        assert '"actor":"ana"' in (approved[2] or "")
        assert outbox(engine)[1:] == [("packet_after_authorization", "ortho-south", "pending")]

        # A second click: not waiting any more, nothing appended, no second packet.
        again = CliRunner().invoke(
            cli, ["referrals", "authorize", "PA100", "--config", str(path), "--by", "ana"]
        )
        assert again.exit_code == 1
        assert len(timeline(engine, held.id)) == 3
        assert len(outbox(engine)) == 2

        # a dispatcher runs once: the next start is a new one, as after a restart
        await run_until(
            dispatcher(engine, config, pipeline), lambda: len(peer.messages) == 2, timeout=20
        )
        packet = hl7.parse(peer.messages[1].decode())
        assert str(packet.segment("MSH")[9]).startswith("REF^I12")
        assert "PA100" in str(packet.segment("RF1")[6])
        with engine.connect() as conn:
            states = [
                r.state_after
                for r in conn.execute(
                    select(referral_events.c.state_after)
                    .where(referral_events.c.referral_id == held.id)
                    .order_by(referral_events.c.sequence)
                )
            ]
        assert states[-1] == "sent"  # the dispatcher recorded referral.sent
