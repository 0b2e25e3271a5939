"""The refloop command line: config check, db upgrade, messages list/show, send."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.edges.cli import main as cli
from tests.conftest import running
from tests.helpers import MAPPINGS, make_config, msg


def write_toml(path: Path, url: str, extra: str = "") -> Path:
    path.write_text(
        f'[database]\nurl = "{url}"\n\n[mappings]\ndir = "{MAPPINGS}"\n\n'
        f'[[mllp.listeners]]\nname = "main"\nport = 2575\n{extra}'
    )
    return path


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_config_check_accepts_the_shipped_engine_toml():
    result = invoke("config", "check", str(Path(__file__).parents[2] / "engine.toml"))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    assert "default:2575" in result.output


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("port = 99999\n", "mllp.listeners[0].port"),
        ('allowed_cidrs = ["10.0.0.0/33"]\n', "mllp.listeners[0].allowed_cidrs"),
        ("bogus = 1\n", "mllp.listeners[0].bogus"),
        ('timezone = "Mars/Olympus"\n', "mllp.listeners[0].timezone"),
        ('ack_mode = "sometimes"\n', "mllp.listeners[0].ack_mode"),
    ],
)
def test_config_errors_name_the_file_and_key_path(tmp_path, extra, expected):
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[[mllp.listeners]]\nname = "main"\nport = 2575\n{extra}'.replace(
            "port = 2575\nport = 99999", "port = 99999"
        )
    )
    result = invoke("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}: {expected}" in result.output


def test_config_check_honours_refloop_config_and_refuses_inline_passwords(tmp_path):
    path = write_toml(tmp_path / "env.toml", "postgresql://u:secret@db/refloop")
    result = invoke("config", "check", env={"REFLOOP_CONFIG": str(path)})
    assert result.exit_code == 1
    assert "database.url" in result.output
    assert "secret" not in result.output
    missing = invoke("config", "check", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 1
    assert "no such config file" in missing.output


def test_db_upgrade_and_run_share_refloop_database_url(tmp_path):
    config = write_toml(tmp_path / "c.toml", "sqlite:///unused.db")
    url = f"sqlite:///{tmp_path}/from-env.db"
    result = invoke("db", "upgrade", "--config", str(config), env={"REFLOOP_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env.db").exists()
    assert not (tmp_path / "unused.db").exists()


async def test_messages_list_show_and_send(tmp_path, upgraded_url):
    config_file = write_toml(tmp_path / "c.toml", upgraded_url)
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(msg("L1") + b"\n" + msg("L2", mtype="ADT^A08") + b"\n\n" + b"garbage\r")
    async with running(make_config(upgraded_url)) as d:
        port = str(d.listeners[0].port)
        sent = await asyncio.to_thread(invoke, "send", str(batch), "--port", port)
    assert sent.exit_code == 1  # one of the three was rejected
    # The in-process daemon logs to the same captured stdout; keep only send's lines.
    lines = [x for x in sent.output.splitlines() if x.startswith("batch.hl7:")]
    assert lines[0] == "batch.hl7: L1 AA"
    assert lines[1] == "batch.hl7: L2 AA"
    assert lines[2].startswith("batch.hl7: - AR no MSH segment")

    listed = invoke("messages", "list", "--json", "--config", str(config_file))
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["control_id"] for r in rows] == ["L1", "L2", None]
    for row in rows:
        assert {"id", "listener", "control_id", "message_type", "status", "received_at"} <= set(row)
    by_status = invoke(
        "messages", "list", "--json", "--status", "rejected", "--config", str(config_file)
    )
    assert [json.loads(x)["status"] for x in by_status.output.splitlines()] == ["rejected"]
    by_type = invoke("messages", "list", "--json", "--type", "ADT", "--config", str(config_file))
    assert [json.loads(x)["control_id"] for x in by_type.output.splitlines()] == ["L2"]
    limited = invoke("messages", "list", "--json", "--limit", "1", "--config", str(config_file))
    assert len(limited.output.splitlines()) == 1
    future = invoke(
        "messages", "list", "--json", "--since", "2999-01-01", "--config", str(config_file)
    )
    assert future.output == ""
    recent = invoke("messages", "list", "--since", "1h", "--config", str(config_file))
    assert "L1" in recent.output
    assert "L2" in recent.output

    shown = invoke("messages", "show", str(rows[2]["id"]), "--config", str(config_file))
    assert shown.exit_code == 0
    assert "rejected" in shown.output
    assert "100: no MSH segment" in shown.output
    assert "garbage" in shown.output
    shown_json = json.loads(
        invoke(
            "messages", "show", str(rows[0]["id"]), "--json", "--config", str(config_file)
        ).output
    )
    assert shown_json["segments"][0].startswith("MSH|")
    assert "MSA|AA|L1" in shown_json["ack"]
    absent = invoke("messages", "show", "999999", "--config", str(config_file))
    assert absent.exit_code == 1
    assert "no message with id 999999" in absent.output


def test_messages_list_on_an_unmigrated_database_names_the_fix(tmp_path):
    config_file = write_toml(tmp_path / "c.toml", f"sqlite:///{tmp_path}/empty.db")
    result = invoke("messages", "list", "--config", str(config_file))
    assert result.exit_code == 1
    assert "refloop db upgrade" in result.output


def test_send_to_a_closed_port_fails_cleanly(tmp_path):
    f = tmp_path / "m.hl7"
    f.write_bytes(msg("X"))
    result = invoke("send", str(f), "--port", "1", "--timeout", "2")
    assert result.exit_code == 1
    assert "could not talk to 127.0.0.1:1" in result.output


def test_config_check_names_missing_tls_files_by_key_path(tmp_path):
    path = write_toml(
        tmp_path / "tls.toml",
        f"sqlite:///{tmp_path}/x.db",
        '[mllp.listeners.tls]\ncert_file = "certs/server.crt"\nkey_file = "/nonexistent/key.pem"\n',
    )
    result = invoke("config", "check", str(path))
    assert result.exit_code == 1
    assert f"mllp.listeners[0].tls.cert_file: {tmp_path}/certs/server.crt does not exist" in (
        result.output
    )
    assert "mllp.listeners[0].tls.key_file: /nonexistent/key.pem does not exist" in result.output


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["messages", "list"], {"REFLOOP_DATABASE_URL": "garbage"}, "REFLOOP_DATABASE_URL is not"),
        (["db", "current"], {"REFLOOP_DATABASE_URL": "mysql://u@h/db"}, "REFLOOP_DATABASE_URL"),
        (
            ["db", "current"],
            {"REFLOOP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
            "cannot use the database at postgresql://nobody@127.0.0.1:1/none",
        ),
        (["run", "--mllp-port", "99999"], {}, "99999"),
        (["send", "x", "--port", "-1"], {}, "-1"),
    ],
)
def test_wrong_input_gets_a_message_not_a_traceback(tmp_path, args, env, expected):
    config = write_toml(tmp_path / "c.toml", f"sqlite:///{tmp_path}/x.db")
    if args[0] == "send":
        (tmp_path / "x").write_bytes(msg("X"))
        args = ["send", str(tmp_path / "x"), *args[2:]]
    result = CliRunner().invoke(cli, [*args, "--config", str(config)], env=env)
    assert result.exit_code in (1, 2), result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


async def test_run_names_the_listener_whose_port_is_taken(tmp_path, upgraded_url):
    async with running(make_config(upgraded_url)) as d:
        taken = d.listeners[0].port
        config = tmp_path / "c.toml"
        config.write_text(
            f'[database]\nurl = "{upgraded_url}"\n[http]\nport = 0\n'
            f'[mappings]\ndir = "{MAPPINGS}"\n'
            f'[[mllp.listeners]]\nname = "busy"\nhost = "127.0.0.1"\nport = {taken}\n'
        )
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert f"mllp.listeners[0] (busy): cannot listen on 127.0.0.1:{taken}" in result.output


def test_config_check_finds_port_clashes_and_unusable_tls_files(tmp_path):
    clash = tmp_path / "clash.toml"
    clash.write_text(
        '[http]\nport = 2575\n[[mllp.listeners]]\nname = "a"\nport = 2575\n'
        '[[mllp.listeners]]\nname = "b"\nhost = "127.0.0.1"\nport = 2575\n'
    )
    result = invoke("config", "check", str(clash))
    assert result.exit_code == 1
    assert "mllp.listeners[0]: port 2575 is already used by http" in result.output
    assert "mllp.listeners[1]: port 2575 is already used by http" in result.output
    (tmp_path / "not.pem").write_text("this is not a certificate\n")
    bad_tls = write_toml(
        tmp_path / "tls.toml",
        f"sqlite:///{tmp_path}/x.db",
        '[mllp.listeners.tls]\ncert_file = "not.pem"\nkey_file = "not.pem"\n',
    )
    result = invoke("config", "check", str(bad_tls))
    assert result.exit_code == 1
    assert "mllp.listeners[0].tls: listener main: cannot load TLS files" in result.output
