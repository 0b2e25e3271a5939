"""The FHIR read facade: refloop's view of a referral, for EHRs that poll.

Theory of operation
-------------------
``GET /fhir/r4/ServiceRequest/<referral id>`` and ``GET /fhir/r4/Task?based-on=
ServiceRequest/<referral id>`` build a ServiceRequest and a BSeR Task from the referral
projection (:func:`engine.store.fhir_read.referral_view`): nothing is stored as FHIR,
so what an EHR reads is always the projection's current state. ServiceRequest.status
follows the loop (active until it closes; completed on the note or closure; revoked
on cancel or decline); Task.status and businessStatus come from
:data:`engine.domain.referral.BSER`. Resources carry ``meta.versionId`` = the
referral's last event sequence, so an ETag changes exactly when the referral does.

:class:`ReadFacade` answers with an :class:`Answer` (status, body, the metric outcome)
or raises :class:`FacadeRefusal` (an OperationOutcome's issues); the HTTP shell
(:mod:`engine.edges.fhir_api`) authenticates the caller first, counts and renders. A
database that cannot be read raises :class:`sqlalchemy.exc.SQLAlchemyError`, which the
shell answers 503. Every read is logged (``fhir.read``: source, referral id when it is
one of refloop's uuids; nothing a client sent otherwise, no PHI).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from engine.domain.referral import BSER, State
from engine.logs import get_logger
from engine.outbound.packets.fhir import REFERRAL_SYSTEM, identifier
from engine.protocol.fhir import Issue, error, is_id
from engine.store.fhir_read import ReferralView, referral_view

log = get_logger("refloop.fhir")

BSER_SYSTEM = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
#: ServiceRequest.status by referral state: the order stays active until the loop closes.
_SR_STATUS = {
    State.NOTE_RECEIVED: "completed",
    State.CLOSED: "completed",
    State.CANCELLED: "revoked",
    State.DECLINED: "revoked",
}
_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})


@dataclass(frozen=True, slots=True)
class Answer:
    """A read's answer: the HTTP status, the resource, and the outcome it counts as."""

    status: int
    body: dict[str, Any]
    outcome: str  # read | not_found
    headers: dict[str, str] = field(default_factory=dict)


class FacadeRefusal(Exception):
    """The read cannot be answered with a resource; ``issues`` say why."""

    def __init__(self, status: int, issues: Sequence[Issue], outcome: str) -> None:
        super().__init__(outcome)
        self.status = status
        self.issues = list(issues)
        self.outcome = outcome


class ReadFacade:
    """The reads, on the database engine (blocking reads go to a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def service_request(self, source: str, referral_id: str) -> Answer:
        """``GET ServiceRequest/<referral id>``: 200 with it, or 404."""
        view = await self._view(referral_id)
        _log_read(source, "ServiceRequest", referral_id, view is not None)
        if view is None:
            issue = error("not-found", "refloop has no referral with this id", "id")
            raise FacadeRefusal(404, [issue], "not_found")
        return Answer(200, service_request(view), "read", {"ETag": f'W/"{view.sequence}"'})

    async def tasks(
        self, source: str, based_on: Sequence[str], *, base: str, self_url: str
    ) -> Answer:
        """``GET Task?based-on=…`` (repeated or comma-separated): a searchset with the
        Task of each referral found; ``base`` is this server's ``…/fhir/r4``."""
        if not based_on:
            issue = error(
                "required",
                "search Tasks by based-on=ServiceRequest/<referral id> (the only search "
                "refloop offers)",
                "based-on",
            )
            raise FacadeRefusal(400, [issue], "invalid")
        ids = [referenced_id(v) for value in based_on for v in value.split(",")]
        entries = []
        for rid in dict.fromkeys(i for i in ids if i):
            view = await self._view(rid)
            _log_read(source, "Task", rid, view is not None)
            if view is not None:
                entries.append(
                    {
                        "fullUrl": f"{base}/Task/{view.id}",
                        "resource": task(view),
                        "search": {"mode": "match"},
                    }
                )
        answer: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
            "link": [{"relation": "self", "url": self_url}],
        }
        if entries:
            answer["entry"] = entries
        return Answer(200, answer, "read" if entries else "not_found")

    async def _view(self, referral_id: str) -> ReferralView | None:
        return await asyncio.to_thread(self._read_view, referral_id)

    def _read_view(self, referral_id: str) -> ReferralView | None:
        with self._engine.connect() as conn:
            return referral_view(conn, referral_id)


def referenced_id(value: str) -> str | None:
    """``ServiceRequest/<id>``, a bare ``<id>`` or an absolute URL ending in either."""
    ref = value.strip()
    if "/" in ref:
        parts = ref.rstrip("/").split("/")
        if len(parts) < 2 or parts[-2] != "ServiceRequest":
            return None
        ref = parts[-1]
    return ref or None


def _log_read(source: str, resource: str, rid: str, found: bool) -> None:
    # The referral id is refloop's own uuid; anything else a client sent is not logged.
    shown = rid if is_id(rid) and len(rid) == 36 else "(not a referral id)"
    log.info("fhir.read", source=source, resource=resource, referral_id=shown, found=found)


# -- the facade's resources -------------------------------------------------------------


def _ids(view: ReferralView) -> list[dict[str, Any]]:
    fields = view.data.get("referral", {})
    placer = identifier(
        fields.get("correlate.placer_order") or fields.get("correlate.referral_id"),
        type_code="PLAC",
    )
    filler = identifier(fields.get("correlate.filler_order"), type_code="FILL")
    own = {"system": REFERRAL_SYSTEM, "value": view.id}
    return [i for i in (placer, filler) if i] + [own]


def _subject(view: ReferralView) -> dict[str, Any]:
    patient = identifier(view.data.get("referral", {}).get("patient.identifier"))
    if patient is None:
        return {"display": "patient not identified"}
    return {"type": "Patient", "identifier": patient}


def _meta(view: ReferralView) -> dict[str, Any]:
    return {"versionId": str(view.sequence), "lastUpdated": _instant(view.updated_at)}


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def service_request(view: ReferralView) -> dict[str, Any]:
    """refloop's view of a referral as a ServiceRequest (status by the loop's progress)."""
    state = State(view.state)
    out: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": view.id,
        "meta": _meta(view),
        "identifier": _ids(view),
        "status": _SR_STATUS.get(state, "active"),
        "intent": "order",
        "subject": _subject(view),
        "authoredOn": _instant(view.created_at),
    }
    priority = view.data.get("referral", {}).get("priority")
    if isinstance(priority, str) and priority in _PRIORITIES:
        out["priority"] = priority
    return out


def task(view: ReferralView) -> dict[str, Any]:
    """The referral's BSeR Task: Task.status and businessStatus from its state."""
    status, business = BSER[State(view.state)]
    return {
        "resourceType": "Task",
        "id": view.id,
        "meta": _meta(view),
        "identifier": [{"system": REFERRAL_SYSTEM, "value": view.id}],
        "basedOn": [{"reference": f"ServiceRequest/{view.id}"}],
        "status": status,
        "businessStatus": {"coding": [{"system": BSER_SYSTEM, "code": business}]},
        "intent": "order",
        "focus": {"reference": f"ServiceRequest/{view.id}"},
        "for": _subject(view),
        "authoredOn": _instant(view.created_at),
        "lastModified": _instant(view.updated_at),
    }
