"""Patients' text replies: ``POST /sms/replies/{channel}``, the SMS gateway's inbound webhook.

Theory of operation
-------------------
refloop speaks the Twilio Messages API (:mod:`channels.sms`), so the inbound side is
Twilio's "A message comes in" webhook: a form post of ``MessageSid``, ``AccountSid``,
``From``, ``To`` and ``Body`` (gateways that copy the API send the same; a JSON object with
the same keys, or ``from``/``to``/``text``/``id``, is taken too).

**Authentication** — per channel, either or both of:

* a shared secret, presented as the password of HTTP Basic auth (Twilio calls a webhook
  URL written ``https://refloop:SECRET@host/sms/replies/sms``) or as an
  ``X-Refloop-Token`` header;
* Twilio's ``X-Twilio-Signature``: HMAC-SHA1, keyed by the account's auth token, of the
  public URL Twilio was given followed by every form parameter, sorted, name then value.

Both are compared in constant time. No credentials: 401; wrong ones: 403; a channel
with no reply settings: 404. Nothing about the request is logged beyond the channel and
the outcome — the number and the text are PHI.

**Matching** — the sender's number (normalised to ``+`` and digits) is compared with
``patient.phone`` of every open referral (:meth:`PreferenceQueries.open_by_phone`).

**Keywords** — the reply's first word, upper-cased, accents kept: ``STOP``, ``STOPALL``,
``UNSUBSCRIBE``, ``CANCEL``, ``END``, ``QUIT``, ``REVOKE``, ``OPTOUT`` and Spanish ``ALTO``,
``PARAR`` opt out (also when words follow: "Stop texting me" is an opt-out, as the CTIA
asks); ``START``, ``UNSTOP`` and ``YES`` opt back in only when they are the whole reply
("yes, but not on Monday" is a reply, not a consent). ``HELP``/``AYUDA`` are recorded as
keywords and change nothing.

**One transaction** holding the event log's writer turn, for one matched patient: the
opt-out or opt-in in ``patient_preferences`` for every patient the number matched
(consent belongs to the phone's owner), pending outreach deliveries cancelled on a
STOP, and ``patient.replied`` (``reply.channel``, ``reply.keyword``, ``reply.text``)
appended to the patient's most recently updated open referral through the policy
runtime — whose ``with_policy`` raises the ``patient_reply`` worklist item. A number
that matches no open referral, or several patients (a family phone), is an
``unmatched_reply`` worklist item with no referral, keyed by the gateway's message id
(else a hash of the reply), its detail naming the message id so the coordinator can
find the sender in the gateway's log — never the number itself.

Every id is derived from the gateway's message id, so the gateway's retry of a reply
appends nothing twice. The answer is immediate: an empty TwiML ``<Response/>`` (Twilio
sends nothing back to the patient) for a form post, 204 for JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import structlog
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from engine.domain.referral import Event
from engine.edges.http_app import read_body
from engine.policy.language import Policy
from engine.services.policy_runtime import NewEvent, append, merge, with_policy
from engine.store.eventlog import Changes, LogConnection
from engine.store.preferences import PreferenceQueries
from engine.store.worklist import NewItem

__all__ = [
    "OPT_IN",
    "OPT_OUT",
    "Reply",
    "ReplyAuth",
    "SmsReplies",
    "keyword_of",
    "parse_reply",
    "sms_reply_routes",
    "twilio_signature",
]

log = structlog.get_logger("refloop.sms_replies")

OPT_OUT = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "ALTO", "PARAR"}
)
OPT_IN = frozenset({"START", "UNSTOP", "YES"})
INFO = frozenset({"HELP", "INFO", "AYUDA"})
MAX_BODY = 64 * 1024
MAX_TEXT = 1600  # Twilio's longest message
ACTOR = "patient"
EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
_NAMESPACE = uuid.UUID("0c6f7f0e-1b35-4b83-9d4e-6d7a9b1e2f51")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class ReplyAuth:
    """How one channel's gateway proves it is the gateway. ``token``: a shared secret
    (Basic auth password or ``X-Refloop-Token``); ``twilio_auth_token`` with
    ``public_url``: Twilio's request signature over the URL Twilio was configured with."""

    token: str | None = None
    twilio_auth_token: str | None = None
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    message_id: str  # the gateway's MessageSid, else a hash of the reply
    sender: str  # the number as sent (PHI: never logged)
    text: str
    keyword: str  # STOP, START, HELP … or "" for free text


