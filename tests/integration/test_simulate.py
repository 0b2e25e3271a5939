"""``refloop simulate`` end to end, and the KPIs read from a real store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from engine.edges.cli import main
from engine.services.mappings import NO_POLICY
from engine.sim import messages
from engine.sim.compare import KPI_KEYS, load_setup, package_mappings, simulate
from engine.sim.network import build
from engine.sim.run import Run, outbound_for, run
from engine.store.kpis import store_kpis
from engine.store.schema import deliveries, referral_events
from engine.store.schema import messages as messages_table
from tests.normalising import drain, open_, processor, store


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No engine.toml here: simulate falls back to the shipped mappings."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["simulate", *args], catch_exceptions=False)


def as_json(*args: str) -> dict[str, Any]:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_json_is_one_object_with_both_runs_and_every_kpi(in_empty_dir: Path) -> None:
    data = as_json("--referrals", "12", "--days", "40", "--seed", "3")
    assert list(data) == ["with_policy", "without_policy"]
    for side in data.values():
        assert list(side) == list(KPI_KEYS)
        assert side["referrals"] == 12
        assert isinstance(side["referrals"], int)
        for key in KPI_KEYS:
            value = side[key]
            if key == "referrals":
                continue
            if key == "median_days_to_close":
                assert value is None or (isinstance(value, float) and value > 0)
                continue
            assert isinstance(value, float | int)
            assert 0.0 <= value <= 1.0
            assert round(value, 4) == value


def test_the_same_seed_gives_the_same_numbers_another_seed_others(in_empty_dir: Path) -> None:
    args = ("--referrals", "25", "--days", "40")
    first = cli(*args, "--seed", "11", "--json").output
    again = cli(*args, "--seed", "11", "--json").output
    other = cli(*args, "--seed", "12", "--json").output
    assert first == again
    assert json.loads(first) != json.loads(other)


def test_the_shipped_policy_closes_more_loops_than_none() -> None:
    result = simulate(load_setup(package_mappings()), referrals=60, days=45, seed=1)
    w, wo = result.with_policy, result.without_policy
    assert w.referrals == wo.referrals == 60
    assert w.loop_closure_rate > wo.loop_closure_rate
    assert w.open_at_30_days_rate < wo.open_at_30_days_rate
    assert w.note_return_rate >= wo.note_return_rate
    # The nudges raise worklist items too: exceptions are the policy's visible cost.
    assert w.exception_rate > wo.exception_rate
    # Without a policy the default network looks like a manual practice.
    assert 0.2 <= wo.open_at_30_days_rate <= 0.45


def _policy_dir(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "candidate"
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "p.yaml").write_text(text, encoding="utf-8")
    return root


def test_a_policy_without_ladders_nudges_nobody(in_empty_dir: Path) -> None:
    root = _policy_dir(
        in_empty_dir,
        "schema: referral-policy/v1\n"
        "windows:\n"
        "  - {id: unscheduled, states: [sent, accepted], within: 14d, reason: late}\n",
    )
    data = as_json("--referrals", "30", "--days", "40", "--seed", "2", "--policy", str(root))
    w, wo = data["with_policy"], data["without_policy"]
    # Windows only put referrals on the worklist: the patients' paths are unchanged.
    for key in ("loop_closure_rate", "open_at_30_days_rate", "median_days_to_close"):
        assert w[key] == wo[key]
    assert w["exception_rate"] > wo["exception_rate"]


def test_a_policy_with_an_error_is_reported_file_line_and_exits_2(in_empty_dir: Path) -> None:
    root = _policy_dir(
        in_empty_dir,
        "schema: referral-policy/v1\nwindows:\n  - {id: w, states: [sent], within: soon}\n",
    )
    result = cli("--referrals", "5", "--days", "40", "--policy", str(root))
    assert result.exit_code == 2
    assert f"{root / 'policies' / 'p.yaml'}:3:" in result.stderr
    assert "nothing was simulated" in result.stderr


def test_a_policy_dir_without_policies_is_an_error(in_empty_dir: Path) -> None:
    result = cli("--referrals", "5", "--policy", str(in_empty_dir))
    assert result.exit_code == 2
    assert "no policies/ folder" in result.stderr


def test_the_human_table_shows_both_columns_and_deltas(in_empty_dir: Path) -> None:
    result = cli("--referrals", "20", "--days", "40", "--seed", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "with policy" in lines[1]
    assert "without" in lines[1]
    assert "delta" in lines[1]
    closure = next(line for line in lines if line.startswith("loop closure"))
    assert closure.count("%") == 2
    assert closure.endswith("pts")
    assert lines[-1].split()[-2:] == ["20", "20"]


# -- the store reader ---------------------------------------------------------------------

T0 = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)
P1 = messages.Patient("KPI0001", "TESTPATIENT", "ALPHA", "19800101", "F")
P2 = messages.Patient("KPI0002", "TESTPATIENT", "BRAVO", "19810101", "M")


def test_store_kpis_reads_the_log(database_url: str, upgraded_url: str) -> None:
    day = timedelta(days=1)
    engine = open_(upgraded_url)
    try:
        visit = T0 + 8 * day
        store(
            engine,
            [
                messages.order("K1-O", "KPI-1", P1, "REFCARD", "R", T0),
                messages.booked("K1-S", "KPI-1", P1, "A1", visit, T0 + 2 * day),
                messages.completed("K1-C", "KPI-1", P1, "A1", visit, visit),
                messages.consult_note("K1-N", "KPI-1", P1, T0 + 12 * day),
                messages.order("K2-O", "KPI-2", P2, "REFDERM", "R", T0),
                messages.booked("K2-S", "KPI-2", P2, "A2", visit, T0 + 9 * day),
                messages.no_show("K2-X", "KPI-2", P2, "A2", visit, visit),
                # A no-show after the note is an anomaly: it changed nothing, and the
                # KPIs do not count it.
                messages.no_show("K1-X", "KPI-1", P1, "A1", visit, T0 + 20 * day),
            ],
            at=T0,
        )
        drain(processor(engine))
        k = store_kpis(engine, T0 + 40 * day)
        assert (k.referrals, k.mature, k.closed) == (2, 2, 1)
        assert k.loop_closure_rate == 0.5
        assert k.open_at_30_days_rate == 0.5
        assert k.median_days_to_close == pytest.approx(12.0)
        assert k.scheduled_within_7_days_rate == 0.5  # KPI-2 booked on day 9
        assert k.no_show_rate == 0.5
        with engine.connect() as conn:
            anomalies = conn.execute(
                select(referral_events.c.type).where(referral_events.c.anomaly.is_not(None))
            ).scalars()
            assert list(anomalies) == ["appointment.no_show"]
        assert k.note_return_rate == 1.0
        assert k.exception_rate == 0.5  # the no-show is a worklist item
        # Read as of day 10, the note had not come yet.
        early = store_kpis(engine, T0 + 10 * day)
        assert (early.closed, early.mature) == (0, 0)
    finally:
        engine.dispose()


def _counts(sim: Run) -> dict[str, Any]:
    by_type = select(referral_events.c.type, func.count()).group_by(referral_events.c.type)
    by_route = select(deliveries.c.route_id, func.count()).group_by(deliveries.c.route_id)
    with sim.engine.connect() as conn:
        events = {str(t): int(n) for t, n in conn.execute(by_type)}
        routes = {str(r): int(n) for r, n in conn.execute(by_route)}
        statuses = set(conn.execute(select(messages_table.c.status)).scalars())
    return {"events": events, "routes": routes, "statuses": statuses}


def test_the_runs_go_through_the_engine_and_only_the_policy_run_nudges() -> None:
    setup = load_setup(package_mappings())
    network = build(30, 45, seed=6)
    outbound = outbound_for(network, setup.outbound)
    seen: dict[str, dict[str, Any]] = {}
    for name, policy in (("with", setup.policy), ("without", NO_POLICY)):
        run(
            network,
            setup.mapping_set,
            outbound,
            policy,
            on_run=lambda s, n=name: seen.update({n: _counts(s)}),
        )
    w, wo = seen["with"], seen["without"]
    for side in (w, wo):
        # Every message the peers sent was normalised; every packet went out and the
        # referrals were sent by the dispatcher's recorded outcome.
        assert side["statuses"] == {"processed"}
        assert side["events"]["referral.created"] == 30
        assert side["events"]["referral.sent"] == 30
        assert side["routes"]["packet_to_specialist"] == 30
        assert side["events"]["consult_note.received"] > 0
    assert w["events"].get("outreach.planned", 0) > 0
    assert w["events"].get("referral.escalated", 0) > 0
    assert any(r.startswith("policy:") for r in w["routes"])
    assert "outreach.planned" not in wo["events"]
    assert "referral.escalated" not in wo["events"]
    assert not any(r.startswith("policy:") or r == "note_request" for r in wo["routes"])
