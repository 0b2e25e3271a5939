"""Reading what the canonical fields leave out from the stored source HL7 messages (pure).

Theory of operation
-------------------
The FHIR and document renderers need a few things only the order or trigger message
holds (``ctx.sources``): the order's diagnoses (DG1), the documents it carried (OBX ED
or RP) and the consult note's content (the trigger's OBX text and data). This module
parses those messages with the engine's lazy model and returns canonical codings and
FHIR-shaped ``Attachment`` dicts (plain JSON: no fhir.resources import, so document
rendering does not load the FHIR models).

A missing or unreadable source message reads as "nothing there" (:func:`source_message`
returns None); the caller that cannot do without it says so in its own RenderError.
ED data is decoded (Base64, Hex, A) and re-encoded as base64; an ED that claims an
encoding it does not have is a RenderError naming OBX-5, never quoting the data.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from engine.outbound.model import PacketContext, RenderError
from engine.protocol.hl7message import Message, Segment
from engine.protocol.hl7path import Path, parse_path, read
from engine.protocol.hl7v2 import HeaderError

Json = dict[str, Any]


def stripped(value: Any) -> str | None:
    """A text value without surrounding white space; None when empty or not text."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


_DG1_CODE = parse_path("DG1-3.1")
_DG1_TEXT = parse_path("DG1-3.2")
_DG1_SYSTEM = parse_path("DG1-3.3")
_DG1_METHOD = parse_path("DG1-2")
_DG1_DESCRIPTION = parse_path("DG1-4")
_OBX3 = {k: parse_path(f"OBX-3.{n}") for k, n in (("code", 1), ("display", 2), ("system", 3))}
_ED_TYPES = {
    "AP": "application",
    "APPLICATION": "application",
    "SD": "application",
    "IM": "image",
    "IMAGE": "image",
    "SI": "image",
    "NS": "image",
    "AU": "audio",
    "AUDIO": "audio",
    "TEXT": "text",
    "VIDEO": "video",
    "MULTIPART": "multipart",
}
_ED_SUBTYPES = {
    "PDF": "application/pdf",
    "RTF": "application/rtf",
    "XML": "text/xml",
    "X-HL7-CDA-LEVEL-ONE": "text/xml",
    "HTML": "text/html",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}


def source_message(ctx: PacketContext, name: str) -> Message | None:
    """``ctx.sources[name]`` parsed, or None when absent or unreadable (callers that
    cannot do without it say so in their own RenderError)."""
    text = ctx.sources.get(name)
    if not text:
        return None
    try:
        return Message.parse(text)
    except HeaderError:
        return None


def _value(message: Message, path: Path, seg: Segment) -> str | None:
    found = read(message, path, scope=[seg])
    return stripped(message.unescape(found)) if isinstance(found, str) else None


def diagnoses(ctx: PacketContext) -> list[dict[str, str]]:
    """The referral's diagnoses as canonical codings: the ``diagnosis`` field, then the
    order message's DG1 segments (DG1-3, system from DG1-3.3 or DG1-2), without repeats."""
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(code: str | None, display: str | None, system: str | None) -> None:
        if not code or (system or "", code) in seen:
            return
        seen.add((system or "", code))
        item = {"code": code}
        if display:
            item["display"] = display
        if system:
            item["system"] = system
        out.append(item)

    known = ctx.referral.get("referral", "diagnosis")
    if isinstance(known, Mapping):
        add(
            stripped(known.get("code")),
            stripped(known.get("display")),
            stripped(known.get("system")),
        )
    message = source_message(ctx, "order")
    if message is not None:
        for seg in message.all("DG1"):
            add(
                _value(message, _DG1_CODE, seg),
                _value(message, _DG1_TEXT, seg) or _value(message, _DG1_DESCRIPTION, seg),
                _value(message, _DG1_SYSTEM, seg) or _value(message, _DG1_METHOD, seg),
            )
    return out


def _obx_groups(message: Message) -> list[tuple[Segment | None, list[Segment]]]:
    """OBX segments grouped under the OBR or TXA they follow (None: before either)."""
    groups: list[tuple[Segment | None, list[Segment]]] = [(None, [])]
    for seg in message.segments:
        if seg.name in ("OBR", "TXA"):
            groups.append((seg, []))
        elif seg.name == "OBX":
            groups[-1][1].append(seg)
    return [g for g in groups if g[1]]


def obx_type(message: Message, seg: Segment) -> str:
    """OBX-2, the value type, upper-cased."""
    return (seg.field(2) or "").split(message.delims.component)[0].strip().upper()


def obx_code(message: Message, seg: Segment) -> dict[str, str | None]:
    """OBX-3, the observation identifier, as a canonical coding (absent parts None)."""
    return {k: _value(message, path, seg) for k, path in _OBX3.items()}