def keyword_of(text: str) -> str:
    """The keyword a reply is, or "" (see the module docstring for the rules)."""
    words: list[str] = _WORD.findall(text.upper())
    if not words:
        return ""
    first = words[0]
    if first in OPT_OUT:
        return first
    if len(words) == 1 and (first in OPT_IN or first in INFO):
        return first
    return ""


def parse_reply(channel: str, form: Mapping[str, Any]) -> Reply | None:
    """The reply in a gateway's post (Twilio form keys, or the lower-case JSON ones);
    None when there is no sender."""

    def pick(*names: str) -> str:
        for name in names:
            value = form.get(name)
            if isinstance(value, str | int) and str(value).strip():
                return str(value).strip()
        return ""

    sender = pick("From", "from", "sender")
    if not sender:
        return None
    text = pick("Body", "body", "text", "message")[:MAX_TEXT]
    sid = pick("MessageSid", "SmsMessageSid", "SmsSid", "message_id", "id", "sid")
    if not sid or len(sid) > 64:
        digest = hashlib.sha256(f"{channel}\0{sender}\0{text}".encode()).hexdigest()[:32]
        sid = f"sha256:{digest}"
    return Reply(sid, sender, text, keyword_of(text))


def twilio_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature for a form post to ``url``."""
    data = url + "".join(k + v for k, v in sorted(params))
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def _authorised(request: Request, auth: ReplyAuth, params: Sequence[tuple[str, str]]) -> int:
    """0 when the request is the gateway's; else the status to answer (401 or 403)."""
    presented = False
    if auth.token:
        header = request.headers.get("x-refloop-token")
        basic = _basic_password(request.headers.get("authorization", ""))
        for candidate in (header, basic):
            if candidate is not None:
                presented = True
                if hmac.compare_digest(candidate.encode(), auth.token.encode()):
                    return 0
    if auth.twilio_auth_token and auth.public_url:
        signature = request.headers.get("x-twilio-signature")
        if signature is not None:
            presented = True
            want = twilio_signature(auth.twilio_auth_token, auth.public_url, params)
            if hmac.compare_digest(signature.encode(), want.encode()):
                return 0
    return 403 if presented else 401


