"""The human-readable packet: HTML for e-mail, PDF for fax.

PDF text is read back by inflating the page streams (fpdf2 compresses them), so the
bytes tested are the bytes a fax gateway gets.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
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
from engine.outbound.packets.document import (
    FOOTER,
    RENDERERS,
    latin1,
    layout,
    render_html,
    render_pdf,
)
from tests import loop_messages as lm

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
RID = "8d3f1c52-0000-4000-8000-000000000001"
MARKER = "ZZMARKERNAME"
SPECIALIST = Specialist(id="cardio-1", name="Cardiology Associates", targets=(), npi="1234567893")
ORDER = "\r".join(
    [
        lm.orm("ORD7", "PO7", mrn="100007").decode(),
        "DG1|1||R07.9^Chest pain, unspecified^I10||20261120|F",
    ]
)

REFERRAL: dict[str, Any] = {
    "correlate.placer_order": {"value": "PO7", "namespace": "ACME"},
    "patient.identifier": {"value": "100007", "namespace": "ACME", "type": "MR"},
    "patient.name": {"family": MARKER, "given": "BRAVO", "middle": "Q"},
    "patient.birth_date": "1975-05-05",
    "patient.sex": "male",
    "service": {"code": "REFCARD", "display": "Referral", "system": "L"},
    "specialty": "cardiology",
    "priority": "stat",
    "requested_at": "2026-11-20T10:12:00-06:00",
    "requester.name": {"family": "WELBY", "given": "MARCUS"},
    "requester.identifier": {"value": "1111111111", "namespace": "NPI"},
    "requester.organization": "ACME Family Medicine",
    "diagnosis": {"code": "I10", "display": "Essential hypertension", "system": "I10"},
    "reason": "Chest pain on exertion",
    "note": "Please see within 2 weeks.\nBring prior ECGs.",
    "insurance.payer": "Acme Health Plan",
    "insurance.plan": "Gold PPO",
    "insurance.member_id": {"value": "M123", "namespace": "AHP"},
}
APPOINTMENT = {
    "appointment_id": {"value": "FA-PO7", "namespace": "CLINIC"},
    "status": "booked",
    "start": "2026-12-01T14:00:00-06:00",
    "end": "2026-12-01T14:30:00-06:00",
    "location": "Heart Center, Suite 4",
}


def make_ctx(
    referral: Mapping[str, Any] | None = None,
    *,
    appointment: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
    now: datetime = NOW,
    sources: Mapping[str, str] | None = None,
    recipient: Specialist | None = SPECIALIST,
) -> PacketContext:
    data: dict[str, Mapping[str, Any]] = {"referral": REFERRAL if referral is None else referral}
    if appointment:
        data["appointment"] = appointment
    view = ReferralView(RID, State.SCHEDULED, NOW - timedelta(days=10), NOW, data)
    trigger = TriggerEvent("ev-1", Event.REFERRAL_CREATED, {}, NOW, 1, None, State.CREATED)
    return PacketContext(
        delivery_id=1,
        idempotency_key="key-1",
        control_id="C1",
        now=now,
        referral=view,
        event=trigger,
        sender=Party(facility="ACME_MAIN"),
        receiver=Party(),
        recipient=recipient,
        sources={"order": ORDER} if sources is None else sources,
        options=options or {},
    )


def pdf_text(payload: bytes) -> bytes:
    """Every page and resource stream, inflated where compressed."""
    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", payload, re.S):
        try:
            out.append(zlib.decompress(m.group(1)))
        except zlib.error:
            out.append(m.group(1))
    return b"\n".join(out)


def pdf_string(text: str) -> bytes:
    """How fpdf2 writes ``text`` in a content stream: Latin-1, ``\\ ( )`` escaped."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f"({escaped})".encode("latin-1")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def test_both_formats_are_registered() -> None:
    assert {"document.html": render_html, "document.pdf": render_pdf} == RENDERERS


# -- what the packet says --------------------------------------------------------------


