"""refloop referrals list|show|rebuild and messages replay|parked|list|show, on both databases."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from engine.edges.cli import main as cli
from engine.store.schema import referrals
from tests.helpers import MAPPINGS
from tests.loop_messages import loop, orm, siu, unmapped
from tests.normalising import drain, open_, processor, statuses, store

ZZZ_MAPPING = """\
schema: referral-mapping/v1
id: local.zzz
title: A local Z message the clinic sends, never about a referral
match:
  message_type: [ZZZ]
defaults:
  timezone: UTC
rules:
  - id: local_noise
    emit: ignore
    reason: the clinic's local status pings
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def setup(tmp_path, upgraded_url):
    """A config file, its own copy of the mappings, and a database with one whole loop,
    a parked booking and a message no mapping handles."""
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    config = tmp_path / "engine.toml"
    config.write_text(
        f'[database]\nurl = "{upgraded_url}"\n\n[mappings]\ndir = "mappings"\n\n'
        '[[mllp.listeners]]\nname = "test"\nport = 2575\n'
    )
    engine = open_(upgraded_url)
    store(engine, [*loop("CLI1"), siu("WAIT1", "NOBODY"), unmapped("ZZ1")])
    proc = processor(engine)
    drain(proc)
    proc.close()
    yield config, root, engine
    engine.dispose()


