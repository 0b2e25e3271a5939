"""``outreach.sms`` and ``outreach.email``: a patient reminder from an analyst's template.

The delivery's trigger is the ``outreach.planned`` event the scheduler appended when a
ladder's ``outreach`` step came due; the planner (:func:`engine.policy.outreach.plan_outreach`)
already chose the medium, the address (the outbox row's endpoint) and the language, and
wrote ``outreach.template`` and ``outreach.language`` on the event. This renderer only
fills the template in, with the minimal context of
:func:`engine.policy.outreach.message_context` (first name, specialty, specialist,
appointment time in the patient's zone, sender) — never the address, never clinical data.

* ``outreach.sms`` → ``text/plain`` UTF-8, at most 320 characters, with the opt-out words;
* ``outreach.email`` → ``text/plain`` UTF-8 with the template's subject in the metadata
  (``subject``, which the smtp channel uses as the Subject header) and ``inline: true``,
  asking the channel to make it the message body rather than an attachment.

Render processes are spawned (:func:`engine.services.dispatcher.render_named`), so
nothing set in the daemon's memory reaches them: the templates folder comes from the
delivery's route options (``ctx.options``): ``templates_dir`` (absolute), and optionally
``sender_name``, ``default_timezone`` and ``specialist_phone``. :func:`configure` sets
in-process defaults for when an option is absent (tests, the CLI, ``render_processes =
0``). Templates are compiled once per folder and reloaded when a file in it changes.

Templates
---------
:class:`Templates` loads ``<dir>/<template>.<language>.<sms|email>.j2`` with Jinja2's
``SandboxedEnvironment`` (no attribute tricks, ``StrictUndefined``: a misspelt name is an
error, not a blank) and renders them with :data:`CONTEXT_NAMES` only. An e-mail
template's first line is ``Subject: …``, then a blank line, then the body. Loading
renders every template once with long sample values, so a text that would run past
:data:`SMS_LIMIT` characters or lacks its opt-out words (``STOP``; Spanish ``ALTO``) is
refused at load time, as ``file:line: message`` like every other problem.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from engine.domain.timezones import zone_of
from engine.outbound.model import PacketContext, Rendered, RenderError

__all__ = [
    "CONTEXT_NAMES",
    "OPTIONS",
    "RENDERERS",
    "SMS_LIMIT",
    "Message",
    "TemplateError",
    "Templates",
    "configure",
    "format_appointment",
    "message_context",
    "render_email",
    "render_sms",
]

TEXT = "text/plain"  # channels.base.TEXT: what the sms and smtp channels take
#: Two concatenated GSM-7 segments' worth, give or take: a reminder, not a letter.
SMS_LIMIT = 320
#: Words an SMS must contain, by language, for the patient to know how to stop them.
OPT_OUT_WORDS: Mapping[str, str] = {"en": "STOP", "es": "ALTO"}
#: Names a template may use; every one is always defined ("" when unknown).
CONTEXT_NAMES = (
    "first_name",
    "specialty",
    "specialist_name",
    "specialist_phone",
    "appointment_at",
    "sender",
)

_FILE = re.compile(
    r"^(?P<template>[a-z0-9][a-z0-9_.\-]*?)\.(?P<language>[a-z]{2,3}(?:-[a-z0-9]{2,8})?)"
    r"\.(?P<medium>sms|email)\.j2$"
)


#: The route options these renderers read (what the lead's route_options must return).
OPTIONS = ("templates_dir", "sender_name", "default_timezone", "specialist_phone")


# ---- templates -----------------------------------------------------------------------------


class TemplateError(Exception):
    """Templates did not load or render; ``errors`` are ``file:line: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors) or "templates did not load")


@dataclass(frozen=True, slots=True)
class Message:
    body: str
    subject: str = ""  # e-mail only


#: A context with every name set, long and accented, to check templates at load time.
_SAMPLE: Mapping[str, str] = {
    "first_name": "Maximiliano",
    "specialty": "gastroenterology",
    "specialist_name": "Northside Gastroenterology Associates",
    "specialist_phone": "+1 (555) 010-0199",
    "appointment_at": "miércoles, 24 de septiembre, 10:30 a. m.",
    "sender": "your care team",
}


