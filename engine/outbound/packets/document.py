"""The human-readable referral packet, as HTML (e-mail) and PDF (fax, e-mail attachment).

Theory of operation
-------------------
:func:`layout` reads the referral once into a :class:`Layout` — a header, numbered
references, sections of (label, value) rows and the notes — and both renderers draw
that same layout, so the HTML and the PDF never disagree on what a packet says.

* HTML (``document.html``) is one self-contained page: inline CSS, no scripts, images or
  links to fetch (a Content-Security-Policy says so to any mail client that listens),
  and every value HTML-escaped.
* PDF (``document.pdf``) uses fpdf2 with its core Helvetica font so the output does not
  depend on fonts installed on the host. Core fonts are Latin-1 only: characters outside
  it are transliterated to their Latin base letter where one exists (``Ł`` → ``L``,
  ``ő`` → ``o``, curly quotes and dashes to ASCII) and otherwise shown as ``?`` — the
  HTML keeps the exact text. The page size is route option ``page`` (``Letter``, the
  default, or ``A4``). The creation date is ``ctx.now`` and fpdf2 derives the file id
  from the content, so the same context gives the same bytes.

Metadata (``filename``, ``subject``) never carries PHI: the subject names the placer
order number (or the referral's short id), never the patient.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from string import Template
from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace

from engine.domain.referral import Event
from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.outbound.packets import Renderer
from engine.outbound.packets.hl7source import diagnoses

HTML = "text/html"
PDF = "application/pdf"
FOOTER = "Confidential: contains protected health information"
PAGES = {"letter": "Letter", "a4": "A4"}
_PRIORITY = {"routine": "Routine", "urgent": "Urgent", "asap": "ASAP", "stat": "STAT"}
_SEX = {"female": "Female", "male": "Male", "other": "Other", "unknown": "Unknown"}

Row = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    rows: tuple[Row, ...] = ()
    text: str = ""  # free text (notes), line breaks kept


@dataclass(frozen=True, slots=True)
class Layout:
    organisation: str  # who refers: the header
    title: str
    numbers: tuple[Row, ...]  # referral, placer and filler numbers, date requested
    sections: tuple[Section, ...]
    subject: str  # no PHI: also the HTML title and the PDF's title
    filename_stem: str


# -- reading the referral --------------------------------------------------------------


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _name(value: Any) -> str:
    """``Family, Given Middle``, as a chart lists a person."""
    if not isinstance(value, Mapping):
        return ""
    family = _text(value.get("family"))
    given = " ".join(p for p in (_text(value.get("given")), _text(value.get("middle"))) if p)
    return ", ".join(p for p in (family, given) if p)


def _identifier(value: Any) -> str:
    if not isinstance(value, Mapping) or not _text(value.get("value")):
        return ""
    qualifiers = [q for q in (_text(value.get("namespace")), _text(value.get("type"))) if q]
    number = _text(value.get("value"))
    return f"{number} ({', '.join(qualifiers)})" if qualifiers else number


def _coding(value: Any) -> str:
    if not isinstance(value, Mapping):
        return ""
    code, display, system = (_text(value.get(k)) for k in ("code", "display", "system"))
    qualifier = " ".join(p for p in (system, code) if p)
    if display and qualifier:
        return f"{display} ({qualifier})"
    return display or qualifier


def _when(value: Any) -> str:
    """``2026-12-01 14:00 (UTC-06:00)``; a value that is not ISO 8601 is shown as sent."""
    text = _text(value)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if "T" not in text:
        return moment.date().isoformat()
    shown = moment.strftime("%Y-%m-%d %H:%M")
    offset = moment.strftime("%z")
    return f"{shown} (UTC{offset[:3]}:{offset[3:]})" if offset else shown


def _rows(*pairs: tuple[str, str]) -> tuple[Row, ...]:
    return tuple((label, value) for label, value in pairs if value)


def layout(ctx: PacketContext) -> Layout:
    """What the packet says, in reading order (pure)."""
    data = ctx.referral.data
    f: Mapping[str, Any] = data.get("referral", {})
    appt: Mapping[str, Any] = data.get("appointment", {})
    auth: Mapping[str, Any] = data.get("authorization", {})
    patient_name = _name(f.get("patient.name"))
    patient_id = _identifier(f.get("patient.identifier"))
    if not patient_name and not patient_id:
        raise RenderError("patient.name and patient.identifier are missing")

    short = ctx.referral.id.split("-")[0][:8] or ctx.referral.id[:8]
    placer = f.get("correlate.placer_order")
    placer_number = _text(placer.get("value")) if isinstance(placer, Mapping) else ""
    referral_number = f.get("correlate.referral_id")

    def field(name: str) -> Any:
        return f.get(name) or auth.get(name)

    recipient = ctx.recipient
    sections = [
        Section(
            "Patient",
            _rows(
                ("Name", patient_name),
                ("Date of birth", _when(f.get("patient.birth_date"))),
                ("Sex", _SEX.get(_text(f.get("patient.sex")), _text(f.get("patient.sex")))),
                ("Patient ID", patient_id),
            ),
        ),
        Section(
            "Insurance",
            _rows(
                ("Payer", _text(f.get("insurance.payer")) or _text(field("authorization.payer"))),
                ("Plan", _text(f.get("insurance.plan"))),
                ("Member ID", _identifier(f.get("insurance.member_id"))),
                ("Authorization", _identifier(field("authorization.identifier"))),
                ("Authorization status", _text(auth.get("authorization.status"))),
            ),
        ),
        Section(
            "Referral",
            _rows(
                ("Priority", _PRIORITY.get(_text(f.get("priority")), _text(f.get("priority")))),
                ("Service", _coding(f.get("service"))),
                ("Specialty", _text(f.get("specialty"))),
                ("Referral type", _text(f.get("referral_type"))),
                ("Category", _text(f.get("category"))),
                ("Reason", _text(f.get("reason"))),
                ("Reason code", _coding(f.get("reason_code"))),
                ("Diagnoses", "\n".join(_coding(dx) for dx in diagnoses(ctx))),
                ("Respond by", _when(f.get("due_by"))),
            ),
        ),
        Section(
            "Referring provider",
            _rows(
                ("Name", _name(f.get("requester.name"))),
                ("Provider ID", _identifier(f.get("requester.identifier"))),
                ("Organisation", _text(f.get("requester.organization"))),
            ),
        ),
        Section(
            "Referred to",
            _rows(
                (
                    "Practice",
                    recipient.name if recipient else _text(f.get("recipient.organization")),
                ),
                ("NPI", recipient.npi if recipient else ""),
                ("Specialist", _name(f.get("recipient.name"))),
                ("Provider ID", _identifier(f.get("recipient.identifier"))),
            ),
        ),
        Section(
            "Appointment",
            _rows(
                ("Starts", _when(appt.get("start"))),
                ("Ends", _when(appt.get("end"))),
                ("Status", _text(appt.get("status"))),
                ("Service", _coding(appt.get("service"))),
                ("Location", _text(appt.get("location"))),
                ("With", _name(appt.get("provider.name"))),
                ("Appointment ID", _identifier(appt.get("appointment_id"))),
            ),
        ),
        Section("Notes", text=_text(f.get("note"))),
    ]
    numbers = _rows(
        ("Referral", ctx.referral.id),
        ("Placer order", _identifier(placer)),
        ("Filler order", _identifier(f.get("correlate.filler_order"))),
        ("Referral number", _identifier(referral_number)),
        ("Requested", _when(f.get("requested_at"))),
    )
    # A policy notice (the note_request route): the same referral, asking for the note.
    notice = ctx.event.type is Event.REFERRAL_ESCALATED
    if notice:
        why = _text(ctx.event.fields.get("escalation.reason")) or "overdue"
        sections.insert(
            0,
            Section(
                "Request",
                text="The consult note for this referral has not been received "
                f"({why.replace('_', ' ')}). Please send it back to the referring practice.",
            ),
        )
    return Layout(
        organisation=_text(f.get("requester.organization")) or ctx.sender.facility,
        title="Consult note requested" if notice else "Patient referral",
        numbers=numbers,
        sections=tuple(s for s in sections if s.rows or s.text),
        subject=f"{'Note request' if notice else 'Referral'} {placer_number or short}",
        filename_stem=f"referral-{short}",
    )


# -- HTML ------------------------------------------------------------------------------

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$subject</title>
<style>
body { font-family: Helvetica, Arial, sans-serif; color: #111; margin: 2em auto; max-width: 46em; }
header { border-bottom: 2px solid #333; margin-bottom: 1em; }
.org { font-size: 1.2em; font-weight: bold; }
h1 { font-size: 1.5em; margin: .3em 0; }
h2 { font-size: 1.1em; background: #eee; padding: .2em .4em; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; vertical-align: top; width: 12em; padding: .15em .4em; font-weight: 600; }
td { vertical-align: top; padding: .15em .4em; white-space: pre-wrap; }
.notes { white-space: pre-wrap; padding: 0 .4em; }
footer { border-top: 1px solid #999; margin-top: 2em; padding-top: .4em; font-size: .85em; }
</style>
</head>
<body>
<header>
<div class="org">$organisation</div>
<h1>$title</h1>
$numbers
</header>
<main>
$sections
</main>
<footer>$footer</footer>
</body>
</html>
"""
)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _table(rows: tuple[Row, ...]) -> str:
    cells = "".join(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in rows)
    return f"<table>{cells}</table>"


