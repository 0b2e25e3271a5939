"""The ``smtp`` channel: a referral packet as an e-mail attachment, over (START)TLS.

Theory of operation
-------------------
Each attempt is one SMTP session: connect, upgrade to TLS (STARTTLS, or TLS from the
first byte when ``security = "tls"``), AUTH when a username is configured, one MAIL /
RCPT / DATA transaction, QUIT. No connection is kept between deliveries: a relay that
drops idle sessions is the norm, and a fresh session per delivery keeps failures local
to the delivery that met them.

The message (:func:`build_message`, pure) is multipart/mixed: a short plain-text body
that says a packet is attached, and the payload as a base64 attachment, so the bytes
arrive exactly as rendered (HL7's carriage returns included). Its ``Message-ID`` is
derived from the idempotency key, so a retry of the same delivery carries the same id
and a receiving system can drop the duplicate. Subject and body never carry PHI: the
subject is the renderer's safe one or the configured template, the body is configured.

A 250 to DATA is a relay's promise to pass the message on, not delivery to a reader:
the receipt is ``confirmed=False``. Outcomes are read off the reply codes only: 4xx,
timeouts, refused or dropped connections and TLS verification failures are retryable;
5xx (a refused recipient, a refused message, refused credentials) are permanent. A
server's reply text is never quoted: it often echoes the addresses or the content.

Transport security is not optional: ``security = "none"`` sends PHI in clear and is
refused at ``refloop config check`` unless the operator also sets ``allow_insecure``.

Configuration::

    [channels.cardiology-mail]
    type = "smtp"
    host = "smtp.clinic.example"          # port 587 (starttls) / 465 (tls) by default
    security = "starttls"
    username = "refloop"
    password = { env = "REFLOOP_SMTP_PASSWORD" }
    from_address = "Referrals <referrals@clinic.example>"
    to_address = "intake@cardiology.example"   # when the directory names no endpoint
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
import string
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal

import aiosmtplib
from pydantic import Field, ValidationInfo, field_validator, model_validator

from channels._common import CaFileError, ca_context
from channels.base import (
    FHIR_JSON,
    HL7V2,
    HTML,
    JSON,
    PDF,
    TEXT,
    ChannelContext,
    ChannelError,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
    Secret,
)

#: Where ``port`` defaults to when the table leaves it out, by ``security``.
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}

DEFAULT_BODY = (
    "A referral packet is attached to this message.\n"
    "\n"
    "It was sent automatically by the referral interface engine. If you cannot open\n"
    "the attachment, contact the sending organisation; do not reply with patient\n"
    "details by e-mail.\n"
)

#: Fields a ``subject`` template may name.
SUBJECT_FIELDS = frozenset({"referral_id", "delivery_id", "kind"})

#: content type → (MIME type of the attachment, default filename).
ATTACHMENTS: dict[str, tuple[str, str]] = {
    PDF: (PDF, "referral.pdf"),
    HTML: (HTML, "referral.html"),
    FHIR_JSON: (FHIR_JSON, "referral.json"),
    JSON: (JSON, "referral.json"),
    HL7V2: (HL7V2, "referral.hl7"),
    TEXT: (TEXT, "referral.txt"),
}
FALLBACK_ATTACHMENT = ("application/octet-stream", "referral.bin")

# RFC 5322 dot-atom-text: what a Message-ID's left part may be without quoting.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_HOSTNAME = re.compile(r"[A-Za-z0-9.\-\[\]:]+")


def parse_mailbox(value: str) -> Address:
    """One e-mail address (``a@b.example`` or ``Name <a@b.example>``); ValueError
    says what is wrong with it without quoting it."""
    if not value or "\r" in value or "\n" in value:
        raise ValueError("not an e-mail address (empty or has a line break)")
    try:
        header = default_policy.header_factory("To", value)
        addresses = header.addresses
        # Non-ASCII local parts are legal with SMTPUTF8; the server decides at MAIL.
        defects = [d for d in header.defects if type(d).__name__ != "NonASCIILocalPartDefect"]
    except Exception:  # the parser raises assorted errors on malformed input
        raise ValueError("not an e-mail address") from None
    if len(addresses) != 1:
        raise ValueError("must be exactly one e-mail address")
    address = addresses[0]
    if not isinstance(address, Address) or defects or not address.username or not address.domain:
        raise ValueError("not an e-mail address (want local-part@domain)")
    return address


def _check_mailbox(value: str | None) -> str | None:
    if value is not None:
        parse_mailbox(value)
    return value


class SmtpSettings(ChannelSettings):
    """``[channels.<name>]`` with ``type = "smtp"``."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    # Declared before ``security`` so its validator can see it.
    allow_insecure: bool = False
    # "starttls": upgrade on the submission port (587); "tls": TLS from the first byte
    # (465); "none": clear text, only with allow_insecure.
    security: Literal["starttls", "tls", "none"] = "starttls"
    ca_file: Path | None = None  # trust these CAs instead of the system's; relative to the config
    verify: bool = True  # check the server's certificate and name
    username: str | None = None
    password: Secret | None = None
    from_address: str
    to_address: str | None = None  # default recipient; Envelope.endpoint overrides it
    subject: str = "Referral {referral_id}"
    body_text: str = Field(default=DEFAULT_BODY, min_length=1)
    helo_name: str | None = None  # EHLO name; the library's default is this host's FQDN

    @model_validator(mode="before")
    @classmethod
    def _port_follows_security(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data:
            security = data.get("security", "starttls")
            if security in DEFAULT_PORTS:
                return {**data, "port": DEFAULT_PORTS[security]}
        return data

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError("a host name or IP address, without scheme or port")
        return value

    @field_validator("security")
    @classmethod
    def _no_clear_text_by_accident(cls, value: str, info: ValidationInfo) -> str:
        if value == "none" and not info.data.get("allow_insecure", False):
            raise ValueError(
                'security = "none" sends patient data across the network in clear text; '
                'use "starttls" or "tls", or set allow_insecure = true if the link is '
                "protected some other way"
            )
        return value

    @field_validator("from_address", "to_address")
    @classmethod
    def _is_a_mailbox(cls, value: str | None) -> str | None:
        return _check_mailbox(value)

    @field_validator("subject")
    @classmethod
    def _subject_template(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("must be one line")
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"bad template ({exc}); write literal braces as {{{{ }}}}") from None
        for _, name, spec, conversion in parsed:
            if name is not None and (name not in SUBJECT_FIELDS or spec or conversion):
                allowed = ", ".join("{" + f + "}" for f in sorted(SUBJECT_FIELDS))
                raise ValueError(f"unknown placeholder {{{name}}}; use {allowed}")
        return value

    @field_validator("helo_name")
    @classmethod
    def _helo_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not _HOSTNAME.fullmatch(value):
            raise ValueError("a host name (letters, digits, dots, hyphens)")
        return value

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> SmtpSettings:
        if self.username is not None and self.password is None:
            raise ValueError("password: required when username is set")
        if self.password is not None and self.username is None:
            raise ValueError("username: required when password is set")
        return self


def message_id(idempotency_key: str, from_address: str) -> str:
    """``<key@domain-of-from>``: the same for every attempt of a delivery."""
    domain = parse_mailbox(from_address).domain
    try:
        domain.encode("ascii")
    except UnicodeEncodeError:
        domain = domain.encode("idna").decode("ascii")
    left = idempotency_key
    if not _DOT_ATOM.fullmatch(left):
        # Still deterministic, and free of characters a msg-id cannot carry.
        left = "k" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
    return f"<{left}@{domain}>"


def recipient(envelope: Envelope, settings: SmtpSettings) -> Address:
    """Where this delivery goes; PermanentError when there is no usable address."""
    value = envelope.endpoint or settings.to_address
    if not value:
        raise PermanentError("no recipient: the delivery has no endpoint and no to_address")
    try:
        return parse_mailbox(value)
    except ValueError as exc:
        where = "endpoint" if envelope.endpoint else "to_address"
        raise PermanentError(f"{where} is {exc}") from None


def _attachment_name(envelope: Envelope, default: str) -> str:
    wanted = envelope.metadata.get("filename", "")
    # A bare name only: a path or a line break in a filename is never what was meant.
    name = PurePath(wanted.replace("\\", "/")).name if wanted else ""
    if not name or "\r" in name or "\n" in name or name in (".", ".."):
        return default
    return name


def build_message(envelope: Envelope, settings: SmtpSettings, *, now: datetime) -> EmailMessage:
    """The e-mail for one attempt (pure). ``now`` (aware) becomes the Date header."""
    to = recipient(envelope, settings)
    msg = EmailMessage(policy=default_policy)
    msg["From"] = settings.from_address
    msg["To"] = to
    subject = envelope.metadata.get("subject") or settings.subject.format(
        referral_id=envelope.referral_id, delivery_id=envelope.delivery_id, kind=envelope.kind
    )
    msg["Subject"] = " ".join(subject.split())  # folds away any line break
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(envelope.idempotency_key, settings.from_address)
    msg["X-Refloop-Delivery"] = envelope.idempotency_key
    if envelope.metadata.get("inline") == "true" and envelope.content_type.startswith("text/"):
        # A message for a person (patient outreach): the payload is the body itself.
        msg.set_content(envelope.payload.decode("utf-8"))
        return msg
    msg.set_content(settings.body_text)
    mime, default_name = ATTACHMENTS.get(envelope.content_type, FALLBACK_ATTACHMENT)
    maintype, subtype = mime.split("/", 1)
    params = {"charset": "utf-8"} if maintype == "text" else {}
    msg.add_attachment(
        envelope.payload,
        maintype=maintype,
        subtype=subtype,
        filename=_attachment_name(envelope, default_name),
        params=params,
    )
    return msg


def _reply_error(stage: str, code: int) -> ChannelError:
    """A reply code at a stage, as the error the dispatcher acts on."""
    if stage == "AUTH" and code == 535:
        # Retrying wrong credentials cannot succeed and may lock the account.
        return PermanentError("SMTP AUTH refused (535)")
    if 400 <= code < 500:
        return RetryableError(f"SMTP {stage} deferred ({code})")
    if 500 <= code < 600:
        return PermanentError(f"SMTP {stage} refused ({code})")
    return RetryableError(f"SMTP {stage} unexpected reply ({code})")


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_reason(err: ssl.SSLError) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        # OpenSSL's verify text names the check that failed, never message content.
        return f"TLS certificate verification failed ({err.verify_message})"
    return f"TLS handshake failed ({err.reason or type(err).__name__})"


async def _hang_up(smtp: aiosmtplib.SMTP, transports: list[asyncio.BaseTransport | None]) -> None:
    """Drop the connection now. A graceful TLS close waits for the server's close_notify,
    which may never come (and outlives a loop that stops meanwhile, leaking the socket);
    after QUIT, or after a failure, there is nothing left to say. smtplib does the same.
    ``transports`` are the ones the session used: the library may already have begun a
    graceful close of its own (it does on a 421) and forgotten the transport."""
    if smtp.transport is not None:
        transports.append(smtp.transport)
    for transport in transports:
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
    smtp.close()
    # abort() closes the socket from a callback it schedules; let that run before
    # returning, so the socket is closed when send() returns.
    await asyncio.sleep(0)


class SmtpChannel:
    """Sends each delivery as one e-mail with the payload attached."""

    Settings: ClassVar[type[ChannelSettings]] = SmtpSettings

    def __init__(self, name: str, settings: SmtpSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            s = self.settings
            try:
                ctx = ca_context(s.ca_file, self.context.base_dir)
            except CaFileError as exc:
                # Not cached: the next attempt reads the file again once it is fixed.
                why = exc.cause.strerror or "not PEM"
                raise PermanentError(f"ca_file: cannot load {exc.path} ({why})") from None
            if not s.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._tls = ctx
        return self._tls

    async def send(self, envelope: Envelope) -> Receipt:
        s = self.settings
        now = datetime.fromtimestamp(self.context.clock(), UTC)
        msg = build_message(envelope, s, now=now)
        to = msg["To"].addresses[0].addr_spec
        sender = parse_mailbox(s.from_address).addr_spec
        password = s.password.read(self.context.base_dir) if s.password is not None else None
        tls = self._tls_context() if s.security != "none" else None
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.security == "tls",
            start_tls=False,  # done below, so a server without STARTTLS is an error
            tls_context=tls,
            local_hostname=s.helo_name,
            timeout=s.timeout_seconds,
        )
        stage = "connect"
        used: list[asyncio.BaseTransport | None] = []
        try:
            async with asyncio.timeout(s.timeout_seconds):
                await smtp.connect()
                used.append(smtp.transport)
                if s.security == "starttls":
                    stage = "EHLO"
                    await smtp.ehlo()
                    if not smtp.supports_extension("starttls"):
                        raise PermanentError("server does not offer STARTTLS")
                    stage = "STARTTLS"
                    await smtp.starttls()
                    used.append(smtp.transport)
                if s.username is not None:
                    stage = "EHLO"
                    await smtp.ehlo()
                    stage = "AUTH"
                    await self._authenticate(smtp, s.username, password or "")
                stage = "MAIL/RCPT/DATA"
                await smtp.send_message(msg, sender=sender, recipients=[to])
            # Accepted: from here on nothing may turn this into a failure (a retry
            # would send the packet twice).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await smtp.execute_command(b"QUIT")
        except ChannelError:
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _reply_error("AUTH", exc.code) from None
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _reply_error("greeting", exc.code) from None
        except aiosmtplib.SMTPHeloError as exc:
            raise _reply_error("EHLO", exc.code) from None
        except aiosmtplib.SMTPSenderRefused as exc:
            raise _reply_error("MAIL", exc.code) from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            code = exc.recipients[0].code if exc.recipients else 550
            raise _reply_error("RCPT", code) from None
        except aiosmtplib.SMTPDataError as exc:
            raise _reply_error("DATA", exc.code) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _reply_error(stage, exc.code) from None
        except aiosmtplib.SMTPNotSupported:
            raise PermanentError("server lacks SMTPUTF8, needed for a non-ASCII address") from None
        except (TimeoutError, aiosmtplib.SMTPTimeoutError):
            raise RetryableError(f"SMTP timeout ({stage})") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            tls_error = _tls_failure(exc)
            if tls_error is not None:
                raise RetryableError(_tls_reason(tls_error)) from None
            disconnected = aiosmtplib.SMTPServerDisconnected
            if isinstance(exc, disconnected) or isinstance(exc.__cause__, disconnected):
                raise RetryableError(f"SMTP server disconnected ({stage})") from None
            if isinstance(exc, aiosmtplib.SMTPConnectError):
                cause = exc.__cause__
                why = type(cause).__name__ if cause is not None else "no greeting"
                raise RetryableError(f"SMTP connect to {s.host}:{s.port} failed ({why})") from None
            raise RetryableError(f"SMTP {stage} failed ({type(exc).__name__})") from None
        finally:
            await _hang_up(smtp, used)
        return Receipt(peer_reference=msg["Message-ID"], detail="250 queued", confirmed=False)

    @staticmethod
    async def _authenticate(smtp: aiosmtplib.SMTP, username: str, password: str) -> None:
        # One mechanism, once: the library's login() would try each offered mechanism in
        # turn, and every refused try counts toward an account lockout.
        offered = smtp.server_auth_methods
        if "plain" in offered:
            await smtp.auth_plain(username, password)
        elif "login" in offered:
            await smtp.auth_login(username, password)
        elif offered:
            raise PermanentError("server offers no AUTH mechanism we use (PLAIN, LOGIN)")
        else:
            raise PermanentError("server does not offer AUTH")

    async def aclose(self) -> None:
        # Sessions do not outlive a send: nothing to close.
        self._tls = None
