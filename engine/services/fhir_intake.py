"""FHIR intake: accepted resources become ``messages`` rows, durable before any 2xx.

Theory of operation
-------------------
Every accepted resource is one row of ``messages`` — a Bundle's entries and a
notification's resources one row each — written through the daemon's
:class:`~engine.services.writer.GroupCommitWriter`, the same group commit the MLLP
listeners use. The caller answers 2xx only after :func:`store` has returned for every
row; when the writer cannot commit, :class:`StorageUnavailable` reaches the caller,
which answers 503 and the sender retries.

A row carries ``message_type = "FHIR:<resourceType>"`` (how the normaliser tells FHIR
from HL7 v2), ``control_id = <Type>/<id>/_history/<versionId>`` and the source's name as
``listener`` and ``sending_application``. Duplicates are the writer's business: the
row's ``dedup_key`` (:func:`engine.protocol.fhir.dedup_key`) collides with the
original's, and the writer stores the resend as ``duplicate`` (no new effects) or, when
the same version arrives with other content, as ``rejected``
(:func:`engine.protocol.fhir.fhir_conflict`).

The headers that matter (Content-Type, If-None-Exist, If-Match, X-Request-Id and what a
notification adds) travel in the row as ``headers`` (JSON, ``messages.headers``).

A transaction or batch Bundle (:func:`prepare_bundle`) becomes

* one row per good entry, ``raw`` = the entry's resource re-serialised compactly with
  its Bundle-local references made self-standing
  (:func:`engine.protocol.fhir.link_entries`: ``urn:uuid:`` references become
  ``Type/id`` when the target has an id, and carry the target's type and identifier),
  so each row reads on its own — the ServiceRequest names its patient, the Task its
  ServiceRequest — and its ``headers`` name the Bundle (``bundle-entry``: kind and
  index, ``bundle-sha256``: the Bundle row's ``payload_sha256``);
* and the Bundle itself, byte for byte, as a ``FHIR:Bundle`` row: nothing the sender
  sent is lost (the entries' ``fullUrl``, ``request``, the original references). The
  mappings ignore it by a named rule (``fhir.bundles`` / ``write_bundle``). Its
  ``dedup_key`` is the source and the payload digest, not the Bundle's id and
  ``meta.versionId`` (a server ignores those of a transaction, and a sender reusing
  them must not turn the record into a 409): a byte-identical resend is a
  ``duplicate`` row, any other Bundle a new record. The record never decides the
  answer; the entries do, under the duplicate rules above.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from engine.config import FhirSourceConfig
from engine.protocol.fhir import (
    BundleCheck,
    Issue,
    compact,
    dedup_key,
    generated_id,
    link_entries,
    location,
    operation_outcome,
    resource_id,
    validate,
    version_id,
)
from engine.services.writer import GroupCommitWriter, StorageUnavailable, Stored

#: How long a resource version is remembered as received. A version id names one
#: version for good, so this is as long as the store keeps messages.
DUPLICATE_WINDOW = timedelta(days=3650)
#: Request headers kept with the row (lower-case names).
KEPT_HEADERS = ("content-type", "if-none-exist", "if-match", "x-request-id")


@dataclass(frozen=True, slots=True)
class Accepted:
    """What :func:`accept_resources` stored: one message id per resource, in order."""

    message_ids: tuple[int, ...]
    duplicates: int
    conflicts: int = 0


class FhirRejected(Exception):
    """Nothing was stored: ``outcome`` (an OperationOutcome) says which resource and why."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        super().__init__("FHIR resources rejected")
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Prepared:
    """One resource's row, and how it will be named in the answer."""

    row: dict[str, Any]
    resource_type: str
    id: str
    version: str | None
    # The dedup key is an If-None-Exist: a duplicate's original may carry another id.
    conditional: bool = False

    @property
    def location(self) -> str:
        return location(self.resource_type, self.id, self.version)


Kind = Literal["created", "duplicate", "conflict"]


@dataclass(frozen=True, slots=True)
class Result:
    """What the writer did with one prepared row."""

    prepared: Prepared
    message_id: int
    kind: Kind
    original_id: int | None = None  # the message a duplicate or a conflict repeats


def prepare(
    source: str,
    resource: Mapping[str, Any],
    raw: bytes,
    *,
    peer: str,
    received_at: datetime,
    headers: Mapping[str, str] | None = None,
    if_none_exist: str | None = None,
) -> Prepared:
    """The ``messages`` row for one validated resource (pure)."""
    rtype = str(resource["resourceType"])
    digest = hashlib.sha256(raw).hexdigest()
    own_id = resource_id(resource)
    version = version_id(resource)
    rid = own_id or generated_id(source, rtype, digest)
    kept = {k.lower(): v for k, v in (headers or {}).items()}
    if if_none_exist:
        kept["if-none-exist"] = if_none_exist
    row: dict[str, Any] = {
        "received_at": received_at,
        "listener": source,
        "peer": peer[:64],
        "raw": raw,
        "size": len(raw),
        "raw_truncated": False,
        "message_type": f"FHIR:{rtype}",
        "control_id": location(rtype, rid, version if own_id else None),
        "sending_application": source,
        "sending_facility": None,
        "receiving_application": None,
        "receiving_facility": None,
        "version": "R4",
        "charset": "utf-8",
        "dedup_key": dedup_key(source, rtype, own_id, version, if_none_exist),
        "payload_sha256": digest,
        "status": "received",
        "ack_code": None,
        "ack": None,
        "error_code": None,
        "error": None,
        "duplicate_of": None,
        "headers": json.dumps(kept, sort_keys=True) if kept else None,
    }
    conditional = row["dedup_key"] is not None and not (own_id and version)
    return Prepared(row, rtype, rid, version if own_id else None, conditional)


