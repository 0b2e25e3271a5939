"""Patient outreach (pure): which medium, which address, which template, and when.

Theory of operation
-------------------
A ladder's ``outreach`` step comes due as an :class:`~engine.policy.timers.Effect`
(``template``, ``prefer``). :func:`plan_outreach` decides, with no clock and no I/O, what
becomes of it for one patient:

* :class:`Send` — text or e-mail this address now, with this template in this language;
* :class:`Defer` — not now: it is quiet hours where the patient lives; try again when
  they end (the scheduler keeps the timer pending, due then);
* :class:`Skip` — nobody to send to, with a code the coordinator can act on.

The patient (:class:`Contact`) comes from the referral's projection — the order's
``patient.phone``, ``patient.email``, ``patient.language``, ``patient.timezone``,
``patient.contact_preference``, ``patient.consent.sms|email`` — overridden by what the
patient told *us* (:class:`Preferences`, the ``patient_preferences`` row: a STOP by text,
a language a coordinator set), which is newer and the patient's own word.

Choosing a medium walks the step's ``prefer`` list in order (the patient's own
``contact_preference`` first when the list has it). Only ``sms`` and ``email`` are
channels refloop has: ``voice``, ``letter`` and ``portal`` are passed over to the next.
A medium is usable when the patient has an address for it, has not said no (consent
"no", or a STOP: **opted_out**), its channel is configured, and a template exists for it.

Consent, as a US clinic needs it: a text message to a mobile number is an automated
call under the TCPA, and a reminder is only safely exempt with the patient's prior
express consent, so **absent SMS consent is no consent** (``no_consent``) unless the
clinic says its intake collects it for every number (``sms_assume_consent``). E-mail to
the address the patient gave is ordinary practice (HIPAA lets the patient be e-mailed at
the address on file; the templates carry no clinical detail), so absent e-mail consent
is consent unless ``email_requires_consent``; an explicit "no" always stops it.

Quiet hours (default 21:00-08:00) are local time in the patient's zone
(``patient.timezone``, else the clinic's): inside them the plan is a :class:`Defer` until
the next end of quiet hours, computed in that zone, so a DST change moves the instant
with the wall clock. Quiet hours apply to e-mail too: phones chime for both.

Templates are looked up in the patient's language (``es-MX`` → ``es-mx``, then ``es``),
then in the clinic's default language: a :class:`Send` made with the default says so in
``fallback`` (the coordinator gets a ``template_language_fallback`` item: someone should
translate it).

Skip codes: ``disabled`` (outreach off), ``opted_out`` (the patient said no, or
``contact_preference: none``), ``no_consent`` (SMS without recorded consent),
``no_template`` (none for the medium in any acceptable language), ``no_channel`` (only
media refloop cannot send, or their channel is not configured), ``no_contact`` (no
phone or e-mail). When several media fail, the most telling reason is reported, in
that order of precedence.

The templates themselves (loading, checking, rendering) live with the renderers in
:mod:`engine.outbound.packets.outreach`; planning only asks a :class:`TemplateLookup`
whether one exists, so this module stays free of Jinja and of files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Protocol

from engine.domain.projection import Referral
from engine.domain.timezones import zone_of
from engine.policy.language import Policy
from engine.policy.timers import Effect

__all__ = [
    "MEDIA",
    "SKIP_REASONS",
    "Contact",
    "Defer",
    "OutreachSettings",
    "Plan",
    "Preferences",
    "Send",
    "Skip",
    "TemplateLookup",
    "language_candidates",
    "missing_templates",
    "normalise_phone",
    "plan_outreach",
    "quiet_until",
    "zone_of",
]

#: What refloop can send patients, and the packet format of each.
MEDIA: Mapping[str, str] = {"sms": "outreach.sms", "email": "outreach.email"}
#: Most telling first: what a coordinator must know about a patient not reached.
SKIP_REASONS = ("disabled", "opted_out", "no_consent", "no_template", "no_channel", "no_contact")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
_DIGITS = re.compile(r"\D")


# ---- the patient ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preferences:
    """What the patient told refloop (a ``patient_preferences`` row). None: not said."""

    sms_consent: bool | None = None
    email_consent: bool | None = None
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Contact:
    """How to reach one patient. Addresses are PHI: they go into an outbox row's
    endpoint, never into a log line, an event or a worklist detail."""

    phone: str | None = None  # E.164 when it could be read as a number
    email: str | None = None
    language: str | None = None
    timezone: str | None = None
    preference: str | None = None  # sms | email | voice | none
    sms_consent: bool | None = None
    email_consent: bool | None = None
    first_name: str | None = None

    @classmethod
    def of(cls, referral: Referral, preferences: Preferences | None = None) -> Contact:
        """The referral's contact fields, with the patient's own preferences over them."""
        prefs = preferences or Preferences()
        sms = prefs.sms_consent
        email = prefs.email_consent
        return cls(
            phone=normalise_phone(_text(referral.value("patient.phone"))),
            email=_email(_text(referral.value("patient.email"))),
            language=prefs.language or _text(referral.value("patient.language")),
            timezone=_text(referral.value("patient.timezone")),
            preference=(_text(referral.value("patient.contact_preference")) or "").lower() or None,
            sms_consent=sms if sms is not None else _yes_no(referral.value("patient.consent.sms")),
            email_consent=(
                email if email is not None else _yes_no(referral.value("patient.consent.email"))
            ),
            first_name=_first_name(referral.value("patient.name")),
        )


def normalise_phone(value: str | None) -> str | None:
    """A phone number as E.164-ish: ``+`` and digits. A 10-digit number (or 11 starting
    with 1) is taken as North American; anything else keeps the digits it was given
    only when written with a ``+``. None when it cannot be a number."""
    if not value:
        return None
    text = value.strip()
    # Extensions are not textable: "555-1234 x12" is the main line.
    text = re.split(r"(?i)\s*(?:x|ext\.?)\s*\d+$", text)[0]
    digits = _DIGITS.sub("", text)
    if text.startswith("+"):
        return f"+{digits}" if 8 <= len(digits) <= 15 and digits[0] != "0" else None
    if text.startswith("00") and 10 <= len(digits) <= 17:
        return f"+{digits[2:]}"
    if len(digits) == 10 and digits[0] not in "01":
        return f"+1{digits}"
    if len(digits) == 11 and digits[0] == "1" and digits[1] not in "01":
        return f"+{digits}"
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, Mapping):
        for key in ("value", "code"):
            if isinstance(value.get(key), str) and value[key].strip():
                return str(value[key]).strip()
    return None


def _email(value: str | None) -> str | None:
    return value if value and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value) else None


def _yes_no(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = (_text(value) or "").lower()
    if text in ("yes", "y", "true", "1", "granted", "opt-in", "optin"):
        return True
    if text in ("no", "n", "false", "0", "denied", "revoked", "opt-out", "optout"):
        return False
    return None


def _first_name(value: Any) -> str | None:
    if isinstance(value, Mapping):
        found = _text(value.get("given"))
        return found.split()[0] if found else None
    return None


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutreachSettings:
    """The clinic's side ([outreach] of engine.toml, and which channels exist)."""

    enabled: bool = True
    channels: Mapping[str, str] = field(
        default_factory=lambda: {"sms": "sms", "email": "email"}
    )  # medium → configured [channels.<name>]; a medium missing here is not sent
    quiet_start: time = time(21, 0)
    quiet_end: time = time(8, 0)
    default_timezone: str = "America/New_York"
    default_language: str = "en"
    sender_name: str = "your care team"
    sms_assume_consent: bool = False  # only when intake records consent for every number
    email_requires_consent: bool = False

    @classmethod
    def of(cls, config: Any, configured: Iterable[str] | None = None) -> OutreachSettings:
        """From :class:`engine.config.OutreachConfig`; ``configured``: the names of the
        [channels.*] that exist (a medium whose channel is missing is never chosen)."""
        names = None if configured is None else set(configured)
        channels = {
            medium: name
            for medium, name in (("sms", config.sms_channel), ("email", config.email_channel))
            if name and (names is None or name in names)
        }
        return cls(
            enabled=bool(config.enabled),
            channels=channels,
            quiet_start=_clock(config.quiet_start),
            quiet_end=_clock(config.quiet_end),
            default_timezone=config.default_timezone,
            default_language=config.default_language,
            sender_name=config.sender_name,
            sms_assume_consent=bool(getattr(config, "sms_assume_consent", False)),
            email_requires_consent=bool(getattr(config, "email_requires_consent", False)),
        )


