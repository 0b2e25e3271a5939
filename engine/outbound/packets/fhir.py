"""FHIR R4 packets: the referral as a BSeR-style transaction, and loop-closure write-back.

Theory of operation
-------------------
Both renderers turn the referral projection (and, where the canonical fields stop, the
source HL7 messages, read by :mod:`engine.outbound.packets.hl7source`) into one
transaction ``Bundle``, validate it with the ``fhir.resources.R4B`` models and
serialise it as compact JSON with sorted keys, so the same context always gives the
same bytes.

Sending twice must change nothing the second time: deliveries are at-least-once. So

* every ``fullUrl`` is a ``urn:uuid:`` derived (uuid5) from the referral id and the
  entry's role: the same referral always yields the same ids;
* ``fhir.referral_bundle`` creates conditionally (``ifNoneExist`` on an identifier):
  the patient, clinicians and organisations on their own identifiers (shared across
  referrals), per-referral resources on an identifier ``urn:ietf:rfc:3986|urn:uuid:…``
  equal to their ``fullUrl``; the ServiceRequest and Task also carry
  ``<identifier_system>|<referral id>`` (default ``urn:refloop:referral``; route option
  ``identifier_system``). An identifier without an assigning authority never keys a
  match (it could meet another system's number): such a resource falls back to its
  per-referral identifier.
* ``fhir.status_update`` (STANDARDS §8) updates conditionally: ``PUT
  Task?identifier=<system>|<referral id>`` rebuilds the whole Task from the projection
  (so no earlier output is lost), creating it when absent; the consult note and the
  appointment are ``PUT`` on their own identifiers. ServiceRequest.status changes only
  on real transitions (→ completed on the note / closure, → revoked on cancel /
  decline) with a FHIRPath Patch of that one element, never a rewrite of the EHR's
  order (conditional patch is optional in R4: route option ``service_request_status =
  off`` leaves the order alone on servers without it, SEKMET 0.1.1 among them).
  Resources the EHR owns (patient, order) are referenced logically, by identifier, so
  the write-back does not depend on how the EHR stores them.

Identifier systems: an assigning authority that is an OID becomes ``urn:oid:<oid>``, a
URI is kept, ``NPI`` is the US NPI system, anything else is
``urn:refloop:assigner:<assigner>`` (the assigner also in ``Identifier.assigner``).
The EHR's own system for the placer number may differ: route option ``placer_system``
overrides it.

BSeR choices: Task.businessStatus uses the STU2 ballot codes of
:data:`engine.domain.referral.BSER`. An Appointment is listed in Task.output (with the
note): it is what the recipient produced for the "send schedule visit information"
transition, and it lets an EHR reach the booking from the Task it already follows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import pydantic
from fhir.resources.R4B.bundle import Bundle

from engine.domain.referral import BSER, Event, State
from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.outbound.packets import Renderer
from engine.outbound.packets.hl7source import (
    attachments,
    diagnoses,
    note_attachments,
    obx_code,
    obx_type,
    source_message,
)
from engine.outbound.packets.hl7source import stripped as _text

Json = dict[str, Any]

FHIR_JSON = "application/fhir+json"
REFERRAL_SYSTEM = "urn:refloop:referral"
DIRECTORY_SYSTEM = "urn:refloop:directory"
_URI = "urn:ietf:rfc:3986"
_NPI = "http://hl7.org/fhir/sid/us-npi"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_BSER_CS = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
_TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
_SNOMED = "http://snomed.info/sct"
_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_COVERAGE_CLASS = "http://terminology.hl7.org/CodeSystem/coverage-class"
# Never change: fullUrls and per-referral identifiers already sent are derived from it.
_NAMESPACE = uuid.UUID("b36f523c-45d8-4cb0-aa71-aa1b9f5d0157")

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_NPI_NAMES = frozenset({"NPI", "US-NPI", "2.16.840.1.113883.4.6"})
#: HL7 table 0396 names → FHIR code system URIs.
_CODE_SYSTEMS = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": _SNOMED,
    "SNM": _SNOMED,
    "SNM3": _SNOMED,
    "SNOMEDCT": _SNOMED,
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "UCUM": "http://unitsofmeasure.org",
}
#: Table 0203 codes used as Identifier.type; other type codes go in type.text.
_ID_TYPES = frozenset(
    {"MR", "PI", "PT", "MB", "MA", "MC", "SN", "NPI", "PLAC", "FILL", "RI", "NIIP", "NII"}
)
_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})
_GENDERS = frozenset({"female", "male", "other", "unknown"})
_BSER_DISPLAY = {
    "2.0": "Service Request Created",
    "3.0": "Service Request Accepted",
    "4.0": "Service Request Declined",
    "5.1.1": "Event Scheduled",
    "5.1.2": "Scheduled Event Unattended",
    "5.1.3": "Scheduled Event Cancelled",
    "5.1.4": "Event Completed",
    "6.0": "Fulfillment Cancelled",
    "7.0": "Fulfillment Completed",
}
#: ServiceRequest.status where a state says more than "active" (STANDARDS §8: no
#: accepted or scheduled — those live on the Task).
_SR_STATUS = {
    State.NOTE_RECEIVED: "completed",
    State.CLOSED: "completed",
    State.CANCELLED: "revoked",
    State.DECLINED: "revoked",
}
_APPOINTMENT_STATUS = {
    Event.APPOINTMENT_BOOKED: "booked",
    Event.APPOINTMENT_RESCHEDULED: "booked",
    Event.APPOINTMENT_CANCELLED: "cancelled",
    Event.APPOINTMENT_NO_SHOW: "noshow",
    Event.APPOINTMENT_COMPLETED: "fulfilled",
}
_NOTE_EVENTS = frozenset({Event.CONSULT_NOTE_RECEIVED, Event.CONSULT_NOTE_AMENDED})


# -- canonical values → FHIR datatypes -------------------------------------------------


def system_for(namespace: str) -> str:
    """The Identifier.system for an HL7 assigning authority (see the module docstring)."""
    ns = namespace.strip()
    if ns.upper() in _NPI_NAMES:
        return _NPI
    if _OID.fullmatch(ns):
        return f"urn:oid:{ns}"
    if ns.startswith(("urn:", "http://", "https://")):
        return ns
    return f"urn:refloop:assigner:{quote(ns, safe='')}"


def identifier(value: Any, *, type_code: str | None = None, system: str = "") -> Json | None:
    """A canonical identifier (``{"value", "namespace"?, "type"?}``) as a FHIR Identifier."""
    if not isinstance(value, Mapping) or not _text(value.get("value")):
        return None
    out: Json = {"value": str(value["value"]).strip()}
    namespace = _text(value.get("namespace"))
    if system:
        out["system"] = system
    elif namespace:
        out["system"] = system_for(namespace)
    if namespace:
        out["assigner"] = {"display": namespace}
    code = type_code or _text(value.get("type"))
    if code and code.upper() in _ID_TYPES:
        out["type"] = {"coding": [{"system": _V2_0203, "code": code.upper()}]}
    elif code:
        out["type"] = {"text": code}
    return out


def code_system(name: str) -> str:
    """A coding system named as in HL7 v2 (table 0396, an OID, a URI) as a FHIR URI."""
    key = name.strip()
    if key.upper() in _CODE_SYSTEMS:
        return _CODE_SYSTEMS[key.upper()]
    if re.fullmatch(r"HL7[0-9]{4}", key.upper()):
        return f"http://terminology.hl7.org/CodeSystem/v2-{key[3:]}"
    if _OID.fullmatch(key):
        return f"urn:oid:{key}"
    if key.startswith(("urn:", "http://", "https://")):
        return key
    return f"urn:refloop:codesystem:{quote(key, safe='')}"


def coding(value: Any) -> Json | None:
    if not isinstance(value, Mapping) or not _text(value.get("code")):
        return None
    out: Json = {"code": str(value["code"]).strip()}
    if system := _text(value.get("system")):
        out["system"] = code_system(system)
    if display := _text(value.get("display")):
        out["display"] = display
    return out


def concept(value: Any, text: str | None = None) -> Json | None:
    """A canonical coding as a CodeableConcept (``text`` when there is no code)."""
    found = coding(value)
    if found is None:
        return {"text": text} if text else None
    out: Json = {"coding": [found]}
    if label := found.get("display") or text:
        out["text"] = label
    return out


def human_name(value: Any) -> Json | None:
    if not isinstance(value, Mapping):
        return None
    out: Json = {}
    if family := _text(value.get("family")):
        out["family"] = family
    given = [g for g in (_text(value.get("given")), _text(value.get("middle"))) if g]
    if given:
        out["given"] = given
    return out or None


def name_text(value: Any) -> str | None:
    name = human_name(value)
    if name is None:
        return None
    return " ".join([*name.get("given", []), name.get("family", "")]).strip() or None


def _instant(value: Any) -> str | None:
    """A canonical datetime that is a full FHIR instant (seconds and an offset)."""
    text = _text(value)
    if text and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text):
        return text
    return None


def _escape_search(text: str) -> str:
    # FHIR search escaping (`\` before `$ , |`), then percent-encoding for the URL.
    for ch in "\\$,|":
        text = text.replace(ch, "\\" + ch)
    return quote(text, safe=":/.-_~@")


def search_token(ident: Json) -> str:
    """``system|value`` of an identifier, ready for a search URL."""
    value = _escape_search(str(ident["value"]))
    system = ident.get("system")
    return f"{_escape_search(str(system))}|{value}" if system else value


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def _urn(*parts: str) -> str:
    return f"urn:uuid:{_uuid(*parts)}"


def _ref(full_url: str, display: str | None = None) -> Json:
    out: Json = {"reference": full_url}
    if display:
        out["display"] = display
    return out


def _by_id(rtype: str, ident: Json) -> Json:
    """A reference by identifier: the target lives on the server under an id we don't know."""
    kept = {k: v for k, v in ident.items() if k in ("system", "value", "type")}
    return {"type": rtype, "identifier": kept}