def render_html(ctx: PacketContext) -> Rendered:
    """``document.html``: the packet as one self-contained HTML page."""
    page = layout(ctx)
    parts = []
    for section in page.sections:
        body = _table(section.rows) if section.rows else ""
        if section.text:
            body += f'<div class="notes">{_e(section.text)}</div>'
        parts.append(f"<section><h2>{_e(section.title)}</h2>{body}</section>")
    text = _PAGE.substitute(
        subject=_e(page.subject),
        organisation=_e(page.organisation),
        title=_e(page.title),
        numbers=_table(page.numbers),
        sections="\n".join(parts),
        footer=_e(FOOTER),
    )
    return Rendered(
        payload=text.encode("utf-8"),
        content_type=HTML,
        metadata={"filename": f"{page.filename_stem}.html", "subject": page.subject},
    )


# -- PDF -------------------------------------------------------------------------------

# Letters with no Latin-1 decomposition, and typography, by code point (the characters
# themselves look like ASCII ones in the source).
_ASCII_FOR = str.maketrans(
    {
        "\u0141": "L",  # Ł
        "\u0142": "l",
        "\u0110": "D",  # Đ
        "\u0111": "d",
        "\u0126": "H",  # Ħ
        "\u0127": "h",
        "\u0131": "i",  # dotless i
        "\u0152": "OE",
        "\u0153": "oe",
        "\u2018": "'",  # curly single quotes
        "\u2019": "'",
        "\u201a": ",",
        "\u201c": '"',  # curly double quotes
        "\u201d": '"',
        "\u201e": '"',
        "\u2010": "-",  # hyphen, non-breaking hyphen, en and em dash
        "\u2011": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u2022": "*",
        "\u20ac": "EUR",
    }
)