def test_layout_has_every_part_of_the_referral() -> None:
    page = layout(make_ctx(appointment=APPOINTMENT))
    assert page.organisation == "ACME Family Medicine"
    numbers = dict(page.numbers)
    assert numbers["Referral"] == RID
    assert numbers["Placer order"] == "PO7 (ACME)"
    assert numbers["Requested"] == "2026-11-20 10:12 (UTC-06:00)"
    sections = {s.title: dict(s.rows) for s in page.sections}
    assert list(sections) == [
        "Patient",
        "Insurance",
        "Referral",
        "Referring provider",
        "Referred to",
        "Appointment",
        "Notes",
    ]
    assert sections["Patient"] == {
        "Name": f"{MARKER}, BRAVO Q",
        "Date of birth": "1975-05-05",
        "Sex": "Male",
        "Patient ID": "100007 (ACME, MR)",
    }
    assert sections["Insurance"] == {
        "Payer": "Acme Health Plan",
        "Plan": "Gold PPO",
        "Member ID": "M123 (AHP)",
    }
    assert sections["Referral"]["Priority"] == "STAT"
    assert sections["Referral"]["Service"] == "Referral (L REFCARD)"
    assert sections["Referral"]["Reason"] == "Chest pain on exertion"
    # the canonical diagnosis, then the order's DG1
    assert sections["Referral"]["Diagnoses"] == (
        "Essential hypertension (I10 I10)\nChest pain, unspecified (I10 R07.9)"
    )
    assert sections["Referring provider"]["Name"] == "WELBY, MARCUS"
    assert sections["Referred to"] == {"Practice": "Cardiology Associates", "NPI": "1234567893"}
    assert sections["Appointment"]["Starts"] == "2026-12-01 14:00 (UTC-06:00)"
    assert sections["Appointment"]["Location"] == "Heart Center, Suite 4"
    assert page.sections[-1].text == "Please see within 2 weeks.\nBring prior ECGs."


def test_sections_with_nothing_known_are_left_out() -> None:
    minimal = {"patient.identifier": {"value": "100007", "namespace": "ACME"}}
    page = layout(make_ctx(minimal, sources={}, recipient=None))
    assert [s.title for s in page.sections] == ["Patient"]
    assert page.organisation == "ACME_MAIN"  # our facility when the order names none
    assert page.subject == "Referral 8d3f1c52"


def test_a_patient_with_neither_name_nor_identifier_is_a_render_error() -> None:
    referral = {k: v for k, v in REFERRAL.items() if not k.startswith("patient.")}
    for render in (render_html, render_pdf):
        with pytest.raises(RenderError, match=r"patient\.name and patient\.identifier"):
            render(make_ctx(referral))


@pytest.mark.parametrize("render", [render_html, render_pdf])
def test_metadata_names_the_order_never_the_patient(render: Any) -> None:
    rendered = render(make_ctx())
    ext = "html" if render is render_html else "pdf"
    assert rendered.metadata == {"filename": f"referral-8d3f1c52.{ext}", "subject": "Referral PO7"}
    without_placer = {k: v for k, v in REFERRAL.items() if k != "correlate.placer_order"}
    assert render(make_ctx(without_placer)).metadata["subject"] == "Referral 8d3f1c52"
    for value in rendered.metadata.values():
        assert MARKER not in value
        assert "100007" not in value


# -- HTML ------------------------------------------------------------------------------


def test_html_is_one_self_contained_page() -> None:
    rendered = render_html(make_ctx(appointment=APPOINTMENT))
    assert rendered.content_type == "text/html"
    page = rendered.payload.decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    found = tags(page)
    names = [t for t, _ in found]
    for banned in ("script", "img", "link", "iframe", "object", "embed"):
        assert banned not in names
    assert not [a for _, a in found if {"src", "href"} & set(a)]
    assert "url(" not in page
    assert "@import" not in page
    assert ("meta", {"charset": "utf-8"}) in found
    assert "ACME Family Medicine" in page
    assert f"<footer>{FOOTER}</footer>" in page
    assert "<title>Referral PO7</title>" in page
    assert "PO7 (ACME)" in page
    assert f"{MARKER}, BRAVO Q" in page
    assert "Heart Center, Suite 4" in page