def _logical(rtype: str, ident: Json | None, display: str | None = None) -> Json | None:
    """A reference by identifier and/or display; None when neither is known."""
    if ident is None and not display:
        return None
    out: Json = _by_id(rtype, ident) if ident is not None else {"type": rtype}
    if display:
        out["display"] = display
    return out


# -- the bundle ------------------------------------------------------------------------


class _Bundle:
    """A transaction Bundle being built: entries in the order they were added."""

    def __init__(self, referral_id: str) -> None:
        self.referral_id = referral_id
        self.entries: list[Json] = []

    def urn(self, role: str) -> str:
        return _urn(self.referral_id, role)

    def key(self, role: str, *natural: Json | None) -> tuple[Json, list[Json]]:
        """The identifier to match on, and the identifiers the resource carries: the first
        natural one that has a system, else a per-referral ``urn:uuid`` (added to them)."""
        carried = [n for n in natural if n]
        for ident in carried:
            if ident.get("system"):
                return ident, carried
        own = {"system": _URI, "value": self.urn(role)}
        return own, [*carried, own]

    def create(self, role: str, resource: Json, match: Json) -> str:
        url = self.urn(role)
        request = {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={search_token(match)}",
        }
        self.entries.append({"fullUrl": url, "resource": resource, "request": request})
        return url

    def update(self, role: str, resource: Json, match: Json) -> str:
        url = self.urn(role)
        request = {
            "method": "PUT",
            "url": f"{resource['resourceType']}?identifier={search_token(match)}",
        }
        self.entries.append({"fullUrl": url, "resource": resource, "request": request})
        return url

    def patch(self, rtype: str, match: Json, path: str, code: str) -> None:
        # FHIRPath Patch: replace one element and leave the rest of the EHR's copy alone.
        parts = [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": path},
            {"name": "value", "valueCode": code},
        ]
        resource = {
            "resourceType": "Parameters",
            "parameter": [{"name": "operation", "part": parts}],
        }
        request = {"method": "PATCH", "url": f"{rtype}?identifier={search_token(match)}"}
        # No fullUrl: it would name the Parameters body, not the resource it changes.
        self.entries.append({"resource": resource, "request": request})

    def render(self) -> Rendered:
        bundle: Json = {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}
        try:
            Bundle.model_validate(bundle)
        except pydantic.ValidationError as exc:
            raise RenderError(f"FHIR validation failed at {self._where(exc)}") from None
        payload = json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return Rendered(
            payload=payload.encode("utf-8"),
            content_type=FHIR_JSON,
            metadata={"fhir_method": "POST", "fhir_url": ""},
        )

    def _where(self, exc: pydantic.ValidationError) -> str:
        # Element locations only: pydantic's messages and inputs may quote the value.
        places: list[str] = []
        for error in exc.errors():
            loc = list(error["loc"])
            head = "Bundle"
            if len(loc) >= 3 and loc[:1] == ["entry"] and loc[2] == "resource":
                index = loc[1]
                head = f"entry[{index}] {self.entries[int(index)]['resource']['resourceType']}"
                loc = loc[3:]
            path = head + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
            if path not in places:
                places.append(path)
        shown = ", ".join(places[:5])
        return shown + (f" (+{len(places) - 5} more)" if len(places) > 5 else "")