def _basic_password(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # matched | unmatched | ambiguous | duplicate
    referral_id: str | None = None


class SmsReplies:
    """The webhook and its database work (one connection, one worker thread: replies
    are rare and each is one short transaction)."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Callable[[], Policy],
        channels: Mapping[str, ReplyAuth],
        clock: Callable[[], datetime] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self.channels = dict(channels)
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.on_commit = on_commit or (lambda: None)
        self._log = LogConnection(engine)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="refloop-sms-replies")

    def routes(self) -> list[BaseRoute]:
        return [Route("/sms/replies/{channel}", self.endpoint, methods=["POST"])]

    def close(self) -> None:
        self._executor.submit(self._log.close).result()
        self._executor.shutdown(wait=True)

    async def endpoint(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        auth = self.channels.get(channel)
        if auth is None:
            return Response(status_code=404)
        raw = await read_body(request, MAX_BODY)
        if raw is None:
            return Response(status_code=413)
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        params: list[tuple[str, str]] = []
        if kind == "application/x-www-form-urlencoded":
            try:
                params = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                return Response(status_code=400)
            form: Mapping[str, Any] = dict(params)
        elif kind == "application/json":
            try:
                found = json.loads(raw)
            except ValueError:
                found = None
            if not isinstance(found, dict):
                return Response(status_code=400)
            form = found
        else:
            return Response(status_code=415)
        refused = _authorised(request, auth, params)
        if refused:
            log.warning("sms_reply.refused", channel=channel, status=refused)
            return Response(status_code=refused)
        reply = parse_reply(channel, form)
        if reply is None:
            return Response(status_code=400)
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self._executor, self.handle, channel, reply)
        log.info("sms_reply.recorded", channel=channel, outcome=outcome.status)
        if kind == "application/json":
            return Response(status_code=204)
        return Response(EMPTY_TWIML, media_type="text/xml")

    # -- the database work (worker thread) -----------------------------------------------

    def handle(self, channel: str, reply: Reply, now: datetime | None = None) -> Outcome:
        try:
            outcome = self._handle(channel, reply, now or self.clock())
        except BaseException:
            self._log.drop()
            raise
        return outcome

    def _handle(self, channel: str, reply: Reply, now: datetime) -> Outcome:
        el = self._log.eventlog
        prefs = PreferenceQueries(el.conn, "sqlite" if el.sqlite else "postgresql")
        cause = f"{channel}/{reply.message_id}"
        el.begin(wait=True)
        try:
            matches = prefs.open_by_phone(reply.sender)
            ids = [rid for rid, _ in matches]
            patients = {key or f"referral:{rid}" for rid, key in matches}
            changes = Changes()
            target: str | None = None
            if len(patients) == 1:
                referrals = sorted(el.referrals(ids), key=lambda r: (r.updated_at, r.id))
                target = referrals[-1].id
                event = NewEvent(
                    id=str(uuid.uuid5(_NAMESPACE, f"sms-reply/{cause}")),
                    type=Event.PATIENT_REPLIED,
                    fields={
                        "actor": ACTOR,
                        "reply.channel": channel,
                        "reply.keyword": reply.keyword,
                        "reply.text": reply.text,
                    },
                    occurred_at=now,
                    rule_id=f"sms_reply:{channel}",
                    method="reply",
                )
                changes, _ = append(el, referrals[-1], [event], now)
                if not changes.events:
                    # The gateway's retry: all of it was written the first time (and a
                    # STOP retried after a START must not undo the START).
                    el.end()
                    return Outcome("duplicate", target)
            else:
                status = "unmatched" if not patients else "ambiguous"
                item = NewItem(
                    key=str(uuid.uuid5(_NAMESPACE, f"unmatched/{cause}")),
                    reason="unmatched_reply",
                    detail=_unmatched_detail(channel, reply, status, len(patients)),
                )
                changes = Changes(worklist=[item])
            consent = _consent(reply.keyword)
            if consent is not None:
                # Consent is the phone owner's: every patient the number matched.
                cur = el.conn.cursor()
                try:
                    for key in sorted({k for _, k in matches if k}):
                        prefs.upsert(cur, key, sms_consent=consent, now=now, by=ACTOR)
                finally:
                    cur.close()
            if consent is False and ids:
                stopped = [(rid, "the patient replied STOP") for rid in ids]
                changes = merge(changes, Changes(stop_outreach=stopped))
            changes = with_policy(el, self.policy(), changes, now)
            el.write(changes, now)
            el.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                el.end()
            raise
        if target is None:
            return Outcome("unmatched" if not patients else "ambiguous")
        return Outcome("matched", target)


def _consent(keyword: str) -> bool | None:
    if keyword in OPT_OUT:
        return False
    if keyword in OPT_IN:
        return True
    return None


def _unmatched_detail(channel: str, reply: Reply, status: str, patients: int) -> str:
    """Safe text: the gateway's message id and the keyword, never the number or text."""
    what = f"keyword {reply.keyword}" if reply.keyword else "free text"
    who = "no open referral" if status == "unmatched" else f"{patients} patients' referrals"
    ref = reply.message_id if not reply.message_id.startswith("sha256:") else "(no message id)"
    return (
        f"SMS reply on channel {channel} ({what}) matched {who}: find message {ref} in "
        "the gateway's log to see who sent it"
    )


def sms_reply_routes(
    engine: Engine,
    *,
    policy: Callable[[], Policy],
    channels: Mapping[str, ReplyAuth],
    clock: Callable[[], datetime] | None = None,
) -> list[BaseRoute]:
    """The webhook's routes, for :func:`engine.edges.http_app.build_app`'s ``extra_routes``
    (build :class:`SmsReplies` yourself to :meth:`~SmsReplies.close` it at shutdown)."""
    return SmsReplies(engine, policy=policy, channels=channels, clock=clock).routes()
