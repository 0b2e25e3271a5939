"""The running mapping set, and swapping in a new one safely (hot reload).

The set loads at start (a bad one refuses the start, with every file:line:column). After
that, a change under the mapping folder — seen by polling names, sizes and mtimes, which
costs a directory walk — or SIGHUP loads a fresh set beside the running one. Only a set
that loads completely *and* still has every overlay a listener names replaces it; a bad
one is logged with its errors, counted, and the old set keeps normalising. The swap is
one reference assignment, so a batch in flight finishes with the set it started with.

The outbound set (routes, write-back, the specialist directory under ``outbound/`` and
``directory/``) lives in the same folder and travels with it: both load, or neither
replaces what runs. Its channel names are checked against ``[channels]`` of the config.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.domain.projection import Referral
from engine.logs import get_logger
from engine.mapping.mapset import MappingSet, MappingSetError, load_mapping_set
from engine.metrics import Metrics
from engine.outbound.model import DeliveryRequest, Trigger
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import Outbound, OutboundError, load_outbound
from engine.policy.authorization import EMPTY as NO_AUTHORIZATION
from engine.policy.authorization import AuthorizationError, load_authorization
from engine.policy.language import Policy, PolicyError, load_policy
from engine.services.pipeline import Route

log = get_logger("refloop.mappings")

Fingerprint = tuple[tuple[str, int, int], ...]


class OverlayError(Exception):
    """A listener names an overlay the mapping set does not have."""


@dataclass(frozen=True, slots=True)
class Reload:
    result: str  # "ok", "unchanged" or "error"
    digest: str
    errors: tuple[str, ...] = ()


def fingerprint(root: Path) -> Fingerprint:
    """Every file under ``root`` with its size and mtime: cheap to take every few seconds."""
    out: list[tuple[str, int, int]] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            try:
                st = path.stat()
            except OSError:
                continue  # removed while walking: the next look sees the settled tree
            out.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_overlays(mapping_set: MappingSet, wanted: Mapping[str, str]) -> list[str]:
    """Problems with ``{listener: overlay}`` against the set's overlays."""
    have = mapping_set.overlays
    return [
        f"listener {listener}: mappings = {overlay!r}, but {mapping_set.root} has no such "
        f"overlay (have: {', '.join(sorted(have)) or 'none'})"
        for listener, overlay in sorted(wanted.items())
        if overlay not in have
    ]


def load_checked(root: Path, overlays: Mapping[str, str]) -> MappingSet:
    """Load the set and check the listeners' overlays; raises MappingSetError or
    OverlayError, both with messages that name what to fix."""
    mapping_set = load_mapping_set(root)
    problems = check_overlays(mapping_set, overlays)
    if problems:
        raise OverlayError("\n".join(problems))
    return mapping_set


def load_outbound_checked(root: Path, channels: Collection[str] | None) -> Outbound:
    """The outbound set, with every format and (when given) channel name checked;
    raises OutboundError listing file:line:column problems."""
    return load_outbound(root, known_formats=FORMATS, known_channels=channels)


#: No timers, no escalations: [policy] enabled = false, or a run without its nudges.
NO_POLICY = Policy(digest="none")


def load_policy_checked(root: Path, outbound: Outbound, *, enabled: bool = True) -> Policy:
    """The referral policy of ``root/policies`` (its ``notify`` steps checked against the
    outbound routes); raises PolicyError listing file:line:column problems."""
    if not enabled:
        return NO_POLICY
    return load_policy(root, known_routes=[r.id for r in outbound.routes])


def router_of(outbound: Outbound, channels: Collection[str] | None = None) -> Route | None:
    """The pipeline's router for this outbound set. None — nothing is enqueued — when no
    route is enabled, or when the config defines no channel at all (a fresh install: an
    outbox nobody could ever deliver would only fill up and warn)."""
    if not any(r.enabled for r in outbound.routes):
        return None
    if channels is not None and not channels:
        return None

    def route(trigger: Trigger) -> tuple[Sequence[DeliveryRequest], Sequence[str]]:
        routed = outbound.route(trigger)
        return routed.deliveries, [f"route {u.route_id}: {u.reason}" for u in routed.unrouted]

    return route


