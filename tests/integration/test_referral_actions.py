"""The actions by hand on one referral (``refloop referrals deny-auth|close|cancel``), on
SQLite and PostgreSQL through the real normaliser and the real command line: each appends
one event with its actor, refuses what does not fit the state, and appends once."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import Engine, select

from engine.config import load_config
from engine.edges.cli import main as cli
from engine.store.schema import worklist_items
from tests.integration.test_preauth import (
    T0,
    Pipeline,
    engine,
    invoke,
    order,
    outbox,
    referral,
    timeline,
    write_config,
)

__all__ = ["engine"]  # the fixture, shared with test_preauth


def test_deny_close_and_cancel_by_hand(engine: Engine, tmp_path: Path, upgraded_url: str) -> None:
    path = write_config(tmp_path, upgraded_url, 9)  # nothing is delivered here
    config = load_config(path)
    pipeline = Pipeline(engine, config)
    try:
        pipeline.normalise(order("PD-1", "PD100"), order("PD-2", "PD200"))
    finally:
        pipeline.close()
    rid = referral(engine, "PD100").id
    denied = invoke(
        "referrals",
        "deny-auth",
        rid,
        "--config",
        str(path),
        "--by",
        "bo",
        "--reason",
        "not covered",
    )
    assert f"referral {rid}: auth_pending -> auth_pending" in denied.output
    kind, rule, fields = timeline(engine, rid)[-1]
    assert (kind, rule) == ("authorization.denied", "hand:deny-auth")
    assert '"status_reason":"not covered"' in (fields or "")
    assert referral(engine, "PD100").state == "auth_pending"

    closed = invoke("referrals", "close", rid, "--config", str(path), "--by", "bo")
    assert "auth_pending -> closed" in closed.output
    assert timeline(engine, rid)[-1][0] == "referral.closed_by_hand"
    twice = CliRunner().invoke(
        cli, ["referrals", "close", rid, "--config", str(path), "--by", "bo"]
    )
    assert twice.exit_code == 1
    assert "already closed" in twice.output
    cancel_closed = CliRunner().invoke(
        cli, ["referrals", "cancel", rid, "--config", str(path), "--by", "bo"]
    )
    assert cancel_closed.exit_code == 1

    other = referral(engine, "PD200").id
    cancelled = invoke("referrals", "cancel", "PD200", "--config", str(path), "--by", "bo")
    assert f"referral {other}: auth_pending -> cancelled" in cancelled.output
    kind, rule, fields = timeline(engine, other)[-1]
    assert (kind, rule) == ("referral.cancelled", "hand:cancel")
    assert '"actor":"bo"' in (fields or "")
    nobody = CliRunner().invoke(cli, ["referrals", "close", other, "--config", str(path)])
    assert nobody.exit_code == 2  # --by is required
    assert outbox(engine) == []  # held referrals never had a packet


def test_the_same_action_on_the_same_sequence_appends_once(
    engine: Engine, tmp_path: Path, upgraded_url: str
) -> None:
    """Two clicks that both read the referral before either wrote: one event."""
    from engine.edges.cli_referrals import act

    path = write_config(tmp_path, upgraded_url, 9)
    config = load_config(path)
    pipeline = Pipeline(engine, config)
    try:
        pipeline.normalise(order("PE-1", "PE100"))
    finally:
        pipeline.close()
    rid = referral(engine, "PE100").id
    now = T0 + timedelta(hours=1)
    first = act(engine, config, rid, "close", "cy", now)
    assert first.appended
    # the second click read sequence 2 as well: replay it by hand with the same id
    from engine.edges.cli_referrals import hand_event
    from engine.services.mappings import NO_POLICY
    from engine.services.policy_runtime import record
    from engine.store.eventlog import LogConnection

    log = LogConnection(engine)
    try:
        rows = record(log, rid, [hand_event("close", rid, 2, "cy", now)], now, policy=NO_POLICY)
    finally:
        log.close()
    assert rows == []
    assert [t for t, _, _ in timeline(engine, rid)].count("referral.closed_by_hand") == 1
    with engine.connect() as conn:
        held = conn.execute(
            select(worklist_items.c.reason, worklist_items.c.status, worklist_items.c.detail)
        ).all()
    # the hold was on the worklist, and closing the referral resolved it
    assert [(r.reason, r.status) for r in held] == [("auth_hold", "resolved")]
    assert "auth:hmo_orthopedics" in held[0].detail