def latin1(text: str) -> str:
    """``text`` in the core fonts' Latin-1: transliterated where a Latin letter fits,
    ``?`` where none does, control characters (but line feeds) as spaces."""
    out: list[str] = []
    for ch in text.translate(_ASCII_FOR):
        if ch == "\n" or " " <= ch <= "~" or "\xa0" <= ch <= "\xff":
            out.append(ch)
        elif ch < " " or "\x7f" <= ch < "\xa0":
            out.append(" ")
        else:
            base = "".join(
                c
                for c in unicodedata.normalize("NFKD", ch)
                if c <= "\xff" and not unicodedata.combining(c)
            )
            out.append(base or "?")
    return "".join(out)


class _Packet(FPDF):
    def __init__(self, page: Layout, size: str) -> None:
        super().__init__(orientation="portrait", unit="mm", format=size)
        self.packet = page

    def header(self) -> None:
        self.set_font("helvetica", "B", 12)
        organisation = latin1(self.packet.organisation) or " "
        self.cell(0, 7, organisation, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.ln(3)

    def footer(self) -> None:
        self.set_y(-14)
        self.set_font("helvetica", "I", 8)
        self.cell(0, 5, f"{FOOTER}   -   page {self.page_no()}/{{nb}}", align="C")


_LABEL = FontFace(emphasis="BOLD")


def _pdf_rows(pdf: FPDF, rows: tuple[Row, ...]) -> None:
    pdf.set_font("helvetica", "", 10)
    with pdf.table(
        col_widths=(32, 68),
        first_row_as_headings=False,
        borders_layout="NONE",
        line_height=5,
        text_align="LEFT",
        padding=(0.6, 1),
    ) as table:
        for label, value in rows:
            row = table.row()
            row.cell(latin1(label), style=_LABEL)
            row.cell(latin1(value))


def render_pdf(ctx: PacketContext) -> Rendered:
    """``document.pdf``: the packet as a PDF, deterministic for the same context."""
    page = layout(ctx)
    choice = (ctx.options.get("page") or "letter").strip().lower()
    if choice not in PAGES:
        raise RenderError("options.page is not Letter or A4")
    pdf = _Packet(page, PAGES[choice])
    pdf.set_creation_date(ctx.now)
    pdf.set_title(page.subject)
    pdf.set_subject(page.subject)
    pdf.set_creator("refloop")
    pdf.set_lang("en")
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    pdf.cell(0, 9, latin1(page.title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    _pdf_rows(pdf, page.numbers)
    for section in page.sections:
        pdf.ln(3)
        pdf.set_font("helvetica", "B", 11)
        # A local fill colour: fpdf2 tables paint their cells in the one they start with.
        with pdf.local_context(fill_color=(235, 235, 235)):
            pdf.cell(0, 7, latin1(section.title), fill=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        if section.rows:
            _pdf_rows(pdf, section.rows)
        if section.text:
            pdf.set_font("helvetica", "", 10)
            pdf.multi_cell(0, 5, latin1(section.text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    return Rendered(
        payload=bytes(pdf.output()),
        content_type=PDF,
        metadata={"filename": f"{page.filename_stem}.pdf", "subject": page.subject},
    )


RENDERERS: dict[str, Renderer] = {
    "document.html": render_html,
    "document.pdf": render_pdf,
}