class _Referral:
    """What both renderers read from the context, under names that say what it is."""

    def __init__(self, ctx: PacketContext) -> None:
        self.ctx = ctx
        self.fields: Mapping[str, Any] = ctx.referral.data.get("referral", {})
        self.system = ctx.options.get("identifier_system") or REFERRAL_SYSTEM
        self.own_id = {"system": self.system, "value": ctx.referral.id}
        patient = identifier(self.fields.get("patient.identifier"))
        if patient is None:
            raise RenderError("patient.identifier is missing")
        self.patient_id = patient

    def placer(self) -> Json | None:
        value = self.fields.get("correlate.placer_order") or self.fields.get(
            "correlate.referral_id"
        )
        return identifier(value, type_code="PLAC", system=self.ctx.options.get("placer_system", ""))

    def filler(self) -> Json | None:
        return identifier(self.fields.get("correlate.filler_order"), type_code="FILL")

    def order_ids(self) -> list[Json]:
        return [i for i in (self.placer(), self.filler()) if i] + [self.own_id]

    def order_match(self) -> Json:
        """How the EHR's ServiceRequest is found: the placer number when it has a system."""
        placer = self.placer()
        return placer if placer and placer.get("system") else self.own_id

    def business_status(self, state: State) -> tuple[str, Json]:
        status, code = BSER[state]
        display = _BSER_DISPLAY[code]
        return status, {"coding": [{"system": _BSER_CS, "code": code, "display": display}]}

    def priority(self) -> str | None:
        value = _text(self.fields.get("priority"))
        return value if value in _PRIORITIES else None

    def patient(self) -> Json:
        res: Json = {"resourceType": "Patient", "identifier": [self.patient_id]}
        if name := human_name(self.fields.get("patient.name")):
            res["name"] = [name]
        if (gender := _text(self.fields.get("patient.sex"))) in _GENDERS:
            res["gender"] = gender
        if birth := _text(self.fields.get("patient.birth_date")):
            res["birthDate"] = birth
        return res

    def party(self, prefix: str) -> tuple[Json | None, str | None, str | None]:
        """(identifier, person's name, organisation) of ``requester`` or ``recipient``."""
        return (
            identifier(self.fields.get(f"{prefix}.identifier")),
            name_text(self.fields.get(f"{prefix}.name")),
            _text(self.fields.get(f"{prefix}.organization")),
        )

    def recipient_org(self) -> tuple[str | None, list[Json]]:
        spec = self.ctx.recipient
        if spec is None:
            return self.party("recipient")[2], []
        ids = [{"system": DIRECTORY_SYSTEM, "value": spec.id}]
        if spec.npi:
            ids.insert(0, {"system": _NPI, "value": spec.npi})
        return spec.name, ids


