"""The outreach renderers: the shipped templates in English and Spanish, short texts with
the opt-out words, e-mail subjects, the errors an operator can act on, and a spawned
render process that finds its templates through the route options alone."""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.domain.referral import Event, State
from engine.outbound.model import (
    PacketContext,
    Party,
    ReferralView,
    RenderError,
    Specialist,
    TriggerEvent,
)
from engine.outbound.packets import outreach
from engine.outbound.packets.outreach import SMS_LIMIT, render_email, render_sms
from engine.outbound.packets.registry import FORMATS, renderers
from engine.services.dispatcher import render_named

TEMPLATES = Path(__file__).resolve().parents[2] / "mappings" / "policies" / "templates"
T = datetime(2025, 3, 10, 15, 0, tzinfo=UTC)
DATA: Mapping[str, Mapping[str, Any]] = {
    "referral": {
        "patient.name": {"family": "Rivera", "given": "Lucía"},
        "patient.phone": "+15555550123",
        "patient.email": "lucia@example.org",
        "patient.timezone": "America/Chicago",
        "specialty": "orthopedics",
        "recipient.organization": "Lakeside Orthopedics",
        "diagnosis": {"code": "M17.11", "display": "Primary osteoarthritis, right knee"},
    },
    "appointment": {"start": "2025-03-13T14:15:00+00:00", "appointment_id": {"value": "A1"}},
}


def ctx(
    template: str = "appointment_reminder",
    language: str = "en",
    *,
    options: Mapping[str, str] | None = None,
    data: Mapping[str, Mapping[str, Any]] = DATA,
    recipient: Specialist | None = None,
    fields: Mapping[str, Any] | None = None,
) -> PacketContext:
    event_fields = (
        dict(fields)
        if fields is not None
        else {"outreach.template": template, "outreach.language": language, "actor": "refloop"}
    )
    return PacketContext(
        delivery_id=7,
        idempotency_key="k-1",
        control_id="c1",
        now=T,
        referral=ReferralView("r1", State.SCHEDULED, T, T, data),
        event=TriggerEvent("e1", Event.OUTREACH_PLANNED, event_fields, T, 5, None, None),
        sender=Party(),
        receiver=Party(),
        recipient=recipient,
        options=dict(options if options is not None else {"templates_dir": str(TEMPLATES)}),
    )


def test_registered() -> None:
    assert {"outreach.sms", "outreach.email"} <= FORMATS
    assert renderers()["outreach.sms"] is render_sms


def test_sms_in_english() -> None:
    out = render_sms(ctx(options={"templates_dir": str(TEMPLATES), "sender_name": "Riverside"}))
    assert out.content_type == "text/plain"
    assert out.metadata == {}
    text = out.payload.decode()
    assert text == (
        "Hi Lucía, this is Riverside. Reminder: you have an appointment with Lakeside "
        "Orthopedics on Thursday, March 13, 9:15 AM. To change it, call their office. "
        "Reply STOP to opt out."
    )  # 14:15 UTC is 09:15 in Chicago (CDT since March 9)


def test_sms_in_spanish_names_the_directory_specialist() -> None:
    clinic = Specialist(id="ortho-1", name="Clínica Ortopédica del Lago", targets=())
    options = {"templates_dir": str(TEMPLATES), "specialist_phone": "(555) 010-0142"}
    out = render_sms(ctx(language="es", options=options, recipient=clinic))
    text = out.payload.decode()
    assert "jueves 13 de marzo, 9:15 a. m." in text
    assert "Clínica Ortopédica del Lago" in text
    assert "llame al (555) 010-0142" in text
    assert text.endswith("Responda ALTO para no recibir más mensajes.")


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize(
    "template",
    [
        "schedule_reminder",
        "schedule_reminder_final",
        "schedule_reminder_urgent",
        "no_show_reengage",
        "rebook_reminder",
        "appointment_reminder",
    ],
)
def test_every_text_is_short_safe_and_stoppable(template: str, language: str) -> None:
    text = render_sms(ctx(template, language)).payload.decode()
    assert len(text) <= SMS_LIMIT
    assert ("Reply STOP to opt out" if language == "en" else "Responda ALTO") in text
    # minimum necessary: no diagnosis, no contact details of the patient
    for secret in ("M17", "osteoarthritis", "+15555550123", "lucia@example.org", "Rivera"):
        assert secret not in text
    mail = render_email(ctx(template, language))
    assert mail.metadata["subject"]
    assert "M17" not in mail.payload.decode()


def test_email_has_subject_and_inline_body() -> None:
    out = render_email(ctx(language="es", options={"templates_dir": str(TEMPLATES)}))
    assert out.content_type == "text/plain"
    assert out.metadata["subject"] == "Recordatorio de cita"
    assert out.metadata["inline"] == "true"
    body = out.payload.decode()
    assert body.startswith("Estimado/a Lucía:\n\nLe recordamos su cita del jueves 13 de marzo")
    assert body.endswith("your care team\n")


def test_missing_event_fields_and_templates_are_render_errors(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"no outreach\.template"):
        render_sms(ctx(fields={"outreach.language": "en"}))
    with pytest.raises(RenderError, match=r"no outreach\.language"):
        render_sms(ctx(fields={"outreach.template": "appointment_reminder"}))
    with pytest.raises(RenderError, match=r"no outreach template nope\.en\.sms\.j2"):
        render_sms(ctx("nope"))
    with pytest.raises(RenderError, match="no outreach templates_dir"):
        render_sms(ctx(options={}))
    with pytest.raises(RenderError, match="do not load"):
        render_sms(ctx(options={"templates_dir": str(tmp_path / "missing")}))


def test_an_edited_template_is_reloaded_and_a_broken_one_refused(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    shutil.copytree(TEMPLATES, folder)
    options = {"templates_dir": str(folder)}
    assert "Reminder:" in render_sms(ctx(options=options)).payload.decode()
    path = folder / "appointment_reminder.en.sms.j2"
    path.write_text("See you soon, {{ first_name }}! Reply STOP to opt out.\n", encoding="utf-8")
    assert (
        render_sms(ctx(options=options)).payload
        == b"See you soon, Luc\xc3\xada! Reply STOP to opt out."
    )
    path.write_text("{{ first_name }\n", encoding="utf-8")
    with pytest.raises(RenderError, match=r"appointment_reminder\.en\.sms\.j2:1:"):
        render_sms(ctx(options=options))


def test_configure_sets_the_in_process_default(tmp_path: Path) -> None:
    outreach.configure(TEMPLATES, sender_name="Lakeside Family Practice")
    try:
        text = render_sms(ctx(options={})).payload.decode()
        assert "this is Lakeside Family Practice." in text
    finally:
        outreach.configure("")


def test_a_spawned_render_process_reads_the_route_options() -> None:
    # The dispatcher renders in spawned processes: nothing configured in this one
    # reaches them, so the options must carry the folder.
    outreach.configure("")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        options = {"templates_dir": str(TEMPLATES), "sender_name": "Riverside"}
        out = pool.submit(render_named, "outreach.sms", ctx(language="es", options=options))
        text = out.result(timeout=60).payload.decode()
    assert text.startswith("Hola, Lucía, le escribe Riverside.")
