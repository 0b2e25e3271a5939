"""The outbound side of the command line: channels in ``config check``, the
``deliveries`` commands on a real outbox, and ``refloop listen`` as a real MLLP sink."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from engine.edges.cli import main as cli
from engine.store.database import open_engine
from engine.store.outbox import Outbox
from engine.store.schema import deliveries
from tests.helpers import MAPPINGS, free_port, wait_until
from tests.integration.test_dispatcher import Clock, normalise
from tests.loop_messages import orm

REFLOOP = str(Path(sys.executable).with_name("refloop"))


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def toml(path: Path, url: str, channels: str = "") -> Path:
    path.write_text(
        f'[database]\nurl = "{url}"\n\n[mappings]\ndir = "{MAPPINGS}"\n\n'
        f'[[mllp.listeners]]\nname = "main"\nport = {free_port()}\n\n{channels}'
    )
    return path


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[channels.fax1]\ntype = "telex"\n', "channels.fax1.type: unknown channel type 'telex'"),
        ('[channels.spec]\ntype = "mllp"\nhost = "127.0.0.1"\n', "channels.spec.port:"),
        ('[channels.spec]\ntype = "mllp"\nport = 1\nbogus = 2\n', "channels.spec.bogus:"),
        ("[channels.spec]\nport = 1\n", "channels.spec.type: missing"),
        ('[channels.hook]\ntype = "webhook"\nurl = "ftp://x"\n', "channels.hook."),
    ],
)
def test_config_check_refuses_a_bad_channel_by_its_key_path(
    tmp_path: Path, table: str, expected: str
) -> None:
    path = toml(tmp_path / "bad.toml", f"sqlite:///{tmp_path}/x.db", table)
    result = invoke("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}: {expected}" in result.output


def test_config_check_lists_installed_channel_types_when_one_is_unknown(tmp_path: Path) -> None:
    path = toml(tmp_path / "bad.toml", f"sqlite:///{tmp_path}/x.db", '[channels.a]\ntype = "x"\n')
    result = invoke("config", "check", str(path))
    for name in ("mllp", "fhir", "smtp", "fax", "webhook", "sms", "file"):
        assert name in result.output


def test_config_check_accepts_the_closed_loop_example() -> None:
    example = Path(__file__).parents[2] / "deploy" / "examples" / "closed-loop.toml"
    result = invoke("config", "check", str(example))
    assert result.exit_code == 0, result.output
    assert "ehr:2575" in result.output
    assert "specialist:2576" in result.output


def test_an_enabled_route_to_an_undefined_channel_fails_config_check(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "deploy" / "examples"
    text = (example / "closed-loop.toml").read_text()
    # The example's directory and write-back name channels "specialist" and "ehr".
    text = text.replace("[channels.ehr]", "[channels.ehr-renamed]")
    text = text.replace('dir = "closed-loop"', f'dir = "{example / "closed-loop"}"')
    text = text.replace('dir = "../../mappings"', f'dir = "{MAPPINGS}"')
    path = tmp_path / "loop.toml"
    path.write_text(text)
    result = invoke("config", "check", str(path))
    assert result.exit_code == 1
    assert "writeback.yaml" in result.output
    assert "'ehr'" in result.output


@pytest.fixture
def outbox_config(tmp_path: Path, upgraded_url: str) -> tuple[Path, str]:
    eng = open_engine(upgraded_url)
    try:
        normalise(eng, [orm("O1", "P1"), orm("O2", "P2", mrn="200002")], Clock())
    finally:
        eng.dispose()
    return toml(tmp_path / "engine.toml", upgraded_url), upgraded_url


def statuses(url: str) -> list[str]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(
                conn.execute(select(deliveries.c.status).order_by(deliveries.c.id)).scalars()
            )
    finally:
        eng.dispose()


def kill(url: str, delivery_id: int) -> None:
    eng = open_engine(url)
    raw = eng.raw_connection()
    try:
        ob = Outbox(raw.driver_connection, eng.dialect.name)
        now = datetime.now(UTC)
        [claimed] = ob.claim(now, "t", 1, ["fake"])  # the oldest: the one to kill
        assert claimed.id == delivery_id
        ob.begin()
        ob.finish(claimed.id, "dead", now, error="ACK AR (ERR-3 207)")
        ob.commit()
    finally:
        raw.close()
        eng.dispose()


def test_deliveries_list_shows_status_channel_and_no_payload(outbox_config) -> None:
    path, _ = outbox_config
    result = invoke("deliveries", "list", "--config", str(path), "--json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    assert '"status": "pending"' in lines[0]
    assert '"channel": "fake"' in lines[0]
    assert "payload" not in result.output
    assert "TESTPATIENT" not in result.output


def test_deliveries_retry_and_cancel(outbox_config) -> None:
    path, url = outbox_config
    kill(url, 1)
    assert statuses(url)[0] == "dead"
    listed = invoke("deliveries", "list", "--config", str(path), "--status", "dead")
    assert "ACK AR (ERR-3 207)" in listed.output

    result = invoke("deliveries", "retry", "--config", str(path), "--dead")
    assert result.exit_code == 0, result.output
    assert "1: pending" in result.output
    assert statuses(url)[0] == "pending"

    assert invoke("deliveries", "cancel", "--config", str(path), "2").exit_code == 0
    assert statuses(url) == ["pending", "cancelled"]
    again = invoke("deliveries", "cancel", "--config", str(path), "2")
    assert again.exit_code == 1
    assert "cancelled" in again.output
    missing = invoke("deliveries", "retry", "--config", str(path), "99")
    assert missing.exit_code == 1
    assert "99" in missing.output


def test_refloop_listen_prints_what_arrives_and_answers_aa(tmp_path: Path) -> None:
    port = free_port()
    sink = subprocess.Popen(
        [REFLOOP, "listen", "--port", str(port), "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = tmp_path / "orm.hl7"
        message.write_bytes(orm("LISTEN1", "P9"))

        def sent() -> bool:
            out = subprocess.run(
                [REFLOOP, "send", "--port", str(port), str(message)],
                capture_output=True,
                text=True,
                check=False,
            )
            return out.returncode == 0 and "AA" in out.stdout

        wait_until(sent)  # refused until the sink listens: retried, not slept on
        out, _ = sink.communicate(timeout=20)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()
    assert sink.returncode == 0
    assert "ORC|NW|P9^ACME" in out


async def test_referrals_show_names_the_delivery_behind_an_outcome(
    tmp_path: Path, upgraded_url: str
) -> None:
    from channels.base import Receipt
    from channels.testing import FakeChannel
    from tests.integration.test_dispatcher import dispatcher, rows, run_until

    clock = Clock()
    eng = open_engine(upgraded_url)
    try:
        normalise(eng, [orm("O1", "SHOW-1")], clock)
        channel = FakeChannel("fake")
        channel.play([Receipt(peer_reference="MSG1", detail="ACK AA")])
        d = dispatcher(eng, channel, clock)
        await run_until(d, lambda: rows(eng)[0].status == "delivered")
    finally:
        eng.dispose()
    path = toml(tmp_path / "engine.toml", upgraded_url)
    out = invoke("referrals", "show", "SHOW-1", "--config", str(path)).output
    assert "referral.sent" in out
    assert "delivery 1 (packet json.event via fake), route test-packet: ACK AA" in out


def test_config_check_builds_channels_so_a_missing_tls_file_shows_now(tmp_path: Path) -> None:
    table = (
        '[channels.spec]\ntype = "mllp"\nport = 1\n\n'
        '[channels.spec.tls]\nca_file = "no-such-ca.pem"\n'
    )
    path = toml(tmp_path / "tls.toml", f"sqlite:///{tmp_path}/x.db", table)
    result = invoke("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}: channels.spec.tls.ca_file: cannot load" in result.output