# -- fhir.referral_bundle --------------------------------------------------------------


def _add_party(
    b: _Bundle,
    role: str,
    person: tuple[Json | None, Json | None],
    organisation: tuple[str | None, list[Json]],
) -> Json | None:
    """Practitioner and/or Organization (a PractitionerRole joins both); the reference
    the ServiceRequest and Task use, or None when nothing is known."""
    person_id, person_name = person
    org_name, org_ids = organisation
    practitioner = organization = None
    if person_id or person_name:
        match, ids = b.key(f"{role}/practitioner", person_id)
        res: Json = {"resourceType": "Practitioner", "identifier": ids}
        if person_name:
            res["name"] = [person_name]
        practitioner = _ref(b.create(f"{role}/practitioner", res, match), name_text(person_name))
    if org_name or org_ids:
        match, ids = b.key(f"{role}/organization", *org_ids)
        res = {"resourceType": "Organization", "identifier": ids, "active": True}
        if org_name:
            res["name"] = org_name
        organization = _ref(b.create(f"{role}/organization", res, match), org_name)
    if practitioner and organization:
        match, ids = b.key(f"{role}/role", None)
        res = {
            "resourceType": "PractitionerRole",
            "identifier": ids,
            "practitioner": practitioner,
            "organization": organization,
        }
        return _ref(b.create(f"{role}/role", res, match))
    return practitioner or organization


