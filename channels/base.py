"""The channel protocol: what every outbound channel (built in or third-party) implements.

Theory of operation
-------------------
A channel is the last step of a delivery. The dispatcher has already chosen the
delivery, rendered its payload and claimed it; the channel gets an :class:`Envelope`
and either

* returns a :class:`Receipt` — the peer took the payload (an MLLP AA/CA, a 2xx, a
  written file); ``confirmed=False`` when the peer only queued it and will confirm later;
* raises :class:`RetryableError` — worth trying again later (peer down, timeout, AE,
  5xx, 429), optionally with the peer's ``Retry-After``;
* raises :class:`PermanentError` — trying again cannot help (AR, 4xx, a payload the
  peer refuses): the delivery is dead-lettered at once, with the reason.

Any other exception escaping ``send`` is a bug in the channel; the dispatcher treats it
as retryable and logs its type, so a buggy plugin never loses a delivery.

Reasons (``str(error)``) and ``Receipt.detail`` end up in logs, in ``refloop deliveries
list`` and in the event log: they must never quote the payload or a peer's free text
that may echo it. Say what happened ("ACK AE, ERR-3 207"), not what was sent.

Channels are configured under ``[channels.<name>]`` in ``engine.toml``; ``type`` picks
the plugin (the ``refloop.channels`` entry point of that name), every other key is
validated by the plugin's ``Settings`` model at ``refloop config check``, never at the
first delivery. Secrets are never values in the TOML: a :class:`Secret` names an
environment variable or a file.

A channel may import this module and ``engine.protocol``; never the store, the mapping
engine or the runtime.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True, slots=True)
class Envelope:
    """One attempt at one delivery."""

    idempotency_key: str  # the same on every attempt: peers deduplicate on it
    delivery_id: int
    referral_id: str
    kind: str  # "packet" (to a specialist) | "writeback" (to the referring EHR) | ...
    payload: bytes
    content_type: str  # see CONTENT_TYPES
    attempt: int  # 1 on the first try
    # Where to, when the directory or the route names it (a channel-specific address:
    # "host:port" for MLLP, an e-mail address, a fax or phone number, a URL). Empty: the
    # channel's configured default.
    endpoint: str = ""
    # Rendering facts a channel may use: "control_id" (HL7 MSH-10 of the payload),
    # "subject", "filename", "fhir_method", "fhir_url", "if_none_exist", "if_match".
    metadata: Mapping[str, str] = field(default_factory=dict)


#: The content types renderers produce and channels understand.
HL7V2 = "x-application/hl7-v2+er7"
FHIR_JSON = "application/fhir+json"
PDF = "application/pdf"
HTML = "text/html"
JSON = "application/json"
TEXT = "text/plain"
CONTENT_TYPES = (HL7V2, FHIR_JSON, PDF, HTML, JSON, TEXT)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the peer said when it took the payload. No PHI in ``detail``."""

    peer_reference: str = ""  # the peer's id for it: MSA-2, a Location, a fax id, a message id
    detail: str = ""  # short and safe: "ACK AA", "201 Created", "250 queued"
    confirmed: bool = True  # False: accepted for later delivery (queued at a gateway)


class ChannelError(Exception):
    """A delivery attempt failed. ``reason`` is safe to log and show (no PHI)."""

    retryable: ClassVar[bool] = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(ChannelError):
    """Try again later; ``retry_after`` (seconds) when the peer said how long to wait."""

    retryable = True

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PermanentError(ChannelError):
    """Trying again cannot succeed: dead-letter now."""

    retryable = False


class ChannelConfigError(Exception):
    """A ``[channels.<name>]`` table is wrong; ``problems`` are ``key: what to fix``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Secret(BaseModel):
    """Where a secret lives: an environment variable or a file (never the TOML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None

    def read(self, base: Path) -> str:
        """The secret's value; relative files are relative to ``base`` (the config's
        folder). Raises :class:`PermanentError` when neither source holds it: a delivery
        cannot succeed until an operator provides it."""
        if self.env and os.environ.get(self.env):
            return os.environ[self.env]
        if self.file is not None:
            path = self.file if self.file.is_absolute() else base / self.file
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise PermanentError(f"cannot read secret file {path}: {exc.strerror}") from None
        where = f"env {self.env}" if self.env else "no env or file named"
        raise PermanentError(f"secret not set ({where})")

    def problem(self, base: Path) -> str | None:
        """Why :meth:`read` would fail now, or None (for ``refloop config check``)."""
        try:
            self.read(base)
        except PermanentError as exc:
            return exc.reason
        return None


class ChannelSettings(BaseModel):
    """Keys every ``[channels.<name>]`` table may set; plugins subclass it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    # How long one attempt may take before it counts as a (retryable) timeout.
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Deliveries of this channel the dispatcher runs at once.
    max_in_flight: int = Field(default=4, ge=1, le=256)
    # Retry policy: exponential backoff with jitter, from initial to max, until
    # max_attempts or max_age_seconds, then dead letter.
    max_attempts: int = Field(default=25, ge=1, le=10_000)
    max_age_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    backoff_initial_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=3600.0, gt=0)


@dataclass(frozen=True, slots=True)
class ChannelContext:
    """What the runtime gives a channel when it builds it."""

    base_dir: Path = Path()  # the config file's folder: relative paths start here
    clock: Callable[[], float] = time.time  # wall clock (token expiry, signatures)


@runtime_checkable
class Channel(Protocol):
    """A configured channel instance. ``send`` may be called concurrently up to the
    channel's ``max_in_flight``; a channel that must serialise (one MLLP message in
    flight per connection) does so itself."""

    name: str

    async def send(self, envelope: Envelope) -> Receipt: ...

    async def aclose(self) -> None: ...


class ChannelPlugin(Protocol):
    """What the ``refloop.channels`` entry point names: a class with a ``Settings`` model
    that is built from the validated settings."""

    Settings: ClassVar[type[ChannelSettings]]

    def __init__(self, name: str, settings: Any, context: ChannelContext) -> None: ...

    async def send(self, envelope: Envelope) -> Receipt: ...

    async def aclose(self) -> None: ...
