"""Synthetic referral-loop messages the shipped mappings recognise (synthetic data only).

One referral's loop: ORM^O01 new order (OBR-4 from the referral_services value set) →
SIU^S12 booked → SIU^S14 with SCH-25 Complete → ORU^R01 final consult note. Every
message links back by the placer order number (ORC-2 / SCH-26 / OBR-2) with its
assigning authority.
"""

from __future__ import annotations

PATIENT = "PID|1||{mrn}^^^ACME^MR||TESTPATIENT^ALPHA||19800101|F"


def _msh(control: str, mtype: str, sender: str = "ACME_EHR") -> str:
    return (
        f"MSH|^~\\&|{sender}|ACME_MAIN|REFLOOP|HUB|20261120101500-0600||{mtype}|{control}|P|2.5.1"
    )


def _join(*segments: str) -> bytes:
    return "\r".join(segments).encode()


def orm(control: str, placer: str, *, mrn: str = "100001", service: str = "REFCARD") -> bytes:
    """A new referral order (ORC-1 NW)."""
    return _join(
        _msh(control, "ORM^O01^ORM_O01"),
        PATIENT.format(mrn=mrn),
        f"ORC|NW|{placer}^ACME|||||^^^^^R||20261120101200-0600",
        f"OBR|1|{placer}^ACME||{service}^Referral^L",
    )


def siu(
    control: str,
    placer: str,
    *,
    trigger: str = "S12",
    status: str = "Booked",
    appointment: str | None = None,
    mrn: str = "100001",
    with_placer: bool = True,
) -> bytes:
    """A scheduling message; ``status`` goes in SCH-25 (``Complete`` marks the visit done)."""
    appt = appointment or f"A-{placer}"
    sch26 = f"{placer}^ACME" if with_placer else ""
    return _join(
        _msh(control, f"SIU^{trigger}^SIU_S12", sender="ACME_SCHED"),
        f"SCH|{appt}^ACME_SCHED|F{appt}^CLINIC||||NEW^New^L|||||^^^20261201140000-0600"
        f"||||||||||||||{status}^{status}^HL70278|{sch26}",
        PATIENT.format(mrn=mrn),
        "RGS|1|A",
        "AIS|1|A|CARDNP^Cardiology new patient^L|20261201140000-0600|||30|MIN^minutes^ANS+",
    )


def oru(control: str, placer: str, *, status: str = "F", mrn: str = "100001") -> bytes:
    """A consult note (OBR-25 F: final)."""
    return _join(
        _msh(control, "ORU^R01^ORU_R01", sender="CARDIO_EMR"),
        PATIENT.format(mrn=mrn),
        f"ORC|RE|{placer}^ACME|CN-{placer}^CARDIO_EMR",
        f"OBR|1|{placer}^ACME|CN-{placer}^CARDIO_EMR|11488-4^Consult note^LN|||20261201143000-0600"
        f"|||||||||||||||20261202105500-0600|||{status}",
        "OBX|1|TX|11488-4^Consult note^LN||Synthetic consult note text.||||||F",
    )


def loop(placer: str, *, prefix: str = "", mrn: str = "100001") -> list[bytes]:
    """The four messages of one referral's loop, in the order they normally arrive."""
    p = prefix or placer
    return [
        orm(f"{p}-O", placer, mrn=mrn),
        siu(f"{p}-S12", placer, mrn=mrn),
        siu(f"{p}-S14", placer, trigger="S14", status="Complete", mrn=mrn),
        oru(f"{p}-R", placer, mrn=mrn),
    ]


def unmapped(control: str) -> bytes:
    """A message type no shipped mapping handles: normalisation fails (mapping_error)."""
    return _join(_msh(control, "ZZZ^Z01"), PATIENT.format(mrn="100001"))


def adt(control: str) -> bytes:
    """Non-referral traffic: recognised and ignored by a named rule."""
    return _join(
        _msh(control, "ADT^A08^ADT_A01"),
        "EVN|A08|20261120101500",
        PATIENT.format(mrn="100001"),
        "PV1|1|O",
    )
