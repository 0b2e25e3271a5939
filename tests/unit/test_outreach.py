"""Outreach planning (pure): consent, preference order, quiet hours in the patient's zone
across DST changes, language fallback, voice passed over, disabled; the contact read off
the projection and overridden by the patient's preferences; the shipped templates."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.config import OutreachConfig
from engine.domain.projection import Referral
from engine.domain.referral import State
from engine.outbound.packets.outreach import SMS_LIMIT, TemplateError, Templates, message_context
from engine.policy.language import load_policy
from engine.policy.outreach import (
    Contact,
    Defer,
    OutreachSettings,
    Preferences,
    Send,
    Skip,
    language_candidates,
    missing_templates,
    normalise_phone,
    plan_outreach,
    quiet_until,
)
from engine.policy.timers import Effect

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
TEMPLATES = MAPPINGS / "policies" / "templates"
NY = ZoneInfo("America/New_York")
LA = ZoneInfo("America/Los_Angeles")
# Tuesday 2025-03-04 15:00 UTC: 10:00 in New York, 07:00 in Los Angeles.
NOON_ISH = datetime(2025, 3, 4, 15, 0, tzinfo=UTC)


class Lookup:
    def __init__(self, *have: tuple[str, str, str]) -> None:
        self.have = set(have)

    def has(self, template: str, language: str, medium: str) -> bool:
        return (template, language, medium) in self.have


ALL = Lookup(
    *((t, lang, m) for t in ("remind",) for lang in ("en", "es") for m in ("sms", "email"))
)


def effect(*prefer: str, template: str = "remind") -> Effect:
    return Effect(
        kind="outreach",
        key="k",
        referral_id="r",
        rule="l",
        at=NOON_ISH,
        template=template,
        prefer=tuple(prefer),
    )


def contact(**kw: Any) -> Contact:
    base: dict[str, Any] = {
        "phone": "+15555550100",
        "email": "pat@example.org",
        "sms_consent": True,
        "timezone": "America/New_York",
        "language": "en",
    }
    base.update(kw)
    return Contact(**base)


SETTINGS = OutreachSettings()


@pytest.mark.parametrize(
    ("prefer", "who", "settings", "want"),
    [
        # the first medium that works, in the step's order
        (("sms", "email"), {}, SETTINGS, ("send", "sms", "+15555550100")),
        (("email", "sms"), {}, SETTINGS, ("send", "email", "pat@example.org")),
        # voice is no channel of ours: the next one
        (("voice", "sms"), {}, SETTINGS, ("send", "sms", "+15555550100")),
        (("voice", "letter"), {}, SETTINGS, ("skip", "no_channel")),
        # TCPA: no recorded SMS consent is no consent
        (("sms",), {"sms_consent": None}, SETTINGS, ("skip", "no_consent")),
        (("sms", "email"), {"sms_consent": None}, SETTINGS, ("send", "email", "pat@example.org")),
        (
            ("sms",),
            {"sms_consent": None},
            OutreachSettings(sms_assume_consent=True),
            ("send", "sms", "+15555550100"),
        ),
        # a STOP (or consent "no") stops the medium, and says so
        (("sms",), {"sms_consent": False}, SETTINGS, ("skip", "opted_out")),
        (("sms", "email"), {"sms_consent": False}, SETTINGS, ("send", "email", "pat@example.org")),
        (("email",), {"email_consent": False}, SETTINGS, ("skip", "opted_out")),
        (
            ("email",),
            {},
            OutreachSettings(email_requires_consent=True),
            ("skip", "no_consent"),
        ),
        # no address
        (("sms", "email"), {"phone": None, "email": None}, SETTINGS, ("skip", "no_contact")),
        (("sms",), {"phone": None}, SETTINGS, ("skip", "no_contact")),
        # opted out outranks no contact when several fail
        (("sms", "email"), {"sms_consent": False, "email": None}, SETTINGS, ("skip", "opted_out")),
        # the patient's own preference goes first when the step allows it
        (("sms", "email"), {"preference": "email"}, SETTINGS, ("send", "email", "pat@example.org")),
        (("sms",), {"preference": "email"}, SETTINGS, ("send", "sms", "+15555550100")),
        (("sms", "email"), {"preference": "none"}, SETTINGS, ("skip", "opted_out")),
        # a channel not configured is not a medium
        (
            ("sms", "email"),
            {},
            OutreachSettings(channels={"email": "mail"}),
            ("send", "email", "pat@example.org"),
        ),
        (("sms",), {}, OutreachSettings(channels={}), ("skip", "no_channel")),
        (("sms", "email"), {}, OutreachSettings(enabled=False), ("skip", "disabled")),
    ],
)
def test_choosing_a_medium(
    prefer: tuple[str, ...], who: dict[str, Any], settings: OutreachSettings, want: tuple[str, ...]
) -> None:
    plan = plan_outreach(effect(*prefer), contact(**who), settings, ALL, NOON_ISH)
    if want[0] == "send":
        assert isinstance(plan, Send), plan
        assert (plan.medium, plan.endpoint) == want[1:]
        assert plan.channel == settings.channels[plan.medium]
        assert plan.format == f"outreach.{plan.medium}"
        assert plan.endpoint not in repr(plan)  # an address never reaches a log line
    else:
        assert isinstance(plan, Skip), plan
        assert plan.reason == want[1]


def test_a_medium_without_template_passes_to_the_next() -> None:
    only_email = Lookup(("remind", "en", "email"))
    plan = plan_outreach(effect("sms", "email"), contact(), SETTINGS, only_email, NOON_ISH)
    assert isinstance(plan, Send)
    assert plan.medium == "email"
    none = plan_outreach(effect("sms", "email"), contact(), SETTINGS, Lookup(), NOON_ISH)
    assert none == Skip("no_template", (("sms", "no_template"), ("email", "no_template")))


@pytest.mark.parametrize(
    ("language", "have", "want_language", "fallback"),
    [
        ("es", ("en", "es"), "es", False),
        ("es-MX", ("en", "es"), "es", False),
        ("es-MX", ("en", "es-mx", "es"), "es-mx", False),
        ("vi", ("en", "es"), "en", True),
        (None, ("en",), "en", False),
        ("EN", ("en",), "en", False),
    ],
)
def test_language(
    language: str | None, have: tuple[str, ...], want_language: str, fallback: bool
) -> None:
    lookup = Lookup(*(("remind", lang, "sms") for lang in have))
    plan = plan_outreach(effect("sms"), contact(language=language), SETTINGS, lookup, NOON_ISH)
    assert isinstance(plan, Send)
    assert (plan.language, plan.fallback) == (want_language, fallback)
    if fallback:
        assert plan.requested_language == "vi"


def test_no_template_in_any_acceptable_language() -> None:
    lookup = Lookup(("remind", "fr", "sms"))
    plan = plan_outreach(effect("sms"), contact(language="es"), SETTINGS, lookup, NOON_ISH)
    assert isinstance(plan, Skip)
    assert plan.reason == "no_template"


def test_language_candidates() -> None:
    assert language_candidates("es_MX") == ["es-mx", "es"]
    assert language_candidates("") == []


# ---- quiet hours ---------------------------------------------------------------------------


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone).astimezone(UTC)


@pytest.mark.parametrize(
    ("zone", "now", "until"),
    [
        # 22:30 New York → 08:00 the next morning, EST (UTC-5)
        ("America/New_York", at(NY, 2025, 1, 14, 22, 30), at(NY, 2025, 1, 15, 8, 0)),
        # 06:00 → 08:00 the same morning
        ("America/New_York", at(NY, 2025, 1, 15, 6, 0), at(NY, 2025, 1, 15, 8, 0)),
        # 08:00 exactly and 20:59 are outside
        ("America/New_York", at(NY, 2025, 1, 15, 8, 0), None),
        ("America/New_York", at(NY, 2025, 1, 15, 20, 59), None),
        ("America/New_York", at(NY, 2025, 1, 15, 21, 0), at(NY, 2025, 1, 16, 8, 0)),
        # the same instant: 10:00 in New York is 07:00 in Los Angeles, still quiet there
        ("America/Los_Angeles", at(NY, 2025, 1, 15, 10, 0), at(LA, 2025, 1, 15, 8, 0)),
        # spring forward (2025-03-09): a night of 10 hours wall time, 08:00 is EDT (UTC-4)
        (
            "America/New_York",
            at(NY, 2025, 3, 8, 23, 0),
            datetime(2025, 3, 9, 12, 0, tzinfo=UTC),
        ),
        (
            "America/Los_Angeles",
            at(LA, 2025, 3, 9, 1, 30),
            datetime(2025, 3, 9, 15, 0, tzinfo=UTC),
        ),
        # fall back (2025-11-02): 08:00 is EST (UTC-5) again
        (
            "America/New_York",
            at(NY, 2025, 11, 1, 22, 0),
            datetime(2025, 11, 2, 13, 0, tzinfo=UTC),
        ),
        # 01:30 happens twice in New York on 2025-11-02; both are quiet
        (
            "America/New_York",
            datetime(2025, 11, 2, 5, 30, tzinfo=UTC),
            datetime(2025, 11, 2, 13, 0, tzinfo=UTC),
        ),
        (
            "America/New_York",
            datetime(2025, 11, 2, 6, 30, tzinfo=UTC),
            datetime(2025, 11, 2, 13, 0, tzinfo=UTC),
        ),
    ],
)
def test_quiet_hours_in_the_patients_zone(zone: str, now: datetime, until: datetime | None) -> None:
    plan = plan_outreach(effect("sms"), contact(timezone=zone), SETTINGS, ALL, now)
    if until is None:
        assert isinstance(plan, Send)
    else:
        assert plan == Defer(until, "sms")
        assert until.tzinfo is UTC


def test_quiet_hours_default_zone_and_daytime_window() -> None:
    # No zone on the referral (or a bad one): the clinic's default.
    now = at(LA, 2025, 1, 15, 6, 0)  # 09:00 in New York
    for tz in (None, "Mars/Olympus"):
        plan = plan_outreach(effect("sms"), contact(timezone=tz), SETTINGS, ALL, now)
        assert isinstance(plan, Send)
    # A window that does not span midnight.
    lunch = OutreachSettings(quiet_start=time(12, 0), quiet_end=time(13, 0))
    assert quiet_until(at(NY, 2025, 1, 15, 12, 15), NY, lunch) == at(NY, 2025, 1, 15, 13, 0)
    assert quiet_until(at(NY, 2025, 1, 15, 13, 0), NY, lunch) is None
    none = OutreachSettings(quiet_start=time(0, 0), quiet_end=time(0, 0))
    assert quiet_until(at(NY, 2025, 1, 15, 3, 0), NY, none) is None


def test_quiet_end_inside_a_dst_gap_is_the_first_instant_after() -> None:
    odd = OutreachSettings(quiet_start=time(1, 0), quiet_end=time(2, 30))
    # 2025-03-09 02:30 does not exist in New York: the end is 03:30 EDT = 07:30 UTC.
    until = quiet_until(at(NY, 2025, 3, 9, 1, 15), NY, odd)
    assert until == datetime(2025, 3, 9, 7, 30, tzinfo=UTC)


def test_skip_comes_before_quiet_hours() -> None:
    night = at(NY, 2025, 1, 15, 23, 0)
    plan = plan_outreach(effect("sms"), contact(sms_consent=False), SETTINGS, ALL, night)
    assert plan == Skip("opted_out", (("sms", "opted_out"),))


# ---- the contact ---------------------------------------------------------------------------


def referral(fields: Mapping[str, Any], appointment: Mapping[str, Any] | None = None) -> Referral:
    data: dict[str, Mapping[str, Any]] = {"referral": dict(fields)}
    if appointment:
        data["appointment"] = dict(appointment)
    t = datetime(2025, 3, 3, tzinfo=UTC)
    return Referral("r1", State.SENT, 2, t, t, data=data)


def test_contact_from_the_projection_and_preferences_over_it() -> None:
    r = referral(
        {
            "patient.phone": "(555) 555-0100",
            "patient.email": "pat@example.org",
            "patient.language": "es",
            "patient.timezone": "America/Chicago",
            "patient.contact_preference": "SMS",
            "patient.consent.sms": "yes",
            "patient.consent.email": "no",
            "patient.name": {"family": "Garza", "given": "Ana María"},
        }
    )
    c = Contact.of(r)
    assert c == Contact(
        phone="+15555550100",
        email="pat@example.org",
        language="es",
        timezone="America/Chicago",
        preference="sms",
        sms_consent=True,
        email_consent=False,
        first_name="Ana",
    )
    stopped = Contact.of(r, Preferences(sms_consent=False, email_consent=True, language="en"))
    assert (stopped.sms_consent, stopped.email_consent, stopped.language) == (False, True, "en")
    # a preference left unsaid keeps the order's value
    assert Contact.of(r, Preferences()).sms_consent is True
    assert Contact.of(referral({})) == Contact()
    assert Contact.of(referral({"patient.email": "not an address"})).email is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("(555) 555-0100", "+15555550100"),
        ("1-555-555-0100", "+15555550100"),
        ("+1 555 555 0100", "+15555550100"),
        ("555.555.0100 x12", "+15555550100"),
        ("+44 20 7946 0958", "+442079460958"),
        ("0044 20 7946 0958", "+442079460958"),
        ("555-0100", None),
        ("", None),
        ("n/a", None),
        ("+0123456789", None),
    ],
)
def test_normalise_phone(raw: str, want: str | None) -> None:
    assert normalise_phone(raw) == want


def test_settings_from_config() -> None:
    s = OutreachSettings.of(OutreachConfig(quiet_start="22:15", sms_channel="twilio"), ["twilio"])
    assert s.channels == {"sms": "twilio"}  # no [channels.email]: no e-mail
    assert s.quiet_start == time(22, 15)
    assert s.sms_assume_consent is False
    assert OutreachSettings.of(OutreachConfig()).channels == {"sms": "sms", "email": "email"}


# ---- templates -----------------------------------------------------------------------------


def shipped() -> Templates:
    return Templates.load(TEMPLATES)


def test_every_template_the_shipped_policy_names_exists_in_en_and_es() -> None:
    policy = load_policy(MAPPINGS)
    named = {s.template for ladder in policy.ladders for s in ladder.steps if s.template}
    assert "appointment_reminder" in named
    templates = shipped()
    for name in named:
        for language in ("en", "es"):
            for medium in ("sms", "email"):
                assert templates.has(name, language, medium), (name, language, medium)


LONG = {
    "first_name": "Maximiliano Alejandro",
    "specialty": "pediatric gastroenterology",
    "specialist_name": "Northside Pediatric Gastroenterology & Hepatology Associates",
    "specialist_phone": "+1 (555) 010-0199 ext. 4411",
    "appointment_at": "miércoles 24 de septiembre, 10:30 a. m.",
    "sender": "Riverside Family Medicine",
}


@pytest.mark.parametrize("language", ["en", "es"])
def test_shipped_texts_are_short_and_say_how_to_stop(language: str) -> None:
    templates = shipped()
    word = {"en": "Reply STOP to opt out", "es": "Responda ALTO"}[language]
    for name in sorted(templates.names()):
        for ctx in (LONG, {}):
            body = templates.render(name, language, "sms", ctx).body
            assert len(body) <= SMS_LIMIT, (name, len(body))
            assert word in body
            assert "{" not in body
            assert "  " not in body


def test_rendered_messages_in_both_languages() -> None:
    templates = shipped()
    r = referral(
        {
            "patient.name": {"given": "Ana"},
            "patient.timezone": "America/Los_Angeles",
            "specialty": "cardiology",
            "recipient.organization": "Heart Clinic",
        },
        {"start": "2025-03-11T17:30:00+00:00"},
    )
    en = message_context(r.data, language="en", sender="Riverside")
    assert en["appointment_at"] == "Tuesday, March 11, 10:30 AM"  # PDT
    es = message_context(r.data, language="es", sender="Riverside")
    assert es["appointment_at"] == "martes 11 de marzo, 10:30 a. m."
    sms = templates.render("appointment_reminder", "en", "sms", en).body
    assert sms.startswith("Hi Ana, this is Riverside.")
    assert "Heart Clinic on Tuesday, March 11, 10:30 AM" in sms
    mail = templates.render("appointment_reminder", "es", "email", es)
    assert mail.subject == "Recordatorio de cita"
    assert mail.body.startswith("Estimado/a Ana:\n\n")
    assert "martes 11 de marzo, 10:30 a. m." in mail.body
    assert "de cardiology" in mail.body
    # nothing known about the patient: still a message, no blanks
    bare = templates.render("schedule_reminder", "es", "sms", {"sender": "Riverside"}).body
    assert bare.startswith("Hola, le escribe Riverside.")


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


def test_template_problems_are_file_line_errors(tmp_path: Path) -> None:
    write(tmp_path, "ok.en.sms.j2", "Hi {{ first_name }}. Reply STOP to opt out.\n")
    write(tmp_path, "syntax.en.sms.j2", "line one\n{% if first_name %}\nno end\n")
    write(tmp_path, "undefined.en.sms.j2", "Hello\n{{ diagnosis }} Reply STOP\n")
    write(tmp_path, "long.en.sms.j2", "x" * 400 + " STOP\n")
    write(tmp_path, "nostop.es.sms.j2", "Hola {{ first_name }}\n")
    write(tmp_path, "nosubject.en.email.j2", "Hello\n\nbody\n")
    write(tmp_path, "badname.sms.j2", "x\n")
    write(tmp_path, "escape.en.sms.j2", "{{ ''.__class__.__mro__ }} STOP\n")
    with pytest.raises(TemplateError) as caught:
        Templates.load(tmp_path)
    errors = "\n".join(caught.value.errors)
    assert f"{tmp_path}/syntax.en.sms.j2:2: Unexpected end of template" in errors
    assert f"{tmp_path}/undefined.en.sms.j2:2: 'diagnosis' is undefined" in errors
    assert "long.en.sms.j2:1: a text renders to 405 characters" in errors
    assert "nostop.es.sms.j2:1: a text must tell how to opt out ('ALTO')" in errors
    assert "nosubject.en.email.j2:1: an e-mail template starts with a `Subject:" in errors
    assert "badname.sms.j2:1: a template is named" in errors
    assert "escape.en.sms.j2:1: access to attribute '__class__'" in errors  # the sandbox
    assert "ok.en.sms.j2" not in errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="no such templates directory"):
        Templates.load(tmp_path / "nope")


def test_missing_templates_name_the_step() -> None:
    policy = load_policy(MAPPINGS)
    assert missing_templates(policy, shipped(), SETTINGS) == []
    only_sms = Lookup(*((t, "en", "sms") for t in shipped().names()))
    problems = missing_templates(policy, only_sms, SETTINGS)
    assert problems
    assert all(": outreach template " in p and "en email version" in p for p in problems)
    assert problems[0].startswith(f"{MAPPINGS}/policies/default.yaml:")