class MappingHolder:
    """Holds the current set; :meth:`check` and :meth:`reload` replace it when safe."""

    def __init__(
        self,
        root: Path,
        overlays: Mapping[str, str],
        metrics: Metrics,
        current: MappingSet,
        outbound: Outbound | None = None,
        channels: Collection[str] | None = None,
        outbound_root: Path | None = None,
        *,
        policy_enabled: bool = True,
    ) -> None:
        self.root = root
        self.outbound_root = outbound_root or root
        self.overlays = dict(overlays)
        self.metrics = metrics
        self.current = current
        self.channels = frozenset(channels) if channels is not None else None
        self.outbound = outbound or load_outbound_checked(self.outbound_root, self.channels)
        self._router = router_of(self.outbound, self.channels)
        self.policy_enabled = policy_enabled
        self.policy = load_policy_checked(root, self.outbound, enabled=policy_enabled)
        self.authorization = load_authorization(root) if policy_enabled else NO_AUTHORIZATION
        self._seen = self._fingerprint()

    @classmethod
    def load(
        cls,
        root: Path,
        overlays: Mapping[str, str],
        metrics: Metrics,
        channels: Collection[str] | None = None,
        outbound_root: Path | None = None,
        *,
        policy_enabled: bool = True,
    ) -> MappingHolder:
        """At start: raises on any problem, so the daemon refuses to run without a set."""
        mapping_set = load_checked(root, overlays)
        outbound = load_outbound_checked(outbound_root or root, channels)
        return cls(
            root,
            overlays,
            metrics,
            mapping_set,
            outbound,
            channels,
            outbound_root,
            policy_enabled=policy_enabled,
        )

    def _fingerprint(self) -> Fingerprint:
        seen = fingerprint(self.root)
        if self.outbound_root != self.root:
            seen += fingerprint(self.outbound_root)
        return seen

    def router(self) -> Route | None:
        return self._router

    def needs_auth(self, referral: Referral) -> str | None:
        """The pre-authorization rule that holds this new referral, if any (the pipeline's
        gate: such a referral waits in auth_pending and no packet leaves)."""
        return self.authorization.requires(referral)

    def check(self) -> Reload | None:
        """Reload if any file changed since the last look; None when nothing did."""
        seen = self._fingerprint()
        if seen == self._seen:
            return None
        self._seen = seen
        return self.reload()

    def reload(self) -> Reload:
        try:
            fresh = load_checked(self.root, self.overlays)
            outbound = load_outbound_checked(self.outbound_root, self.channels)
            policy = load_policy_checked(self.root, outbound, enabled=self.policy_enabled)
            authorization = (
                load_authorization(self.root) if self.policy_enabled else NO_AUTHORIZATION
            )
        except (
            MappingSetError,
            OverlayError,
            OutboundError,
            PolicyError,
            AuthorizationError,
        ) as exc:
            errors = (
                tuple(str(e) for e in exc.errors)
                if isinstance(
                    exc, MappingSetError | OutboundError | PolicyError | AuthorizationError
                )
                else tuple(str(exc).splitlines())
            )
            self.metrics.mapping_reloads.labels("error").inc()
            log.error(
                "mappings.reload.failed",
                root=str(self.root),
                kept=self.current.digest,
                errors=list(errors),
            )
            return Reload("error", self.current.digest, errors)
        if (
            fresh.digest == self.current.digest
            and outbound.digest == self.outbound.digest
            and policy.digest == self.policy.digest
            and authorization.digest == self.authorization.digest
        ):
            return Reload("unchanged", fresh.digest)
        before = self.current.digest
        self.current = fresh
        self.outbound = outbound
        self.policy = policy
        self.authorization = authorization
        self._router = router_of(outbound, self.channels)
        self.metrics.mapping_reloads.labels("ok").inc()
        log.info("mappings.reloaded", root=str(self.root), before=before, digest=fresh.digest)
        return Reload("ok", fresh.digest)