def _ed_mime(kind: str, subtype: str) -> str:
    if "/" in subtype:
        return subtype.lower()
    if subtype.upper() in _ED_SUBTYPES:
        return _ED_SUBTYPES[subtype.upper()]
    major = _ED_TYPES.get(kind.upper(), "")
    if "/" in kind:
        return kind.lower()
    if major and subtype:
        return f"{major}/{subtype.lower()}"
    return "application/octet-stream"


def _ed_data(message: Message, rep: str) -> tuple[str, str] | None:
    """(content type, base64 data) of one ED value; None when it carries no data."""
    # ED = source ^ type ^ subtype ^ encoding ^ data. Data is taken whole: inline XML
    # is often sent unescaped, with & and ^ of its own.
    parts = rep.split(message.delims.component, 4)
    parts += [""] * (5 - len(parts))
    kind, subtype, encoding = (message.unescape(p).strip() for p in parts[1:4])
    data = message.unescape(parts[4])
    if not data.strip():
        return None
    mime = _ed_mime(kind, subtype)
    enc = encoding.upper()
    if enc in ("BASE64", "B64"):
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RenderError("OBX-5.5: the ED data is not valid base64") from None
    elif enc == "HEX":
        try:
            raw = bytes.fromhex("".join(data.split()))
        except ValueError:
            raise RenderError("OBX-5.5: the ED data is not valid hex") from None
    elif enc in ("A", "ASCII", ""):
        raw = data.encode("utf-8")
    else:
        raise RenderError("OBX-5.4: the ED encoding is not A, Hex or Base64")
    return mime, base64.b64encode(raw).decode("ascii")


def attachments(
    message: Message, segments: list[Segment], *, title: str | None = None
) -> list[Json]:
    """FHIR Attachments from OBX segments: text lines (TX, FT; ST only when nothing else
    is there) joined into one text/plain attachment, then each ED value, then each RP
    pointer (as a url)."""
    lines: list[str] = []
    strings: list[str] = []
    binary: list[Json] = []
    for seg in segments:
        kind = obx_type(message, seg)
        raw = seg.field(5) or ""
        reps = raw.split(message.delims.repetition) if raw else []
        if kind in ("TX", "FT"):
            lines.extend(message.unescape(rep) for rep in reps)
        elif kind == "ST":
            strings.extend(message.unescape(rep) for rep in reps)
        elif kind == "ED":
            for rep in reps:
                found = _ed_data(message, rep)
                if found is not None:
                    binary.append({"contentType": found[0], "data": found[1]})
        elif kind == "RP":
            for rep in reps:
                # RP = pointer ^ application id ^ type of data ^ subtype
                comps = [message.unescape(c).strip() for c in rep.split(message.delims.component)]
                comps += [""] * (4 - len(comps))
                if comps[0]:
                    item: Json = {"url": comps[0]}
                    if comps[2] or comps[3]:
                        item["contentType"] = _ed_mime(comps[2], comps[3])
                    binary.append(item)
    out: list[Json] = []
    # ST values beside a narrative or a document are usually identifiers (study UIDs),
    # not note text: they count only when nothing else carries the note.
    text = "\n".join(lines if lines or binary else strings).strip("\n")
    if text.strip():
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        out.append({"contentType": "text/plain; charset=utf-8", "data": data})
    out.extend(binary)
    if title:
        for item in out:
            item["title"] = title
    return out


def note_attachments(ctx: PacketContext, *, title: str | None = None) -> list[Json]:
    """The consult note's content, from the trigger message's OBX segments: those under
    the TXA (MDM), else under the OBR whose filler number is the document id, else under
    the OBR with the placer number, else the first group that has any."""
    message = source_message(ctx, "trigger")
    if message is None:
        return []
    groups = _obx_groups(message)
    doc = ctx.referral.get("consult_note", "document_id")
    doc_id = stripped(doc.get("value")) if isinstance(doc, Mapping) else None
    placer = ctx.referral.get("referral", "correlate.placer_order")
    placer_id = stripped(placer.get("value")) if isinstance(placer, Mapping) else None

    def first_component(seg: Segment | None, n: int) -> str | None:
        if seg is None:
            return None
        raw = (seg.field(n) or "").split(message.delims.repetition)[0]
        return stripped(message.unescape(raw.split(message.delims.component)[0]))

    ranked = sorted(
        groups,
        key=lambda g: (
            not (g[0] is not None and g[0].name == "TXA"),
            not (doc_id and first_component(g[0], 3) == doc_id),
            not (placer_id and first_component(g[0], 2) == placer_id),
        ),
    )
    for _, segments in ranked:
        found = attachments(message, segments, title=title)
        if found:
            return found
    return []