def _clock(text: str) -> time:
    found = _TIME.match(text)
    if found is None:
        raise ValueError(f"not a time of day HH:MM: {text!r}")
    return time(int(found.group(1)), int(found.group(2)))


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    medium: str  # sms | email
    channel: str  # the [channels.<name>] it goes out on
    format: str  # outreach.sms | outreach.email
    endpoint: str = field(repr=False)  # the phone or e-mail address: the outbox row only
    template: str
    language: str  # the template's language
    fallback: bool = False  # no template in the patient's language: the default's
    requested_language: str = ""  # what the patient's language was (for the item)


@dataclass(frozen=True, slots=True)
class Defer:
    until: datetime  # aware, UTC: the end of quiet hours where the patient lives
    medium: str = ""


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str  # one of SKIP_REASONS
    tried: tuple[tuple[str, str], ...] = ()  # (medium, why not), in preference order


Plan = Send | Defer | Skip


class TemplateLookup(Protocol):
    def has(self, template: str, language: str, medium: str) -> bool: ...


def language_candidates(language: str | None) -> list[str]:
    """``es-MX`` → ``["es-mx", "es"]``; ``None`` → ``[]``."""
    if not language:
        return []
    tag = language.strip().lower().replace("_", "-")
    out = [tag]
    if "-" in tag:
        out.append(tag.split("-", 1)[0])
    return out