def test_referrals_list_json_has_the_contracted_keys(setup):
    config, _, _ = setup
    result = invoke("referrals", "list", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    row = json.loads(line)
    assert {
        "id",
        "state",
        "placer_order_number",
        "referral_number",
        "specialty",
        "created_at",
        "updated_at",
    } <= set(row)
    assert (row["state"], row["placer_order_number"], row["specialty"]) == (
        "note_received",
        "CLI1",
        "cardiology",
    )
    assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
    empty = invoke("referrals", "list", "--state", "cancelled", "--json", "--config", str(config))
    assert empty.output == ""
    table = invoke("referrals", "list", "--config", str(config))
    assert "note_received" in table.output
    assert "CLI1" in table.output


def test_referrals_show_by_placer_number_or_id(setup):
    config, _, _ = setup
    result = invoke("referrals", "show", "CLI1", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["state"] == "note_received"
    assert [
        (e["sequence"], e["type"], e["message_id"], e["correlation_method"], e["anomaly"])
        for e in data["events"]
    ] == [
        (1, "referral.created", 1, "created", None),
        (2, "appointment.booked", 2, "placer_order", None),
        (3, "appointment.completed", 3, "placer_order", None),
        (4, "consult_note.received", 4, "placer_order", None),
    ]
    assert data["events"][0]["rule_id"] == "new_referral"
    assert data["events"][0]["message_type"] == "ORM^O01^ORM_O01"
    assert data["events"][1]["confidence"] == pytest.approx(0.99)
    text = invoke("referrals", "show", data["id"], "--config", str(config))
    assert text.exit_code == 0, text.output
    assert "note_received" in text.output
    assert "appointment.completed" in text.output
    assert "from message 3 SIU^S14^SIU_S12 (CLI1-S14)" in text.output
    missing = invoke("referrals", "show", "NOPE", "--config", str(config))
    assert missing.exit_code == 1
    assert "no referral with id or placer order number NOPE" in missing.output


def test_referrals_rebuild_corrects_a_damaged_projection(setup):
    config, _, engine = setup
    with engine.begin() as conn:
        conn.execute(update(referrals).values(state="cancelled"))
    result = invoke("referrals", "rebuild", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "rebuilt 1 referrals from 4 events" in result.output
    assert "1 differed from the log" in result.output
    assert json.loads(invoke("referrals", "list", "--json", "--config", str(config)).output)[
        "state"
    ] == ("note_received")


def test_replay_by_id_is_idempotent_and_says_what_happened(setup):
    config, _, engine = setup
    for _ in range(2):
        result = invoke("messages", "replay", "1", "4", "--config", str(config))
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0].startswith("message 1 (ORM^O01^ORM_O01): processed - 1 already in the log")
        assert lines[1].startswith("message 4 (ORU^R01^ORU_R01): processed - 1 already in the log")
    shown = json.loads(
        invoke("referrals", "show", "CLI1", "--json", "--config", str(config)).output
    )
    assert len(shown["events"]) == 4
    assert statuses(engine)[:4] == ["processed"] * 4


def test_replay_mapping_errors_after_the_mapping_is_fixed(setup):
    config, root, engine = setup
    listed = invoke(
        "messages", "list", "--status", "mapping_error", "--json", "--config", str(config)
    )
    assert [json.loads(line)["id"] for line in listed.output.splitlines()] == [6]
    before = invoke("messages", "replay", "--status", "mapping_error", "--config", str(config))
    assert "message 6 (ZZZ^Z01): mapping_error - no_mapping: no mapping handles ZZZ^Z01" in (
        before.output
    )
    (root / "hl7v2" / "local.map.yaml").write_text(ZZZ_MAPPING)
    after = invoke(
        "messages", "replay", "--status", "mapping_error", "--json", "--config", str(config)
    )
    assert after.exit_code == 0, after.output
    report = json.loads(after.output)
    assert (report["id"], report["status"], report["mapping_id"]) == (6, "ignored", "local.zzz")
    assert statuses(engine)[5] == "ignored"


def test_replay_since_and_refusals(setup):
    config, _, _ = setup
    result = invoke("messages", "replay", "--since", "1h", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["status"] for line in result.output.splitlines()] == [
        "processed",
        "processed",
        "processed",
        "processed",
        "parked",
        "mapping_error",
    ]
    assert invoke("messages", "replay", "--config", str(config)).exit_code == 2
    assert invoke("messages", "replay", "99", "--config", str(config)).exit_code == 1
    bad_status = invoke("messages", "replay", "--status", "duplicate", "--config", str(config))
    assert bad_status.exit_code == 2


def test_replay_refuses_a_broken_mapping_set_and_changes_nothing(setup):
    config, root, engine = setup
    before = statuses(engine)
    orders = root / "hl7v2" / "orders.map.yaml"
    orders.write_text(orders.read_text().replace("emit: referral.created", "emit: referral.creatd"))
    result = invoke("messages", "replay", "1", "--config", str(config))
    assert result.exit_code == 1
    assert "orders.map.yaml:" in result.output
    assert "nothing replayed" in result.output
    assert statuses(engine) == before
    check = invoke("config", "check", str(config))
    assert check.exit_code == 1
    assert "orders.map.yaml:" in check.output


def test_messages_parked_lists_parked_and_unmatched_with_their_keys(setup):
    config, _, engine = setup
    result = invoke("messages", "parked", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines()]
    assert (row["id"], row["status"]) == (5, "parked")
    assert "placer_order NOBODY^ACME" in row["waits_for"]
    later = datetime.now(UTC) + timedelta(days=8)
    proc = processor(engine, clock=lambda: later)
    proc.sweep(timedelta(days=7))
    proc.close()
    unmatched = invoke("messages", "parked", "--status", "unmatched", "--config", str(config))
    assert "unmatched" in unmatched.output
    assert "placer_order NOBODY^ACME" in unmatched.output


def test_messages_show_and_list_carry_what_normalisation_decided(setup):
    config, _, _ = setup
    shown = json.loads(invoke("messages", "show", "1", "--json", "--config", str(config)).output)
    assert [e["type"] for e in shown["events"]] == ["referral.created"]
    assert shown["attempts"] == 1
    text = invoke("messages", "show", "6", "--config", str(config)).output
    assert "no_mapping" in text
    listed = invoke("messages", "list", "--status", "processed", "--json", "--config", str(config))
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["rule_id"] for r in rows] == [
        "new_referral",
        "appointment_booked",
        "visit_completed",
        "consult_note_final",
    ]
    assert all(r["normalised_at"] for r in rows)


def test_an_order_replayed_alone_releases_what_waits_for_it(tmp_path, upgraded_url):
    config = tmp_path / "engine.toml"
    config.write_text(f'[database]\nurl = "{upgraded_url}"\n\n[mappings]\ndir = "{MAPPINGS}"\n')
    engine = open_(upgraded_url)
    try:
        store(engine, [siu("EARLY1", "CLI2"), orm("ORDER2", "CLI2")])
        with engine.begin() as conn:  # as if only the booking had been normalised
            conn.exec_driver_sql("UPDATE messages SET status = 'parked' WHERE id = 2")
        proc = processor(engine)
        drain(proc)
        proc.close()
        result = invoke("messages", "replay", "2", "--config", str(config))
        assert "released parked message(s) 1" in result.output, result.output
        assert statuses(engine) == ["received", "processed"]
    finally:
        engine.dispose()


def test_paths_are_relative_to_the_config_file(setup):
    config, _, _ = setup
    assert Path(config).parent.joinpath("mappings").is_dir()
    assert invoke("config", "check", str(config)).exit_code == 0