def _coverage(b: _Bundle, r: _Referral, patient: str) -> Json | None:
    ctx = r.ctx
    payer = (
        _text(r.fields.get("insurance.payer"))
        or _text(r.fields.get("authorization.payer"))
        or _text(ctx.referral.get("authorization", "authorization.payer"))
    )
    payer_id = identifier(r.fields.get("insurance.payer_id"))
    if payer is None and payer_id is None:
        return None  # Coverage.payor is 1..1: a plan or member id alone cannot be sent
    if payer_id is None:
        payor: Json = {"display": payer}
    else:
        # The mappings fall back to the company id for the payer's name: not a display.
        name = payer if payer != payer_id["value"] else None
        payor = _by_id("Organization", payer_id) | ({"display": name} if name else {})
    member = identifier(r.fields.get("insurance.member_id"), type_code="MB")
    match, ids = b.key("coverage", None)
    res: Json = {
        "resourceType": "Coverage",
        "identifier": [member, *ids] if member else ids,
        "status": "active",
        "beneficiary": _ref(patient),
        "payor": [payor],
    }
    if member:
        res["subscriberId"] = member["value"]
    if plan := _text(r.fields.get("insurance.plan")):
        kind = {"coding": [{"system": _COVERAGE_CLASS, "code": "plan"}]}
        res["class"] = [{"type": kind, "value": plan, "name": plan}]
    return _ref(b.create("coverage", res, match))


def _conditions(b: _Bundle, r: _Referral, patient: str) -> list[Json]:
    refs: list[Json] = []
    clinical = {"coding": [{"system": _CLINICAL, "code": "active"}]}
    for dx in diagnoses(r.ctx):
        role = f"condition/{dx.get('system', '')}|{dx['code']}"
        match, ids = b.key(role, None)
        res: Json = {
            "resourceType": "Condition",
            "identifier": ids,
            "clinicalStatus": clinical,
            "code": concept(dx),
            "subject": _ref(patient),
        }
        refs.append(_ref(b.create(role, res, match)))
    return refs


def _supporting(b: _Bundle, r: _Referral, patient: str) -> list[Json]:
    """Documents the order carried (360X: a C-CDA in an ED or RP OBX)."""
    message = source_message(r.ctx, "order")
    if message is None:
        return []
    refs: list[Json] = []
    for n, seg in enumerate(message.all("OBX"), start=1):
        if obx_type(message, seg) not in ("ED", "RP"):
            continue
        content = attachments(message, [seg])
        if not content:
            continue
        role = f"supporting/{n}"
        match, ids = b.key(role, None)
        res: Json = {
            "resourceType": "DocumentReference",
            "identifier": ids,
            "status": "current",
            "subject": _ref(patient),
            "content": [{"attachment": a} for a in content],
        }
        if kind := concept(obx_code(message, seg)):
            res["type"] = kind
        refs.append(_ref(b.create(role, res, match)))
    return refs


def render_referral_bundle(ctx: PacketContext) -> Rendered:
    """``fhir.referral_bundle``: the referral for a specialist's FHIR server."""
    r = _Referral(ctx)
    b = _Bundle(ctx.referral.id)
    match, ids = b.key("patient", r.patient_id)
    patient_res = r.patient()
    patient_res["identifier"] = ids
    patient = b.create("patient", patient_res, match)
    f = r.fields
    requester = _add_party(
        b,
        "requester",
        (identifier(f.get("requester.identifier")), human_name(f.get("requester.name"))),
        (_text(f.get("requester.organization")), []),
    )
    performer = _add_party(
        b,
        "performer",
        (identifier(f.get("recipient.identifier")), human_name(f.get("recipient.name"))),
        r.recipient_org(),
    )
    coverage = _coverage(b, r, patient)
    conditions = _conditions(b, r, patient)
    supporting = _supporting(b, r, patient)

    service_request: Json = {
        "resourceType": "ServiceRequest",
        "identifier": r.order_ids(),
        "status": _SR_STATUS.get(ctx.referral.state, "active"),
        "intent": "order",
        "category": [
            {
                "coding": [{"system": _SNOMED, "code": "3457005", "display": "Patient referral"}],
                "text": "Patient referral",
            }
        ],
        "subject": _ref(patient),
    }
    optional: Json = {
        "code": concept(f.get("service")),
        "priority": r.priority(),
        "authoredOn": _text(f.get("requested_at")),
        "requester": requester,
        "performer": [performer] if performer else None,
        "performerType": concept(None, _text(f.get("specialty"))),
        "reasonCode": _reason(f),
        "reasonReference": conditions or None,
        "insurance": [coverage] if coverage else None,
        "supportingInfo": supporting or None,
        "note": [{"text": note}] if (note := _text(f.get("note"))) else None,
        "occurrencePeriod": {"end": due} if (due := _text(f.get("due_by"))) else None,
    }
    service_request.update({k: v for k, v in optional.items() if v})
    sr_url = b.create("service-request", service_request, r.own_id)

    task = _task(r, ctx.referral.state, _ref(sr_url), _ref(patient), requester, performer)
    b.create("task", task, r.own_id)
    return b.render()


