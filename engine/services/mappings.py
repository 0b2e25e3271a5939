"""The running mapping set, and swapping in a new one safely (hot reload).

The set loads at start (a bad one refuses the start, with every file:line:column). After
that, a change under the mapping folder — seen by polling names, sizes and mtimes, which
costs a directory walk — or SIGHUP loads a fresh set beside the running one. Only a set
that loads completely *and* still has every overlay a listener names replaces it; a bad
one is logged with its errors, counted, and the old set keeps normalising. The swap is
one reference assignment, so a batch in flight finishes with the set it started with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.logs import get_logger
from engine.mapping.mapset import MappingSet, MappingSetError, load_mapping_set
from engine.metrics import Metrics

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


class MappingHolder:
    """Holds the current set; :meth:`check` and :meth:`reload` replace it when safe."""

    def __init__(
        self, root: Path, overlays: Mapping[str, str], metrics: Metrics, current: MappingSet
    ) -> None:
        self.root = root
        self.overlays = dict(overlays)
        self.metrics = metrics
        self.current = current
        self._seen = fingerprint(root)

    @classmethod
    def load(cls, root: Path, overlays: Mapping[str, str], metrics: Metrics) -> MappingHolder:
        """At start: raises on any problem, so the daemon refuses to run without a set."""
        return cls(root, overlays, metrics, load_checked(root, overlays))

    def check(self) -> Reload | None:
        """Reload if any file changed since the last look; None when nothing did."""
        seen = fingerprint(self.root)
        if seen == self._seen:
            return None
        self._seen = seen
        return self.reload()

    def reload(self) -> Reload:
        try:
            fresh = load_checked(self.root, self.overlays)
        except (MappingSetError, OverlayError) as exc:
            errors = (
                tuple(str(e) for e in exc.errors)
                if isinstance(exc, MappingSetError)
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
        if fresh.digest == self.current.digest:
            return Reload("unchanged", fresh.digest)
        before = self.current.digest
        self.current = fresh
        self.metrics.mapping_reloads.labels("ok").inc()
        log.info("mappings.reloaded", root=str(self.root), before=before, digest=fresh.digest)
        return Reload("ok", fresh.digest)
