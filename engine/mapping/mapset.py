"""A loaded, immutable set of mappings: the one object normalisation needs.

Layout under the mappings directory::

    valuesets/*.yaml              shared code tables (referral-valueset/v1)
    hl7v2/*.map.yaml              shared mappings (referral-mapping/v1)
    hl7v2/tests/*.cases.yaml      fixtures (run by `refloop mappings test`)
    fhir/*.map.yaml               shared FHIR R4 mappings (referral-mapping/v1, input: fhir)
    fhir/tests/*.cases.yaml       their fixtures
    sources/<name>/...            an overlay for one sending system: its own mappings,
                                  valuesets/ and tests/, chosen per listener in engine.toml
    sources/<name>/source.yaml    that system's settings (referral-source/v1), e.g. the
                                  time zone of timestamps it sends without an offset
    _schema/                      generated JSON Schemas for editors (not loaded)

Loading is all-or-nothing: every file is read, validated and compiled, and any error
(with file:line:column) refuses the whole set, so the daemon keeps the set it runs.

For a message from a listener with overlay ``X``, the overlay's mappings are tried
before the shared ones (first match by ``match`` wins, in file order), and the overlay's
value sets shadow shared ones of the same id — so an overlay can be as small as one
code table that translates a vendor's local codes.

A FHIR resource (:meth:`MappingSet.normalise_resource`) is matched the same way, by its
``resourceType`` against each FHIR mapping's ``match.resource`` (then ``match.when``),
overlay first; a type no mapping names is a ``mapping_error`` (``no_mapping``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.domain.events import Diagnostic, Normalised, Outcome
from engine.mapping import plan as p
from engine.mapping.compiler import MAPPING_SCHEMA, SOURCE_SCHEMA, VALUESET_SCHEMA, Compiler
from engine.mapping.evaluate import (
    evaluate,
    evaluate_resource,
    matches,
    matches_resource,
    message_type,
)
from engine.mapping.source import Document, SourceError, load
from engine.protocol.hl7message import Message
from engine.protocol.hl7v2 import HeaderError

SOURCES_DIR = "sources"
VALUESETS_DIR = "valuesets"
# outbound/ and directory/ hold the outbound set (routes, write-back, the specialist
# directory): engine.outbound.routing reads and validates them; policies/ is the referral
# policy's (engine.policy).
SKIP_DIRS = frozenset({"_schema", "samples", "outbound", "directory", "policies"})


class MappingSetError(Exception):
    """The set did not load; ``errors`` are every problem found, each file:line:column."""

    def __init__(self, errors: Sequence[SourceError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "mapping set did not load")


@dataclass(frozen=True)
class MappingSet:
    root: Path
    digest: str  # sha256 over every mapping and value set file, first 16 hex digits
    mappings: tuple[p.Mapping, ...]
    valuesets: Mapping[str | None, Mapping[str, p.ValueSet]]  # overlay (None: shared) → id → set
    files: tuple[Path, ...] = field(default=())
    sources: Mapping[str, p.SourceSettings] = field(default_factory=dict)

    @property
    def overlays(self) -> frozenset[str]:
        return (
            frozenset(k for k in self.valuesets if k is not None)
            | frozenset(m.overlay for m in self.mappings if m.overlay is not None)
            | frozenset(self.sources)
        )

    def candidates(self, overlay: str | None) -> list[p.Mapping]:
        own = [m for m in self.mappings if overlay is not None and m.overlay == overlay]
        return own + [m for m in self.mappings if m.overlay is None]

    def _for_source(self, mapping: p.Mapping, overlay: str | None) -> p.Mapping:
        """A shared mapping reading a source that states its own time zone uses it."""
        settings = self.sources.get(overlay or "")
        if mapping.overlay is not None or settings is None or settings.timezone is None:
            return mapping
        zone, name = settings.timezone
        return replace(mapping, timezone=zone, timezone_name=name)

    def tables(self, overlay: str | None) -> dict[str, p.ValueSet]:
        return {**self.valuesets.get(None, {}), **self.valuesets.get(overlay, {})}

    def normalise(
        self, text: str, *, received_at: datetime, overlay: str | None = None
    ) -> Normalised:
        """Normalise one decoded message (pure: no clock, no I/O)."""
        try:
            message = Message.parse(text)
        except HeaderError as exc:
            return _error("unparseable", f"the message cannot be read: {exc.reason}")
        tables = self.tables(overlay)
        kind = message_type(message)
        for mapping in self.candidates(overlay):
            if mapping.input is p.Input.HL7V2 and matches(mapping, message, tables, kind):
                mapping = self._for_source(mapping, overlay)
                return evaluate(
                    mapping, message, tables, digest=self.digest, received_at=received_at
                )
        label = "^".join(part for part in kind if part) or "(no MSH-9)"
        where = f" for source {overlay!r}" if overlay else ""
        return _error(
            "no_mapping",
            f"no mapping handles {label}{where}; add one (or an ignore rule) under {self.root}",
        )

    def normalise_resource(
        self, resource: Mapping[str, Any], *, received_at: datetime, overlay: str | None
    ) -> Normalised:
        """Normalise one FHIR resource, its JSON already parsed (pure: no clock, no I/O).

        Same result as :meth:`normalise`. A Bundle is not split here: the intake stores
        each entry as its own resource, so a Bundle that arrives whole is recorded as
        ignored by the shipped ``fhir.bundles`` mapping."""
        kind = resource.get("resourceType") if isinstance(resource, Mapping) else None
        if not isinstance(kind, str) or not kind:
            return _error("unparseable", "the resource has no resourceType")
        tables = self.tables(overlay)
        for mapping in self.candidates(overlay):
            if (
                mapping.input is p.Input.FHIR
                and kind in mapping.resource_types
                and matches_resource(mapping, resource, tables)
            ):
                mapping = self._for_source(mapping, overlay)
                return evaluate_resource(
                    mapping, resource, tables, digest=self.digest, received_at=received_at
                )
        where = f" for source {overlay!r}" if overlay else ""
        label = kind if kind.isalnum() and len(kind) <= 64 else "(an unknown type)"
        return _error(
            "no_mapping",
            f"no mapping handles FHIR {label}{where}; add one (or an ignore rule) under "
            f"{self.root}",
        )


def _error(code: str, text: str) -> Normalised:
    return Normalised(Outcome.MAPPING_ERROR, (), (Diagnostic(code, text),))


def overlay_of(root: Path, path: Path) -> str | None:
    """The overlay a file belongs to (``sources/<name>/...``), or None when shared."""
    try:
        rel = path.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    return rel[1] if len(rel) > 2 and rel[0] == SOURCES_DIR else None


def _kind(root: Path, path: Path) -> str | None:
    name = path.name
    if name.endswith(".map.yaml"):
        return "mapping"
    if name.endswith(".cases.yaml"):
        return "cases"
    if (
        name == "source.yaml"
        and overlay_of(root, path) is not None
        and path.parent.parent.name == SOURCES_DIR
    ):
        return "source"
    if path.parent.name == VALUESETS_DIR:
        return "valueset"
    return None


def mapping_files(root: Path) -> list[Path]:
    """Every YAML file of the set (mappings, value sets, fixtures), in a stable order."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            out.append(path)
    return out