def _reason(f: Mapping[str, Any]) -> list[Json] | None:
    text = _text(f.get("reason"))
    found = concept(f.get("reason_code"), text)
    if found is None:
        return None
    found.setdefault("text", text or found["coding"][0]["code"])
    return [found]


def _task(
    r: _Referral,
    state: State,
    focus: Json,
    patient: Json,
    requester: Json | None,
    owner: Json | None,
) -> Json:
    status, business = r.business_status(state)
    task: Json = {
        "resourceType": "Task",
        "identifier": r.order_ids(),
        "basedOn": [focus],
        "focus": focus,
        "for": patient,
        "status": status,
        "businessStatus": business,
        "intent": "order",
        "code": {"coding": [{"system": _TASK_CODE, "code": "fulfill"}]},
        "lastModified": r.ctx.now.isoformat(),
    }
    if priority := r.priority():
        task["priority"] = priority
    if authored := _text(r.fields.get("requested_at")):
        task["authoredOn"] = authored
    for name, ref in (("requester", requester), ("owner", owner)):
        if ref:
            task[name] = ref
    return task


# -- fhir.status_update ----------------------------------------------------------------


def _document(b: _Bundle, r: _Referral, patient: Json, order: Json) -> str:
    ctx = r.ctx
    note: Mapping[str, Any] = ctx.referral.data.get("consult_note", {})
    title = _text(note.get("title")) or "Consult note"
    content = note_attachments(ctx, title=title)
    if not content:
        raise RenderError("consult note content: the trigger message has no OBX text or data")
    doc_id = identifier(note.get("document_id"))
    match, ids = b.key(_document_role(note), None)
    res: Json = {
        "resourceType": "DocumentReference",
        "identifier": ids,
        "status": "current",
        "docStatus": "amended" if ctx.event.type is Event.CONSULT_NOTE_AMENDED else "final",
        "subject": patient,
        "description": title,
        "content": [{"attachment": a} for a in content],
        "context": {"related": [order]},
    }
    if doc_id:
        res["masterIdentifier"] = doc_id
    if kind := concept(note.get("document_type"), title):
        res["type"] = kind
    if when := _instant(note.get("observed_at")):
        res["date"] = when
    author = _logical(
        "Practitioner",
        identifier(note.get("author.identifier")),
        name_text(note.get("author.name")),
    )
    if author:
        res["author"] = [author]
    parent = identifier(note.get("parent_document_id"))
    if parent and ctx.event.type is Event.CONSULT_NOTE_AMENDED:
        res["relatesTo"] = [{"code": "replaces", "target": _logical("DocumentReference", parent)}]
    return b.update(_document_role(note), res, match)


def _document_role(note: Mapping[str, Any]) -> str:
    # Keyed on the document id: an amendment that keeps it updates the same resource
    # (the server's history keeps the earlier version); one with a new id is its own.
    doc = identifier(note.get("document_id"))
    return f"document/{doc.get('system', '')}|{doc['value']}" if doc else "document"


