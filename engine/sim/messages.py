"""The simulator's HL7 v2.5.1 messages: what the synthetic EHR and specialists send.

Every message is one the shipped mappings recognise, stamped with virtual time (MSH-7,
ORC-9, the appointment start), so the events they become carry the simulated business
time. They link back the way real ones do: the order's placer number (ORC-2, with its
assigning authority) in SCH-26 of the scheduling messages and in OBR-2 of the consult
note. The data is synthetic: no real person, no real provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "AUTHORITY",
    "Patient",
    "booked",
    "cancelled",
    "completed",
    "consult_note",
    "hl7_time",
    "no_show",
    "order",
]

AUTHORITY = "SIMEHR"


@dataclass(frozen=True, slots=True)
class Patient:
    mrn: str
    family: str
    given: str
    birth_date: str  # YYYYMMDD
    sex: str  # F | M
    phone: str = ""
    email: str = ""
    language: str = "en"


def hl7_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _msh(control: str, mtype: str, at: datetime, sender: str) -> str:
    return f"MSH|^~\\&|{sender}|SIMCLINIC|REFLOOP|HUB|{hl7_time(at)}||{mtype}|{control}|P|2.5.1"


def _pid(p: Patient) -> str:
    # PID-13: home phone and e-mail (XTN: ^PRN^PH^...^phone, ^NET^Internet^email);
    # PID-15: primary language.
    phones = []
    if p.phone:
        phones.append(f"^PRN^PH^^^^^^^^^{p.phone}")
    if p.email:
        phones.append(f"^NET^Internet^{p.email}")
    return (
        f"PID|1||{p.mrn}^^^{AUTHORITY}^MR||{p.family}^{p.given}||{p.birth_date}|{p.sex}"
        f"|||||{'~'.join(phones)}||{p.language}"
    )


def _join(*segments: str) -> bytes:
    return "\r".join(segments).encode()


def _consent(set_id: int, topic: str, given: bool) -> str:
    # CON-2 consent type (the consent_contact_topics value set), CON-11 status (0498).
    return f"CON|{set_id}|{topic}^{topic} contact^L|||||||||{'A' if given else 'R'}"


def order(
    control: str,
    placer: str,
    patient: Patient,
    service: str,
    priority: str,
    at: datetime,
    *,
    sms_consent: bool = False,
    email_consent: bool = False,
) -> bytes:
    """ORM^O01 new referral order (ORC-1 NW); ``priority`` is table 0027 (R, S, A …);
    the patient's contact consent as CON segments, as a registration system records it."""
    consents: list[str] = []
    if patient.phone:
        consents.append(_consent(len(consents) + 1, "SMS", sms_consent))
    if patient.email:
        consents.append(_consent(len(consents) + 1, "EMAIL", email_consent))
    return _join(
        _msh(control, "ORM^O01^ORM_O01", at, "SIM_EHR"),
        _pid(patient),
        *consents,
        f"ORC|NW|{placer}^{AUTHORITY}|||||^^^^^{priority}||{hl7_time(at)}"
        "|||9999999991^REFERRER^SIM^^^^^^NPI",
        f"OBR|1|{placer}^{AUTHORITY}||{service}^Referral^L",
    )


def _sch(trigger: str, control: str, placer: str, appt: str, start: datetime, status: str) -> str:
    return (
        f"SCH|{appt}^SIM_SCHED|F{appt}^SIMSPEC||||NEW^New^L|||||^^^{hl7_time(start)}"
        f"||||||||||||||{status}^{status}^HL70278|{placer}^{AUTHORITY}"
    )


def _siu(
    trigger: str,
    control: str,
    placer: str,
    patient: Patient,
    appt: str,
    start: datetime,
    status: str,
    at: datetime,
) -> bytes:
    return _join(
        _msh(control, f"SIU^{trigger}^SIU_S12", at, "SIM_SCHED"),
        _sch(trigger, control, placer, appt, start, status),
        _pid(patient),
        "RGS|1|A",
        f"AIS|1|A|NEWPT^New patient visit^L|{hl7_time(start)}|||30|MIN^minutes^ANS+",
    )


def booked(
    control: str, placer: str, patient: Patient, appt: str, start: datetime, at: datetime
) -> bytes:
    """SIU^S12: an appointment booked for ``start``."""
    return _siu("S12", control, placer, patient, appt, start, "Booked", at)


def cancelled(
    control: str, placer: str, patient: Patient, appt: str, start: datetime, at: datetime
) -> bytes:
    """SIU^S15: the appointment cancelled."""
    return _siu("S15", control, placer, patient, appt, start, "Cancelled", at)


def no_show(
    control: str, placer: str, patient: Patient, appt: str, start: datetime, at: datetime
) -> bytes:
    """SIU^S26: the patient did not come."""
    return _siu("S26", control, placer, patient, appt, start, "Noshow", at)


def completed(
    control: str, placer: str, patient: Patient, appt: str, start: datetime, at: datetime
) -> bytes:
    """SIU^S14 with SCH-25 Complete: the visit took place."""
    return _siu("S14", control, placer, patient, appt, start, "Complete", at)


def consult_note(control: str, placer: str, patient: Patient, at: datetime) -> bytes:
    """ORU^R01: the specialist's final consult note (OBR-25 F)."""
    return _join(
        _msh(control, "ORU^R01^ORU_R01", at, "SIM_SPEC_EMR"),
        _pid(patient),
        f"ORC|RE|{placer}^{AUTHORITY}|CN-{placer}^SIM_SPEC_EMR",
        f"OBR|1|{placer}^{AUTHORITY}|CN-{placer}^SIM_SPEC_EMR|11488-4^Consult note^LN"
        f"|||{hl7_time(at)}|||||||||||||||{hl7_time(at)}|||F",
        "OBX|1|TX|11488-4^Consult note^LN||Synthetic consult note.||||||F",
    )