def load_mapping_set(root: Path) -> MappingSet:
    """Read, validate and compile every mapping under ``root``; raises MappingSetError."""
    if not root.is_dir():
        raise MappingSetError([SourceError(str(root), 1, 1, "no such mappings directory")])
    errors: list[SourceError] = []
    docs: dict[str, list[tuple[Path, Document]]] = {"mapping": [], "valueset": [], "source": []}
    digest = hashlib.sha256()
    files = mapping_files(root)
    for path in files:
        kind = _kind(root, path)
        if kind is None:
            errors.append(
                SourceError(
                    str(path),
                    1,
                    1,
                    "not part of a mapping set: name mappings *.map.yaml, "
                    "fixtures *.cases.yaml, and put value sets in a valuesets/ folder",
                )
            )
            continue
        if kind == "cases":
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        try:
            doc = load(path)
        except SourceError as exc:
            errors.append(exc)
            continue
        expected = {"mapping": MAPPING_SCHEMA, "valueset": VALUESET_SCHEMA}.get(kind, SOURCE_SCHEMA)
        schema = doc.data.get("schema") if isinstance(doc.data, dict) else None
        if schema != expected:
            errors.append(doc.error(("schema",), f"expected `schema: {expected}` at the top"))
            continue
        docs[kind].append((path, doc))

    valuesets: dict[str | None, dict[str, p.ValueSet]] = {}
    for path, doc in docs["valueset"]:
        compiler = Compiler(doc, overlay_of(root, path), frozenset())
        vs = compiler.valueset()
        errors.extend(compiler.errors)
        if vs is None:
            continue
        scope = valuesets.setdefault(vs.overlay, {})
        if vs.id in scope:
            errors.append(
                doc.error(("id",), f"value set id {vs.id!r} is also in {scope[vs.id].file}")
            )
            continue
        scope[vs.id] = vs

    sources: dict[str, p.SourceSettings] = {}
    for path, doc in docs["source"]:
        compiler = Compiler(doc, overlay_of(root, path), frozenset())
        settings = compiler.source_settings()
        errors.extend(compiler.errors)
        if settings is not None:
            sources[settings.overlay] = settings

    shared = frozenset(valuesets.get(None, {}))
    mappings: list[p.Mapping] = []
    ids: dict[str, str] = {}
    for path, doc in docs["mapping"]:
        overlay = overlay_of(root, path)
        # Shared mappings see shared tables (an overlay may shadow one with its own
        # codes); an overlay mapping also sees its overlay's tables.
        known = shared | frozenset(valuesets.get(overlay, {}) if overlay else ())
        compiler = Compiler(doc, overlay, known)
        mapping = compiler.mapping()
        errors.extend(compiler.errors)
        if mapping is None:
            continue
        if mapping.id in ids:
            errors.append(
                doc.error(("id",), f"mapping id {mapping.id!r} is also used by {ids[mapping.id]}")
            )
            continue
        ids[mapping.id] = doc.file
        mappings.append(mapping)
    if errors:
        raise MappingSetError(errors)
    return MappingSet(
        root=root,
        digest=digest.hexdigest()[:16],
        mappings=tuple(mappings),
        valuesets=valuesets,
        files=tuple(files),
        sources=sources,
    )
