"""A network run twice: with the policy, and without its nudges and escalations.

Both runs build the same network from the seed and face the same patients with the
same luck (:mod:`engine.sim.network`); the second runs under the empty policy
(:data:`engine.services.mappings.NO_POLICY`: no windows, no ladders — nobody reminds,
escalates or asks for a note; the exceptions that are events by themselves, such as a
no-show, are still raised). The difference between the two columns is what the policy
does for this network.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.config import OutreachConfig
from engine.domain.kpis import Kpis
from engine.mapping.mapset import MappingSet, load_mapping_set
from engine.outbound.packets.outreach import Templates
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import Outbound, load_outbound
from engine.policy.language import Policy, PolicyError, load_policy
from engine.policy.outreach import OutreachSettings
from engine.services.mappings import NO_POLICY
from engine.services.outreach_runtime import planner
from engine.services.scheduler import OutreachPlanner
from engine.sim.network import Behaviour, build
from engine.sim.run import CHANNELS, outbound_for, run

__all__ = [
    "KPI_KEYS",
    "Comparison",
    "Setup",
    "kpis_json",
    "load_setup",
    "package_mappings",
    "simulate",
]

#: The KPIs ``refloop simulate --json`` reports, in order.
KPI_KEYS = (
    "loop_closure_rate",
    "open_at_30_days_rate",
    "median_days_to_close",
    "scheduled_within_7_days_rate",
    "no_show_rate",
    "note_return_rate",
    "exception_rate",
    "referrals",
)


def package_mappings() -> Path:
    """The mappings shipped with refloop (beside the ``engine`` package)."""
    return Path(__file__).resolve().parents[2] / "mappings"


@dataclass(frozen=True)
class Setup:
    mapping_set: MappingSet
    outbound: Outbound
    policy: Policy
    outreach: OutreachPlanner | None = None  # the engine's planner, when templates load


def load_setup(mappings_root: Path, policy_root: Path | None = None) -> Setup:
    """The inbound mappings and outbound routes of ``mappings_root``, and the policy of
    ``policy_root/policies`` (default: ``mappings_root``'s own). Raises the loaders'
    errors (MappingSetError, OutboundError, PolicyError), each listing file:line
    problems."""
    mapping_set = load_mapping_set(mappings_root)
    outbound = load_outbound(mappings_root, known_formats=FORMATS)
    root = policy_root or mappings_root
    if policy_root is not None and not (policy_root / "policies").is_dir():
        raise PolicyError(
            [f"{policy_root}:1:1: no policies/ folder here (--policy takes a mappings directory)"]
        )
    policy = load_policy(root, known_routes=[r.id for r in outbound.routes])
    templates = root / "policies" / "templates"
    if not templates.is_dir():
        templates = mappings_root / "policies" / "templates"
    # The simulator's channels are named like the [outreach] defaults (sms, email).
    settings = OutreachSettings.of(OutreachConfig(), CHANNELS)
    outreach = planner(settings, Templates.load(templates)) if templates.is_dir() else None
    return Setup(mapping_set, outbound, policy, outreach)


@dataclass(frozen=True)
class Comparison:
    with_policy: Kpis
    without_policy: Kpis

    def as_json(self) -> dict[str, dict[str, Any]]:
        return {
            "with_policy": kpis_json(self.with_policy),
            "without_policy": kpis_json(self.without_policy),
        }


def kpis_json(k: Kpis) -> dict[str, Any]:
    """Rates rounded to 4 places, median days a float or None, referrals an int."""
    return {
        "loop_closure_rate": round(k.loop_closure_rate, 4),
        "open_at_30_days_rate": round(k.open_at_30_days_rate, 4),
        "median_days_to_close": (
            round(k.median_days_to_close, 4) if k.median_days_to_close is not None else None
        ),
        "scheduled_within_7_days_rate": round(k.scheduled_within_7_days_rate, 4),
        "no_show_rate": round(k.no_show_rate, 4),
        "note_return_rate": round(k.note_return_rate, 4),
        "exception_rate": round(k.exception_rate, 4),
        "referrals": int(k.referrals),
    }


def simulate(
    setup: Setup,
    *,
    referrals: int,
    days: int,
    seed: int,
    behaviour: Behaviour | None = None,
    resolution: timedelta = timedelta(hours=1),
) -> Comparison:
    """Run the network with ``setup.policy`` and with none; the KPIs of both."""
    network = build(referrals, days, seed, behaviour)
    outbound = outbound_for(network, setup.outbound)
    with_policy = run(
        network,
        setup.mapping_set,
        outbound,
        setup.policy,
        resolution=resolution,
        outreach=setup.outreach,
    )
    without = run(
        network,
        setup.mapping_set,
        outbound,
        NO_POLICY,
        resolution=resolution,
        outreach=setup.outreach,
    )
    return Comparison(with_policy, without)