class Templates:
    """The outreach templates of one folder, compiled; :meth:`load` checks them all."""

    def __init__(self, directory: Path, compiled: Mapping[tuple[str, str, str], Any]) -> None:
        self.directory = directory
        self._compiled = dict(compiled)

    @classmethod
    def empty(cls) -> Templates:
        return cls(Path("."), {})

    @classmethod
    def load(cls, directory: Path, *, check: bool = True) -> Templates:
        """Compile every ``<template>.<language>.<sms|email>.j2`` of ``directory``;
        raises :class:`TemplateError` with every problem (bad names, syntax, undefined
        names, a text too long or without its opt-out words)."""
        if not directory.is_dir():
            raise TemplateError([f"{directory}:1: no such templates directory"])
        env = _environment(directory)
        compiled: dict[tuple[str, str, str], Any] = {}
        errors: list[str] = []
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.name.endswith(".md"):
                continue
            found = _FILE.match(path.name)
            if found is None:
                errors.append(
                    f"{path}:1: a template is named <template>.<language>.<sms|email>.j2 "
                    "(like schedule_reminder.es.sms.j2)"
                )
                continue
            try:
                template = env.get_template(path.name)
            except jinja2.TemplateSyntaxError as exc:
                errors.append(f"{path}:{exc.lineno}: {exc.message}")
                continue
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:1: not UTF-8 text (byte {exc.start})")
                continue
            key = (found["template"], found["language"], found["medium"])
            compiled[key] = template
        out = cls(directory, compiled)
        if check:
            for name, language, medium in sorted(compiled):
                try:
                    out.render(name, language, medium, _SAMPLE)
                except TemplateError as exc:
                    errors.extend(exc.errors)
        if errors:
            raise TemplateError(errors)
        return out

    def has(self, template: str, language: str, medium: str) -> bool:
        return (template, language, medium) in self._compiled

    def names(self) -> frozenset[str]:
        return frozenset(t for t, _, _ in self._compiled)

    def languages(self, template: str, medium: str) -> list[str]:
        return sorted(lang for t, lang, m in self._compiled if t == template and m == medium)

    def render(
        self, template: str, language: str, medium: str, context: Mapping[str, str]
    ) -> Message:
        """The message; :class:`TemplateError` (``file:line: message``) when it does not
        render, is too long for a text, or a text lacks its opt-out words."""
        compiled = self._compiled.get((template, language, medium))
        where = self.directory / f"{template}.{language}.{medium}.j2"
        if compiled is None:
            raise TemplateError([f"{where}:1: no such template"])
        values = {name: str(context.get(name) or "") for name in CONTEXT_NAMES}
        try:
            text = compiled.render(values)
        except jinja2.TemplateError as exc:
            line = _line_of(exc.__traceback__, compiled.filename)
            message = exc.message if isinstance(exc.message, str) else type(exc).__name__
            raise TemplateError([f"{where}:{line}: {message}"]) from None
        if medium == "email":
            return _email_message(where, text)
        body = " ".join(text.split())
        if len(body) > SMS_LIMIT:
            raise TemplateError(
                [f"{where}:1: a text renders to {len(body)} characters; keep it under {SMS_LIMIT}"]
            )
        word = OPT_OUT_WORDS.get(language.split("-", 1)[0], "STOP")
        if word not in body:
            raise TemplateError([f"{where}:1: a text must tell how to opt out ({word!r})"])
        return Message(body)


def _environment(directory: Path) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # plain text: SMS and a text/plain e-mail body
        keep_trailing_newline=False,
        auto_reload=False,
    )


def _email_message(where: Path, text: str) -> Message:
    head, _, rest = text.lstrip("\n").partition("\n")
    if not head.lower().startswith("subject:"):
        raise TemplateError([f"{where}:1: an e-mail template starts with a `Subject: …` line"])
    subject = " ".join(head[len("subject:") :].split())
    if not subject:
        raise TemplateError([f"{where}:1: the subject is empty"])
    body = rest.lstrip("\n").rstrip() + "\n"
    if not body.strip():
        raise TemplateError([f"{where}:2: the e-mail has no body after its subject line"])
    return Message(body, subject)


def _line_of(tb: TracebackType | None, filename: str | None) -> int:
    """The template line a render error was raised at (Jinja rewrites the traceback so
    the template's frames carry its file name and line)."""
    line = 1
    while tb is not None:
        if filename and tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# ---- what a template sees ------------------------------------------------------------------

_WEEKDAYS = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
}
_MONTHS = {
    "en": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "es": (
        "enero",
        "febrero",
        "marzo",
        "abril",
        "mayo",
        "junio",
        "julio",
        "agosto",
        "septiembre",
        "octubre",
        "noviembre",
        "diciembre",
    ),
}


def format_appointment(moment: datetime, zone: tzinfo, language: str) -> str:
    """The appointment's wall time where the patient lives, in their language."""
    local = moment.astimezone(zone)
    lang = language.split("-", 1)[0]
    hour12 = local.hour % 12 or 12
    if lang == "es":
        suffix = "a. m." if local.hour < 12 else "p. m."
        return (
            f"{_WEEKDAYS['es'][local.weekday()]} {local.day} de "
            f"{_MONTHS['es'][local.month - 1]}, {hour12}:{local.minute:02d} {suffix}"
        )
    if lang == "en":
        suffix = "AM" if local.hour < 12 else "PM"
        return (
            f"{_WEEKDAYS['en'][local.weekday()]}, {_MONTHS['en'][local.month - 1]} "
            f"{local.day}, {hour12}:{local.minute:02d} {suffix}"
        )
    return local.strftime("%Y-%m-%d %H:%M")


