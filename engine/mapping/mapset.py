"""A loaded, immutable set of mappings: the one object normalisation needs.

Loading is all-or-nothing: every file under the directory is read, validated and
compiled, and any error (with file:line:column) refuses the whole set, so the daemon keeps
the set it already runs. Per-source overlays live in ``<dir>/sources/<name>/``; a listener
names its overlay in ``engine.toml`` and the overlay's mappings are tried before the
shared ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.domain.events import Normalised
from engine.mapping.source import SourceError


class MappingSetError(Exception):
    """The set did not load; ``errors`` are every problem found, each file:line:column."""

    def __init__(self, errors: Sequence[SourceError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "mapping set did not load")


@dataclass(frozen=True)
class MappingSet:
    root: Path
    digest: str  # sha256 over every file's path and bytes, first 16 hex digits

    def normalise(
        self, text: str, *, received_at: datetime, overlay: str | None = None
    ) -> Normalised:
        """Normalise one decoded message (pure: no clock, no I/O)."""
        raise NotImplementedError

    @property
    def overlays(self) -> frozenset[str]:
        raise NotImplementedError


def load_mapping_set(root: Path) -> MappingSet:
    """Read, validate and compile every mapping under ``root``; raises MappingSetError."""
    raise NotImplementedError