def _appointment(b: _Bundle, r: _Referral, patient: Json, order: Json, status: str) -> str | None:
    appt: Mapping[str, Any] = r.ctx.referral.data.get("appointment", {})
    natural = identifier(appt.get("appointment_id"))
    if natural is None:
        return None
    start, end = _instant(appt.get("start")), _instant(appt.get("end"))
    minutes = appt.get("duration_minutes")
    if start and not end and isinstance(minutes, int):
        end = (datetime.fromisoformat(start) + timedelta(minutes=minutes)).isoformat()
    if status != "cancelled":  # app-3: only a cancelled (or proposed) one may lack times
        for name, value in (("start", start), ("end", end)):
            if value is None:
                raise RenderError(f"appointment.{name} is missing")
    role = _appointment_role(natural)
    match, ids = b.key(role, natural)
    participants = [{"actor": patient, "status": "accepted"}]
    provider = _logical(
        "Practitioner",
        identifier(appt.get("provider.identifier")),
        name_text(appt.get("provider.name")),
    )
    if provider:
        participants.append({"actor": provider, "status": "accepted"})
    if location := _text(appt.get("location")):
        participants.append(
            {"actor": {"type": "Location", "display": location}, "status": "accepted"}
        )
    res: Json = {
        "resourceType": "Appointment",
        "identifier": ids,
        "status": status,
        "basedOn": [order],
        "participant": participants,
    }
    optional: Json = {
        "start": start,
        "end": end,
        "minutesDuration": minutes if isinstance(minutes, int) and minutes > 0 else None,
        "serviceType": [s] if (s := concept(appt.get("service"))) else None,
    }
    if status == "cancelled" and (why := _text(r.ctx.event.fields.get("status_reason"))):
        optional["cancelationReason"] = {"text": why}
    res.update({k: v for k, v in optional.items() if v})
    return b.update(role, res, match)


def _appointment_role(natural: Json) -> str:
    return f"appointment/{natural.get('system', '')}|{natural['value']}"


def render_status_update(ctx: PacketContext) -> Rendered:
    """``fhir.status_update``: loop-closure write-back to the referring EHR."""
    r = _Referral(ctx)
    b = _Bundle(ctx.referral.id)
    state = ctx.event.state_after or ctx.referral.state
    patient = _by_id("Patient", r.patient_id)
    order = _by_id("ServiceRequest", r.order_match())

    outputs: list[Json] = []
    note: Mapping[str, Any] = ctx.referral.data.get("consult_note", {})
    if ctx.event.type in _NOTE_EVENTS:
        note_ref: Json | None = _ref(_document(b, r, patient, order))
    elif note:
        note_ref = _by_id("DocumentReference", b.key(_document_role(note))[0])
    else:
        note_ref = None
    if note_ref:
        kind = concept(note.get("document_type"), "Consult note")
        outputs.append({"type": kind, "valueReference": note_ref})

    appointment: Mapping[str, Any] = ctx.referral.data.get("appointment", {})
    appt_status = _APPOINTMENT_STATUS.get(ctx.event.type)
    appt_ref: Json | None = None
    if appt_status:
        url = _appointment(b, r, patient, order, appt_status)
        appt_ref = _ref(url) if url else None
    elif natural := identifier(appointment.get("appointment_id")):
        appt_ref = _logical("Appointment", b.key(_appointment_role(natural), natural)[0])
    if appt_ref:
        outputs.append({"type": {"text": "Appointment"}, "valueReference": appt_ref})

    before = _SR_STATUS.get(ctx.event.state_before) if ctx.event.state_before else None
    after = _SR_STATUS.get(state)
    if after and after != before and ctx.options.get("service_request_status") != "off":
        b.patch(
            "ServiceRequest",
            r.order_match(),
            "ServiceRequest.status",
            after,
        )

    requester = _logical("Practitioner", *_who(r.party("requester")))
    task = _task(r, state, order, patient, requester, _owner(r))
    if why := _text(ctx.event.fields.get("status_reason")):
        task["statusReason"] = {"text": why}
    if outputs:
        task["output"] = outputs
    b.update("task", task, r.own_id)
    return b.render()


def _who(party: tuple[Json | None, str | None, str | None]) -> tuple[Json | None, str | None]:
    ident, person, org = party
    return ident, person or org


def _owner(r: _Referral) -> Json | None:
    org_name, org_ids = r.recipient_org()
    if r.ctx.recipient is not None:
        return _logical("Organization", org_ids[0], org_name)
    ident, person, org = r.party("recipient")
    if ident or person:
        return _logical("Practitioner", ident, person or org)
    return _logical("Organization", None, org)


RENDERERS: dict[str, Renderer] = {
    "fhir.referral_bundle": render_referral_bundle,
    "fhir.status_update": render_status_update,
}