def plan_outreach(
    effect: Effect,
    contact: Contact,
    settings: OutreachSettings,
    templates: TemplateLookup,
    now: datetime,
) -> Plan:
    """What to do with one due ``outreach`` effect for this patient at ``now`` (aware)."""
    if not settings.enabled:
        return Skip("disabled")
    if contact.preference == "none":
        return Skip("opted_out", (("any", "contact_preference none"),))
    order = list(dict.fromkeys(effect.prefer or ("sms", "email")))
    if contact.preference in order:
        order.remove(contact.preference)
        order.insert(0, contact.preference)
    tried: list[tuple[str, str]] = []
    for medium in order:
        why, address = _usable(medium, contact, settings)
        if why:
            tried.append((medium, why))
            continue
        chosen = _template(effect.template, medium, contact, settings, templates)
        if chosen is None:
            tried.append((medium, "no_template"))
            continue
        language, fallback = chosen
        until = quiet_until(now, zone_of(contact.timezone, settings.default_timezone), settings)
        if until is not None:
            return Defer(until, medium)
        return Send(
            medium=medium,
            channel=settings.channels[medium],
            format=MEDIA[medium],
            endpoint=address,
            template=effect.template,
            language=language,
            fallback=fallback,
            requested_language=(language_candidates(contact.language) or [""])[0],
        )
    reasons = {why for _, why in tried}
    reason = next((r for r in SKIP_REASONS if r in reasons), "no_channel")
    return Skip(reason, tuple(tried))


def _usable(medium: str, contact: Contact, settings: OutreachSettings) -> tuple[str, str]:
    """("", address) when ``medium`` can be used, else (why not, "")."""
    if medium not in MEDIA or medium not in settings.channels:
        return "no_channel", ""
    if medium == "sms":
        address, consent = contact.phone, contact.sms_consent
        assumed = settings.sms_assume_consent
    else:
        address, consent = contact.email, contact.email_consent
        assumed = not settings.email_requires_consent
    if consent is False:
        return "opted_out", ""
    if not address:
        return "no_contact", ""
    if consent is None and not assumed:
        return "no_consent", ""
    return "", address


def _template(
    template: str,
    medium: str,
    contact: Contact,
    settings: OutreachSettings,
    templates: TemplateLookup,
) -> tuple[str, bool] | None:
    wanted = language_candidates(contact.language)
    for language in wanted:
        if templates.has(template, language, medium):
            return language, False
    default = settings.default_language.lower()
    if default not in wanted and templates.has(template, default, medium):
        return default, bool(wanted)
    return None


def quiet_until(now: datetime, zone: tzinfo, settings: OutreachSettings) -> datetime | None:
    """The end of quiet hours (UTC) when ``now`` falls inside them in ``zone``, else None.
    Quiet hours may span midnight (21:00-08:00) or not (12:00-13:00); equal start and end
    means none."""
    start, end = settings.quiet_start, settings.quiet_end
    if start == end:
        return None
    local = now.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    if start < end:
        inside = start <= clock < end
        day = local.date()
    else:
        inside = clock >= start or clock < end
        day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not inside:
        return None
    return _local(day, end, zone).astimezone(UTC)


def _local(day: date, clock: time, zone: tzinfo) -> datetime:
    """``day`` at ``clock`` on the wall in ``zone``; a wall time skipped by a DST change
    (02:30 on a spring-forward night) is the first instant after the gap."""
    moment = datetime.combine(day, clock, tzinfo=zone)
    back = moment.astimezone(UTC).astimezone(zone)
    if back.replace(tzinfo=None) != moment.replace(tzinfo=None):
        return back  # inside a gap: zoneinfo reads it with the old offset, i.e. later
    return moment


def missing_templates(
    policy: Policy, templates: TemplateLookup, settings: OutreachSettings
) -> list[str]:
    """Every outreach step whose template has no version in the default language for a
    medium it prefers (and refloop can send): ``file:line:column: …`` at the step, for
    ``refloop config check`` and startup. Other languages may be missing: they fall back."""
    out: list[str] = []
    language = settings.default_language.lower()
    for ladder in policy.ladders:
        for step in ladder.steps:
            if step.do != "outreach":
                continue
            media = [m for m in (step.prefer or ("sms", "email")) if m in MEDIA]
            for medium in dict.fromkeys(media):
                if not templates.has(step.template, language, medium):
                    out.append(
                        f"{step.where}: outreach template {step.template!r} has no "
                        f"{language} {medium} version ({step.template}.{language}.{medium}.j2)"
                    )
    return out
