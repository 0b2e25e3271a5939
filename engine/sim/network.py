"""The synthetic referral network: specialists, patients, orders, and how people behave.

Theory of operation
-------------------
:func:`build` draws, from one seeded :class:`random.Random`, the specialists (one per
specialty, each with its own lead time and habit of returning notes), the patients
(contact details, consent, language) and the referral orders (who, to which specialty,
when, how urgent). :class:`Behaviour` holds every probability and delay, with the
defaults documented beside each: they aim the network *without* any policy at what
manual practices see (about a third of referrals still open at 30 days, loops closed in
about three weeks).

Each referral also gets two private random streams, derived from the seed and its
index: ``base`` for what happens with nobody nudging (when the patient books, whether
they come, when the note comes back) and ``nudge`` for how people answer a reminder.
The run with the policy and the run without it therefore face the *same* patients with
the same luck (common random numbers): the difference between the two is the policy's,
not the dice's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from engine.sim.messages import Patient

__all__ = ["START", "Behaviour", "Network", "Order", "Specialist", "build", "lognormal_days"]

#: Virtual time of day 0 (a Monday): nothing depends on the date itself.
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)

#: (OBR-4 service code of the referral_services value set, specialty), in draw order.
SERVICES = (
    ("REFCARD", "cardiology"),
    ("REFDERM", "dermatology"),
    ("REFGI", "gastroenterology"),
    ("REFNEURO", "neurology"),
    ("REFORTHO", "orthopedics"),
    ("REFPULM", "pulmonology"),
)

_FAMILY = ("TESTPATIENT", "SIMPATIENT", "FAKEPATIENT", "SYNTHPATIENT")
_GIVEN = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL")


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How patients and specialists behave; days are calendar days. A ``*_days``
    median with a ``*_spread`` is a log-normal delay (spread = sigma of its log)."""

    # -- patients: booking --------------------------------------------------------------
    #: Never book unprompted: the referral leaks unless someone chases it.
    never_book: float = 0.08
    #: Days from the packet reaching the specialist to the patient booking, when they do.
    booking_days: float = 5.0
    booking_spread: float = 0.6
    #: A reminder (outreach delivered) books the patient with this probability, within
    #: ``nudge_days`` (uniform), unless they would have booked sooner anyway.
    outreach_response: float = 0.3
    nudge_days: float = 2.0
    #: The referring physician told (escalation to the referrer, no-show notice): the
    #: practice calls the patient, a smaller and slower bump.
    referrer_response: float = 0.2
    referrer_days: float = 3.0
    #: The patient answers a reminder by SMS or e-mail (a patient.replied event and a
    #: worklist item for the coordinator).
    reply: float = 0.08
    #: Contact details and consent.
    has_phone: float = 0.9
    has_email: float = 0.6
    sms_consent: float = 0.85
    email_consent: float = 0.7
    spanish: float = 0.15

    # -- patients: the visit ------------------------------------------------------------
    no_show: float = 0.12
    #: ... and after a reminder before the visit (an outreach delivered while booked).
    reminded_no_show: float = 0.07
    #: Cancel the booked appointment (somewhere between booking and visit).
    cancel: float = 0.07
    #: After a no-show or a cancellation, rebook unprompted with this probability.
    rebook: float = 0.6
    rebook_days: float = 7.0

    # -- specialists ----------------------------------------------------------------------
    #: Days from booking to the visit (each specialist's median is drawn around this).
    lead_days: float = 9.0
    lead_spread: float = 0.35
    #: Never send the note unasked (each specialist's own rate is drawn around this).
    note_never: float = 0.1
    #: Days from the visit to the consult note, when it comes.
    note_days: float = 3.0
    note_spread: float = 0.7
    #: A note request (notification) gets the note with this probability, within
    #: ``note_request_days``.
    note_request_response: float = 0.6
    note_request_days: float = 3.0

    # -- the orders ---------------------------------------------------------------------
    urgent: float = 0.1


@dataclass(frozen=True, slots=True)
class Specialist:
    id: str
    name: str
    specialty: str
    service: str  # OBR-4 code
    npi: str
    lead_days: float
    note_never: float


@dataclass(frozen=True, slots=True)
class Order:
    index: int
    placer: str  # ORC-2
    patient: Patient
    specialist: Specialist
    priority: str  # HL7 table 0027: R routine, A asap
    at: datetime
    sms_consent: bool
    email_consent: bool


@dataclass(frozen=True, slots=True)
class Network:
    seed: int
    behaviour: Behaviour
    specialists: tuple[Specialist, ...]
    orders: tuple[Order, ...]
    start: datetime = START
    end: datetime = START

    def rng(self, index: int) -> tuple[random.Random, random.Random]:
        """Fresh ``(base, nudge)`` streams of one referral: each run starts them anew."""
        return (
            random.Random(f"{self.seed}/{index}/base"),
            random.Random(f"{self.seed}/{index}/nudge"),
        )


def lognormal_days(rng: random.Random, median: float, spread: float) -> timedelta:
    return timedelta(days=rng.lognormvariate(math.log(median), spread))


def _npi(rng: random.Random) -> str:
    """A ten-digit number that passes the NPI check digit (Luhn over 80840 + 9 digits)."""
    body = "9" + "".join(str(rng.randrange(10)) for _ in range(8))
    digits = [int(c) for c in "80840" + body]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


def build(referrals: int, days: int, seed: int, behaviour: Behaviour | None = None) -> Network:
    """The network for ``referrals`` orders over a run of ``days``. Orders arrive
    uniformly over the first ``days - 30`` days (at least a third of the run), so most
    referrals are 30 days old by the end and count in the 30-day KPIs."""
    b = behaviour or Behaviour()
    rng = random.Random(seed)
    specialists = tuple(
        Specialist(
            id=f"sim-{specialty}",
            name=f"Simulated {specialty.replace('_', ' ')} clinic (FAKE)",
            specialty=specialty,
            service=service,
            npi=_npi(rng),
            lead_days=b.lead_days * rng.uniform(0.6, 1.4),
            note_never=min(1.0, b.note_never * rng.uniform(0.3, 1.7)),
        )
        for service, specialty in SERVICES
    )
    arrivals = timedelta(days=max(days - 30, days / 3))
    orders = []
    for i in range(referrals):
        has_phone = rng.random() < b.has_phone
        has_email = rng.random() < b.has_email
        patient = Patient(
            mrn=f"SIM{i:06d}",
            family=rng.choice(_FAMILY),
            given=rng.choice(_GIVEN),
            birth_date=f"{rng.randrange(1940, 2010)}{rng.randrange(1, 13):02d}"
            f"{rng.randrange(1, 29):02d}",
            sex=rng.choice("FM"),
            phone=f"+1555555{i % 10000:04d}" if has_phone else "",
            email=f"patient{i}@example.invalid" if has_email else "",
            language="es" if rng.random() < b.spanish else "en",
        )
        orders.append(
            Order(
                index=i,
                placer=f"SIM-{seed}-{i:05d}",
                patient=patient,
                specialist=rng.choice(specialists),
                priority="A" if rng.random() < b.urgent else "R",
                at=START + timedelta(seconds=rng.uniform(0, arrivals.total_seconds())),
                sms_consent=has_phone and rng.random() < b.sms_consent,
                email_consent=has_email and rng.random() < b.email_consent,
            )
        )
    orders.sort(key=lambda o: (o.at, o.index))
    return Network(
        seed=seed,
        behaviour=b,
        specialists=specialists,
        orders=tuple(orders),
        start=START,
        end=START + timedelta(days=days),
    )