@dataclass(frozen=True, slots=True)
class BundleRows:
    """The rows of a transaction or batch: the Bundle as sent, and its good entries."""

    record: Prepared
    entries: dict[int, Prepared]  # by Bundle.entry index


def prepare_bundle(
    source: str,
    bundle: Mapping[str, Any],
    raw: bytes,
    check: BundleCheck,
    *,
    peer: str,
    received_at: datetime,
    headers: Mapping[str, str] | None = None,
) -> BundleRows:
    """The rows for a checked Bundle (:func:`engine.protocol.fhir.bundle_entries`): its
    good entries, references linked, and the Bundle itself (pure; see the module
    docstring). Only good entries are reference targets: a refused entry is not stored,
    and its identifier was not validated."""
    kept = dict(headers or {})
    record = prepare(source, bundle, raw, peer=peer, received_at=received_at, headers=kept)
    digest = record.row["payload_sha256"]
    basis = f"bundle\x1f{source}\x1f{digest}"
    record.row["dedup_key"] = hashlib.sha256(basis.encode("utf-8", "surrogateescape")).hexdigest()
    record = replace(record, conditional=False)
    good = [e for e in check.entries if e.ok and e.resource is not None]
    linked = link_entries(bundle, targets={e.index for e in good})
    entries: dict[int, Prepared] = {}
    for entry in good:
        assert entry.resource is not None
        resource = linked[entry.index] if entry.index < len(linked) else None
        resource = resource if resource is not None else dict(entry.resource)
        entries[entry.index] = prepare(
            source,
            resource,
            compact(resource),
            peer=peer,
            received_at=received_at,
            headers={
                **kept,
                "bundle-entry": f"{check.kind} {entry.index}",
                "bundle-sha256": digest,
            },
            if_none_exist=entry.if_none_exist if entry.method == "POST" else None,
        )
    return BundleRows(record, entries)


async def store(
    writer: GroupCommitWriter,
    prepared: Sequence[Prepared],
    *,
    timeout: float,  # noqa: ASYNC109 - a bound on each row's commit, not on the whole call
) -> list[Result]:
    """Commit every row (together when the writer batches them) and say what each became.

    Raises :class:`StorageUnavailable` when any row was not committed in ``timeout``
    seconds; rows committed before that stay stored (a resend is then a duplicate
    when it carries a version id or an If-None-Exist).
    """

    async def one(p: Prepared) -> Stored:
        try:
            return await asyncio.wait_for(writer.store(p.row, DUPLICATE_WINDOW), timeout)
        except TimeoutError:
            raise StorageUnavailable("commit timed out") from None

    # Queued together, so the writer usually commits them in one transaction.
    written = await asyncio.gather(*(one(p) for p in prepared), return_exceptions=True)
    for w in written:
        if isinstance(w, BaseException) and not isinstance(w, StorageUnavailable):
            raise w
    for w in written:
        if isinstance(w, StorageUnavailable):
            raise w
    out = []
    for p, w in zip(prepared, written, strict=True):
        assert not isinstance(w, BaseException)
        if w.conflict_with is not None:
            out.append(Result(p, w.message_id, "conflict", w.conflict_with))
        elif w.duplicate_of is not None:
            out.append(Result(p, w.message_id, "duplicate", w.duplicate_of))
        else:
            out.append(Result(p, w.message_id, "created"))
    return out


async def accept_resources(
    writer: GroupCommitWriter,
    source: FhirSourceConfig,
    resources: Sequence[tuple[Mapping[str, Any], bytes]],
    *,
    peer: str,
    received_at: datetime,
    headers: Mapping[str, str] | None = None,
    commit_timeout: float = 10.0,
) -> Accepted:
    """Validate and store resources a notification brought (parsed, and their raw bytes).

    All or nothing on validation: any invalid resource raises :class:`FhirRejected`
    before anything is stored (its issues are prefixed ``[n]`` when there are several).
    Raises :class:`StorageUnavailable` when the writer cannot commit.
    """
    issues: list[Issue] = []
    for n, (resource, _) in enumerate(resources):
        base = None
        if len(resources) > 1:
            rtype = resource.get("resourceType")
            base = f"[{n}]{rtype if isinstance(rtype, str) else 'Resource'}"
        issues += validate(resource, base=base)
    if issues:
        raise FhirRejected(operation_outcome(issues))
    prepared = [
        prepare(source.name, resource, raw, peer=peer, received_at=received_at, headers=headers)
        for resource, raw in resources
    ]
    results = await store(writer, prepared, timeout=commit_timeout)
    return Accepted(
        message_ids=tuple(r.message_id for r in results),
        duplicates=sum(r.kind == "duplicate" for r in results),
        conflicts=sum(r.kind == "conflict" for r in results),
    )
