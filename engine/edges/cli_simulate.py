"""``refloop simulate``: what a policy does for a synthetic referral network.

The simulator (:mod:`engine.sim`) runs the real engine in virtual time twice — with the
policy, and without its nudges — on a temporary SQLite file each, and this command
prints the referral KPIs side by side. Nothing touches the configured database; the
config, when there is one, only says where the mappings are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from engine.config import ConfigError, config_path, load_config
from engine.mapping.mapset import MappingSetError
from engine.outbound.routing import OutboundError
from engine.policy.language import PolicyError
from engine.sim.compare import KPI_KEYS, Comparison, Setup, load_setup, package_mappings
from engine.sim.compare import simulate as compare

_LABELS = {
    "loop_closure_rate": "loop closure (30+ days old)",
    "open_at_30_days_rate": "open at 30 days",
    "median_days_to_close": "median days to close",
    "scheduled_within_7_days_rate": "scheduled within 7 days",
    "no_show_rate": "no-show rate",
    "note_return_rate": "note return rate",
    "exception_rate": "exception rate (worklist)",
    "referrals": "referrals",
}


def _mappings_root(config_file: Path | None) -> Path:
    """The config's mappings folder when there is a config, else the shipped one."""
    path = config_path(config_file)
    if config_file is None and not path.is_file():
        return package_mappings()
    try:
        return load_config(path).mappings_dir()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _setup(root: Path, policy_dir: Path | None) -> Setup:
    try:
        return load_setup(root, policy_dir)
    except MappingSetError as exc:
        lines = [f"{e.file}:{e.line}:{e.column}: error: {e.message}" for e in exc.errors]
    except (OutboundError, PolicyError) as exc:
        lines = [f"{e}" for e in exc.errors]
    for line in lines:
        click.echo(line, err=True)
    n = len(lines)
    click.echo(f"{n} error{'s' if n != 1 else ''}; nothing was simulated", err=True)
    sys.exit(2)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "referrals":
        return str(value)
    if key == "median_days_to_close":
        return f"{value:.1f}"
    return f"{100 * value:.1f} %"


def _delta(key: str, a: Any, b: Any) -> str:
    if a is None or b is None or key == "referrals":
        return ""
    if key == "median_days_to_close":
        return f"{a - b:+.1f} days"
    return f"{100 * (a - b):+.1f} pts"


def table(result: Comparison) -> str:
    """The human report: KPIs with and without the policy, and the difference."""
    data = result.as_json()
    rows = [("", "with policy", "without", "delta")]
    for key in KPI_KEYS:
        a, b = data["with_policy"][key], data["without_policy"][key]
        rows.append((_LABELS[key], _cell(key, a), _cell(key, b), _delta(key, a, b)))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.command("simulate")
@click.option("--referrals", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=60, show_default=True)
@click.option(
    "--policy",
    "policy_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A mappings directory whose policies/ is simulated (default: the shipped one).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="REFLOOP_CONFIG",
    default=None,
    help="Config file whose mappings are used (default ./engine.toml if present, "
    "else the shipped mappings).",
)
def simulate(
    referrals: int,
    days: int,
    policy_dir: Path | None,
    seed: int,
    as_json: bool,
    config_file: Path | None,
) -> None:
    """Run the engine in virtual time against a synthetic referral network, with the
    policy and without its nudges, and report the referral KPIs of both.

    Deterministic for a given --seed. Referrals arrive over the first DAYS - 30 days
    (at least a third of the run), so use --days 45 or more for the 30-day KPIs.
    """
    root = _mappings_root(config_file)
    setup = _setup(root, policy_dir)
    started = time.perf_counter()
    result = compare(setup, referrals=referrals, days=days, seed=seed)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    policy = policy_dir or root
    click.echo(
        f"{referrals} simulated referrals over {days} days (seed {seed}), policy "
        f"{policy / 'policies'} (digest {setup.policy.digest}), "
        f"{time.perf_counter() - started:.1f} s"
    )
    if days <= 30:
        click.echo("note: no referral is 30 days old by the end; the 30-day KPIs are empty")
    click.echo(table(result))