def test_html_escapes_every_value() -> None:
    hostile = "<script>alert(1)</script>"
    referral = {
        **REFERRAL,
        "patient.name": {"family": hostile, "given": 'A"B'},
        "note": "x < y & <b>bold</b>",
        "requester.organization": "<img src=x onerror=alert(1)>",
        "correlate.placer_order": {"value": "P<1>", "namespace": "ACME"},
    }
    page = render_html(make_ctx(referral)).payload.decode("utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, A&quot;B" in page
    assert "x &lt; y &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<img" not in page
    assert "<title>Referral P&lt;1&gt;</title>" in page
    assert not [t for t, _ in tags(page) if t in ("script", "img", "b")]


def test_html_keeps_non_latin_text_exactly() -> None:
    referral = {**REFERRAL, "patient.name": {"family": "Łukasiewicz-Őry", "given": "Zoë 李"}}
    page = render_html(make_ctx(referral)).payload.decode("utf-8")
    assert "Łukasiewicz-Őry, Zoë 李" in page


# -- PDF -------------------------------------------------------------------------------


def test_pdf_is_a_deterministic_pdf_with_the_placer_number() -> None:
    ctx = make_ctx(appointment=APPOINTMENT)
    first = render_pdf(ctx)
    assert first.content_type == "application/pdf"
    assert first.payload.startswith(b"%PDF-")
    assert first.payload.rstrip().endswith(b"%%EOF")
    assert render_pdf(ctx).payload == first.payload
    text = pdf_text(first.payload)
    assert pdf_string("PO7 (ACME)") in text
    assert pdf_string("Cardiology Associates") in text
    assert pdf_string("ACME Family Medicine") in text
    assert FOOTER.encode() in text
    assert b"/CreationDate (D:20261203090000Z" in first.payload
    later = render_pdf(make_ctx(appointment=APPOINTMENT, now=NOW + timedelta(hours=1)))
    assert later.payload != first.payload
    assert b"/CreationDate (D:20261203100000Z" in later.payload


def test_pdf_info_carries_no_phi() -> None:
    payload = render_pdf(make_ctx()).payload
    info = re.search(rb"/Title \(([^)]*)\)", payload)
    assert info is not None
    assert info.group(1) == b"Referral PO7"
    subject = re.search(rb"/Subject \(([^)]*)\)", payload)
    assert subject is not None
    assert subject.group(1) == b"Referral PO7"
    trailer = payload[payload.rindex(b"trailer") :]
    assert MARKER.encode() not in trailer


@pytest.mark.parametrize(
    ("option", "media_box"),
    [
        (None, b"/MediaBox [0 0 612.00 792.00]"),
        ("Letter", b"/MediaBox [0 0 612.00 792.00]"),
        ("a4", b"/MediaBox [0 0 595.28 841.89]"),
        ("A4", b"/MediaBox [0 0 595.28 841.89]"),
    ],
)
def test_pdf_page_size_is_a_route_option(option: str | None, media_box: bytes) -> None:
    ctx = make_ctx(options={"page": option} if option else None)
    assert media_box in render_pdf(ctx).payload


def test_an_unknown_page_size_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=r"options\.page"):
        render_pdf(make_ctx(options={"page": "Legal"}))


def test_pdf_survives_a_non_latin_name() -> None:
    name = {"family": "Łukasiewicz-Őry", "given": "Zoë 李 “Zee”"}
    payload = render_pdf(make_ctx({**REFERRAL, "patient.name": name})).payload
    assert payload.startswith(b"%PDF-")
    assert pdf_string('Lukasiewicz-Ory, Zoë ? "Zee"') in pdf_text(payload)


def test_a_long_note_flows_onto_more_pages() -> None:
    note = "\n".join(f"Line {n} of a long clinical note." for n in range(200))
    payload = render_pdf(make_ctx({**REFERRAL, "note": note})).payload
    pages = re.search(rb"/Count (\d+)", payload)
    assert pages is not None
    assert int(pages.group(1)) >= 3
    text = pdf_text(payload)
    assert pdf_string("Line 199 of a long clinical note.") in text
    assert text.count(FOOTER.encode()) == int(pages.group(1))  # a footer on every page


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Zoë Müller", "Zoë Müller"),  # Latin-1 is kept
        ("Łódź", "Lódz"),  # ó is Latin-1
        ("Őry Ţăran", "Ory Taran"),
        ("Œuvre \u2013 “quoted” … €5", 'OEuvre - "quoted" ... EUR5'),  # en dash
        ("李 Ωmega", "? ?mega"),
        ("ﬁne", "fine"),  # NFKD ligature
        ("tab\there\rcr\nlf", "tab here cr\nlf"),
        ("", ""),
    ],
)
def test_text_outside_latin1_is_transliterated(text: str, expected: str) -> None:
    assert latin1(text) == expected
    latin1(text).encode("latin-1")


def test_a_note_request_notice_says_what_is_asked() -> None:
    from dataclasses import replace

    ctx = make_ctx()
    notice = TriggerEvent(
        "ev-9",
        Event.REFERRAL_ESCALATED,
        {"escalation.reason": "note_overdue", "escalation.notify": "specialist"},
        NOW,
        9,
        State.COMPLETED,
        State.COMPLETED,
    )
    page = layout(replace(ctx, event=notice))
    assert page.title == "Consult note requested"
    assert page.subject.startswith("Note request ")
    assert page.sections[0].title == "Request"
    assert "note overdue" in page.sections[0].text
    assert layout(ctx).title == "Patient referral"