def message_context(
    data: Mapping[str, Mapping[str, Any]],
    *,
    language: str,
    sender: str,
    default_timezone: str = "America/New_York",
    specialist_name: str = "",
    specialist_phone: str = "",
) -> dict[str, str]:
    """The only data a template sees, from the referral's projection ``data``: the
    patient's first name, the specialty, the specialist (the directory's name when
    known), the appointment's time in the patient's zone, and who it is from."""
    order = data.get("referral", {})
    specialty = _text(order.get("specialty")) or ""
    name = specialist_name or _text(order.get("recipient.organization")) or ""
    start = data.get("appointment", {}).get("start")
    when = ""
    if isinstance(start, str):
        try:
            moment: datetime | None = datetime.fromisoformat(start)
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            zone = zone_of(_text(order.get("patient.timezone")), default_timezone)
            when = format_appointment(moment, zone, language)
    return {
        "first_name": _first_name(order.get("patient.name")),
        "specialty": specialty.replace("_", " "),
        "specialist_name": name,
        "specialist_phone": specialist_phone,
        "appointment_at": when,
        "sender": sender,
    }


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, Mapping) and isinstance(value.get("code"), str):
        return str(value["code"]).strip() or None
    return None


def _first_name(value: Any) -> str:
    if isinstance(value, Mapping):
        found = _text(value.get("given"))
        return found.split()[0] if found else ""
    return ""


# ---- the renderers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Defaults:
    templates_dir: str = ""
    sender_name: str = "your care team"
    default_timezone: str = "America/New_York"


_defaults = _Defaults()
_lock = threading.Lock()
_cache: dict[str, tuple[tuple[tuple[str, int, int], ...], Templates]] = {}


def configure(
    templates_dir: Path | str,
    *,
    sender_name: str = "your care team",
    default_timezone: str = "America/New_York",
) -> None:
    """In-process defaults for deliveries whose options do not say (not seen by spawned
    render processes: pass ``ctx.options`` for those)."""
    global _defaults
    _defaults = _Defaults(str(templates_dir), sender_name, default_timezone)


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return ()
    out: list[tuple[str, int, int]] = []
    for path in entries:
        if path.suffix == ".j2":
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _templates(directory: str) -> Templates:
    folder = Path(directory)
    signature = _signature(folder)
    with _lock:
        held = _cache.get(directory)
        if held is not None and held[0] == signature:
            return held[1]
    try:
        loaded = Templates.load(folder)
    except TemplateError as exc:
        # file:line of the template, never a value: a template's problem, not the patient's
        raise RenderError(
            f"outreach templates do not load ({len(exc.errors)} problem(s)): {exc.errors[0]}"
        ) from None
    with _lock:
        _cache[directory] = (signature, loaded)
    return loaded


def _render(ctx: PacketContext, medium: str) -> tuple[str, str]:
    template = ctx.event.fields.get("outreach.template")
    language = ctx.event.fields.get("outreach.language")
    if not isinstance(template, str) or not template:
        raise RenderError("the trigger event has no outreach.template")
    if not isinstance(language, str) or not language:
        raise RenderError("the trigger event has no outreach.language")
    directory = ctx.options.get("templates_dir") or _defaults.templates_dir
    if not directory:
        raise RenderError("no outreach templates_dir in the route options")
    templates = _templates(directory)
    if not templates.has(template, language, medium):
        raise RenderError(f"no outreach template {template}.{language}.{medium}.j2")
    context = message_context(
        ctx.referral.data,
        language=language,
        sender=ctx.options.get("sender_name") or _defaults.sender_name,
        default_timezone=ctx.options.get("default_timezone") or _defaults.default_timezone,
        specialist_name=ctx.recipient.name if ctx.recipient is not None else "",
        specialist_phone=ctx.options.get("specialist_phone", ""),
    )
    try:
        message = templates.render(template, language, medium, context)
    except TemplateError as exc:
        raise RenderError(f"outreach template did not render: {exc.errors[0]}") from None
    return message.subject, message.body


def render_sms(ctx: PacketContext) -> Rendered:
    _, body = _render(ctx, "sms")
    return Rendered(body.encode("utf-8"), TEXT, {})


def render_email(ctx: PacketContext) -> Rendered:
    subject, body = _render(ctx, "email")
    return Rendered(
        body.encode("utf-8"),
        TEXT,
        {"subject": subject, "inline": "true", "filename": "message.txt"},
    )


RENDERERS = {"outreach.sms": render_sms, "outreach.email": render_email}
