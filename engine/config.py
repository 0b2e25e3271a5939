"""The configuration: one TOML file, validated once at start into frozen objects.

Secrets never live in the TOML. The file names where they are (an environment variable
or a file); :func:`load_config` refuses a database URL that embeds a password.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from engine.protocol.hl7v2 import ascii_compatible

DEFAULT_CONFIG = "engine.toml"
DEFAULT_DATABASE_URL = "sqlite:///var/refloop.db"


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file: key.path: what to fix``."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Frozen):
    """Where a secret lives: an environment variable or a file (never the TOML)."""

    env: str | None = None
    file: Path | None = None

    def read(self, base: Path = Path()) -> str | None:
        """The secret, or None when neither source holds it. Relative files are relative
        to ``base`` (the config file's folder)."""
        if self.env and os.environ.get(self.env):
            return os.environ[self.env]
        if self.file:
            path = self.file if self.file.is_absolute() else base / self.file
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
        return None


class DatabaseConfig(_Frozen):
    url: str = DEFAULT_DATABASE_URL
    password: SecretRef | None = None
    pool_size: int = Field(default=5, ge=1, le=100)
    # SQLite only: FULL survives power loss, NORMAL only a process crash.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # The embedded default may migrate itself at start; production asks for `db upgrade`.
    auto_upgrade: bool | None = None

    @field_validator("url")
    @classmethod
    def _no_password_in_toml(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        # psycopg also takes ?password=..., which must not slip past the rule.
        if url.password or "password" in url.query:
            raise ValueError(
                "the URL holds a password; put it in env REFLOOP_DATABASE_URL or name it "
                "with [database.password] env = ... or file = ..."
            )
        if url.drivername != "postgres" and url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:/// and postgresql:// URLs are supported")
        return value


class HttpConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class TlsConfig(_Frozen):
    cert_file: Path
    key_file: Path
    key_password: SecretRef | None = None
    # Mutual TLS: when set, a client certificate signed by this CA is required.
    client_ca_file: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class ListenerConfig(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    host: str = "0.0.0.0"  # noqa: S104 - an interface engine listens for its EHR peers
    port: int = Field(ge=0, le=65535)
    tls: TlsConfig | None = None
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    idle_timeout_seconds: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    allowed_cidrs: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    ack_mode: Literal["auto", "original", "enhanced"] = "auto"
    # MSH-15 NE/ER/SU may suppress the accept ACK; off by default: never answer silence.
    honour_accept_ack_type: bool = False
    default_charset: str = "utf-8"
    timezone: str = "UTC"
    strict_segment_terminators: bool = False
    # MSH-9.1 values accepted here; empty means every message type in HL7 table 0076.
    message_types: tuple[str, ...] = ()
    duplicate_window_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    # The mapping overlay (a folder under <mappings dir>/sources/) tried before the shared
    # mappings for messages from this listener; checked against the set at start.
    mappings: str | None = Field(default=None, min_length=1)

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR like 10.0.0.0/8") from None
        return value

    @field_validator("default_charset")
    @classmethod
    def _charset(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not a character set Python knows") from None
        if not ascii_compatible(value):
            raise ValueError(
                f"{value!r} is not ASCII-compatible; HL7 v2 over MLLP needs a charset "
                "like utf-8, latin-1 or cp1252"
            )
        return value

    @field_validator("message_types")
    @classmethod
    def _message_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Compared with MSH-9.1 as sent, so "orm" would silently refuse every ORM.
        bad = [t for t in value if not re.fullmatch(r"[A-Z0-9]{3}", t)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: message types are 3 capitals like ORM or SIU"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone like America/Chicago") from None
        return value

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.allowed_cidrs)


class MllpConfig(_Frozen):
    listeners: tuple[ListenerConfig, ...] = ()

    @field_validator("listeners")
    @classmethod
    def _unique(cls, value: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        names = [listener.name for listener in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"listener names must be unique; repeated: {', '.join(dupes)}")
        return value


class FhirSubscriptionConfig(_Frozen):
    """One Subscription refloop keeps on a FHIR source's server (issue 5)."""

    resource: Literal["ServiceRequest", "Task", "Appointment", "DocumentReference"]
    # R4 core rest-hook: a search string (``Task?status=completed``) …
    criteria: str | None = None
    # … or R4 Subscriptions Backport: a SubscriptionTopic canonical URL and its filter.
    topic: str | None = None
    filter: str | None = None
    payload: Literal["full-resource", "id-only", "empty"] = "full-resource"
    # A subscription silent for longer than this (no event, no heartbeat) is reported.
    heartbeat_seconds: int = Field(default=300, ge=10)

    @model_validator(mode="after")
    def _one_kind(self) -> FhirSubscriptionConfig:
        if (self.criteria is None) == (self.topic is None):
            raise ValueError(
                "a subscription names exactly one of criteria (R4 rest-hook, e.g. "
                "'Task?status=completed') or topic (a Backport SubscriptionTopic URL)"
            )
        if self.filter is not None and self.topic is None:
            raise ValueError("filter goes with topic (Backport); put R4 filters in criteria")
        return self


class FhirSourceConfig(_Frozen):
    """A system that writes FHIR to refloop (REST writes, subscription notifications)."""

    # Shares the namespace of MLLP listeners: it is the message's `listener` and the
    # write-back source of the referrals it creates.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    # The credential this source presents: a bearer token, or an HMAC secret for
    # signed notifications (athenahealth-style X-Hub-Signature). At least one.
    token: SecretRef | None = None
    hmac_secret: SecretRef | None = None
    allowed_cidrs: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    # The mapping overlay (<mappings dir>/sources/<name>/) for this source's resources.
    mappings: str | None = Field(default=None, min_length=1)
    # The source's own FHIR server, as a [channels.<name>] of type fhir (its base_url and
    # auth): where id-only notifications are read back, gaps reconciled by search, and
    # Subscriptions created.
    server: str | None = None
    # The URL the source's server calls for notifications (our /fhir/r4/_notify/<name>,
    # as the server reaches it).
    notify_url: str | None = None
    subscriptions: tuple[FhirSubscriptionConfig, ...] = ()
    # (Timestamps without an offset take the zone of the mappings — the overlay's
    # source.yaml — as HL7 feeds do.)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return ListenerConfig._cidrs(value)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.allowed_cidrs)

    @model_validator(mode="after")
    def _credential(self) -> FhirSourceConfig:
        if self.token is None and self.hmac_secret is None:
            raise ValueError(
                "a FHIR source needs a credential: set token (bearer) or hmac_secret, "
                "each {env = ...} or {file = ...}"
            )
        if self.subscriptions and (self.server is None or self.notify_url is None):
            raise ValueError(
                "subscriptions need server (the source's FHIR server, a [channels.<name>] "
                "of type fhir) and notify_url (where that server calls us back)"
            )
        return self


class FhirConfig(_Frozen):
    sources: tuple[FhirSourceConfig, ...] = ()

    @field_validator("sources")
    @classmethod
    def _unique(cls, value: tuple[FhirSourceConfig, ...]) -> tuple[FhirSourceConfig, ...]:
        names = [s.name for s in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate FHIR source names: {', '.join(dupes)}")
        return value


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    # Identifiers in logs are HMAC tokens under this key; created (0600) when missing.
    token_key: SecretRef = SecretRef(env="REFLOOP_LOG_TOKEN_KEY", file=Path("var/log-token.key"))


class IngestConfig(_Frozen):
    # Group commit: at most this many messages share one transaction.
    max_batch: int = Field(default=256, ge=1, le=10_000)
    # A message not committed within this bound is answered AR/CR 207 (resend later).
    # A commit that lands afterwards is harmless: the resend is then a duplicate.
    commit_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Writer threads (each with a connection). None: 2 on PostgreSQL, 1 on SQLite
    # (SQLite has one write lock; more would only queue on it).
    writers: int | None = Field(default=None, ge=1, le=16)


class MappingsConfig(_Frozen):
    # Relative to the config file's folder.
    dir: Path = Path("mappings")
    # How often the folder is checked for changes (hot reload; SIGHUP reloads at once).
    reload_seconds: float = Field(default=2.0, gt=0, le=3600)


class NormalizerConfig(_Frozen):
    # Normalisation runs after the ACK; off, messages are stored and acknowledged only.
    enabled: bool = True
    # Messages per transaction (events, projections and statuses commit together).
    batch_size: int = Field(default=256, ge=1, le=10_000)
    # A parked message that still matches no referral after this becomes `unmatched`.
    parked_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    # How often every parked message is retried (the patient + specialty heuristic may
    # match a referral that has appeared since; new keys release parked messages at once).
    retry_parked_seconds: float = Field(default=300.0, gt=0)
    # Fallback poll when no commit wakes the normaliser (another replica's messages).
    poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # Run the normaliser in its own OS process (its own CPU core), so mapping a burst
    # never slows the listeners' ACKs. false: a thread of the daemon (small machines).
    separate_process: bool = True


#: Seconds an attempt's timeout must stay below the dispatcher's lease.
OUTBOUND_LEASE_MARGIN = 5.0


class OutboundConfig(_Frozen):
    # Deliver what routing enqueues (packets, write-backs); off, deliveries wait in the outbox.
    enabled: bool = True
    # The folder holding outbound/ (routes, write-back) and directory/ (specialists),
    # relative to this file. Default: the [mappings] dir (they are analysts' files too).
    dir: Path | None = None
    # How often the dispatcher looks for due deliveries when nothing woke it (the
    # normaliser in its own process, another replica, a retry coming due).
    poll_seconds: float = Field(default=0.2, gt=0, le=60)
    # Deliveries claimed per channel per look, at most.
    claim_batch: int = Field(default=32, ge=1, le=1000)
    # An in-flight delivery not finished after this is taken back and retried (its
    # claimer died). Longer than any channel's timeout_seconds.
    lease_seconds: float = Field(default=300.0, gt=0)
    # How long shutdown waits for deliveries on the wire before taking them back.
    stop_seconds: float = Field(default=10.0, ge=0, le=300)
    # Processes that render packets (hl7apy's validation is CPU: off the daemon's core,
    # on the other). 0: render in the dispatcher's thread (a one-core machine).
    render_processes: int = Field(default=1, ge=0, le=8)
    # Who we are in the packets we send (MSH-3 / MSH-4).
    sending_application: str = Field(default="REFLOOP", min_length=1, max_length=180)
    sending_facility: str = Field(default="", max_length=180)


class PolicyConfig(_Frozen):
    # Run the referral policy (mappings/policies): timers, escalations, the worklist,
    # outreach. Off: referrals are tracked, nobody is nudged.
    enabled: bool = True
    # How often the scheduler looks for due timers when nothing woke it.
    poll_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Due timers fired per transaction, at most.
    batch: int = Field(default=200, ge=1, le=10_000)
    # How often the KPI gauges (loop closure, open at 30 days) are recomputed.
    kpi_seconds: float = Field(default=300.0, gt=0)


class OutreachConfig(_Frozen):
    # Send patient reminders (the policy's `outreach` steps). Off: they are skipped and
    # recorded as such.
    enabled: bool = True
    # The [channels.<name>] each medium goes out on.
    sms_channel: str = "sms"
    email_channel: str = "email"
    # No message between these local times in the patient's zone (deferred to the end).
    quiet_start: str = Field(default="21:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    quiet_end: str = Field(default="08:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    # When the referral names no zone / no language, or no template exists in its language.
    default_timezone: str = "America/New_York"
    default_language: str = "en"
    # Templates: <dir>/<template>.<language>.<sms|email>.j2, relative to this file.
    # Default: policies/templates under the [mappings] dir.
    templates_dir: Path | None = None
    # Who patients are told the message is from (templates read it as `sender`).
    sender_name: str = Field(default="your care team", max_length=80)
    # TCPA: a text needs the patient's recorded consent (patient.consent.sms: yes, or a
    # START reply). true only when intake records consent for every number it sends.
    sms_assume_consent: bool = False
    # E-mail goes unless the patient refused it; true: only with recorded consent.
    email_requires_consent: bool = False
    # Inbound SMS replies (POST /sms/replies/<sms_channel>): the shared secret the gateway
    # sends as the Basic-auth password or X-Refloop-Token, and/or — with the sms channel's
    # auth_token — the public URL the gateway calls, for Twilio's X-Twilio-Signature.
    reply_token: SecretRef | None = None
    reply_public_url: str | None = None

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name)") from None
        return value


class Config(_Frozen):
    database: DatabaseConfig = DatabaseConfig()
    http: HttpConfig = HttpConfig()
    mllp: MllpConfig = MllpConfig()
    logging: LoggingConfig = LoggingConfig()
    ingest: IngestConfig = IngestConfig()
    mappings: MappingsConfig = MappingsConfig()
    normalizer: NormalizerConfig = NormalizerConfig()
    outbound: OutboundConfig = OutboundConfig()
    fhir: FhirConfig = FhirConfig()
    policy: PolicyConfig = PolicyConfig()
    outreach: OutreachConfig = OutreachConfig()
    # [channels.<name>]: each table's `type` picks a channel plugin (refloop.channels entry
    # points) whose own Settings model validates the rest.
    channels: dict[str, Any] = Field(default_factory=dict)
    source: Path = Path(DEFAULT_CONFIG)

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: dict[str, Any]) -> dict[str, Any]:
        from channels.base import ChannelConfigError
        from channels.registry import validate

        out: dict[str, Any] = {}
        problems: list[str] = []
        for name, table in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                problems.append(f"{name}: a channel name is letters, digits, - _ . (max 64)")
                continue
            if not isinstance(table, Mapping):
                problems.append(f"{name}: must be a table ([channels.{name}])")
                continue
            try:
                out[name] = validate(table)
            except ChannelConfigError as exc:
                problems += [f"{name}.{p}" for p in exc.problems]
        if problems:
            raise ValueError("; ".join(problems))
        return out

    @model_validator(mode="after")
    def _sources_are_distinct(self) -> Config:
        listeners = {x.name for x in self.mllp.listeners}
        for source in self.fhir.sources:
            if source.name in listeners:
                raise ValueError(
                    f"fhir.sources: {source.name!r} is also an MLLP listener's name; a source "
                    "name says where a referral came from, so it must be unique"
                )
            if source.server is not None and source.server not in self.channels:
                raise ValueError(
                    f"fhir.sources: {source.name}: server = {source.server!r} is not a "
                    "[channels.<name>] of this file"
                )
        return self

    @model_validator(mode="after")
    def _lease_outlives_attempts(self) -> Config:
        # A lease shorter than an attempt lets another replica take back a delivery
        # that is still on the wire: it would go out twice.
        for name, settings in self.channels.items():
            limit = self.outbound.lease_seconds - OUTBOUND_LEASE_MARGIN
            if settings.timeout_seconds >= limit:
                raise ValueError(
                    f"channels.{name}.timeout_seconds ({settings.timeout_seconds:g}) must be "
                    f"less than [outbound] lease_seconds ({self.outbound.lease_seconds:g}) minus "
                    f"{OUTBOUND_LEASE_MARGIN:g}"
                )
        return self

    def mappings_dir(self) -> Path:
        return self.resolve(self.mappings.dir)

    def outbound_dir(self) -> Path:
        return self.resolve(self.outbound.dir) if self.outbound.dir else self.mappings_dir()

    def templates_dir(self) -> Path:
        """Outreach templates: [outreach] templates_dir, else policies/templates."""
        if self.outreach.templates_dir is not None:
            return self.resolve(self.outreach.templates_dir)
        return self.mappings_dir() / "policies" / "templates"

    def overlays(self) -> dict[str, str]:
        """``{listener or FHIR source: overlay}`` for those that name one."""
        out = {x.name: x.mappings for x in self.mllp.listeners if x.mappings}
        out.update({x.name: x.mappings for x in self.fhir.sources if x.mappings})
        return out

    def database_url(self) -> str:
        """The effective URL: env REFLOOP_DATABASE_URL wins, then [database] + password."""
        env_url = os.environ.get("REFLOOP_DATABASE_URL")
        if env_url:
            try:
                backend = make_url(env_url).get_backend_name()
            except ArgumentError:
                backend = ""
            if backend not in ("sqlite", "postgresql", "postgres"):
                raise ConfigError(
                    "REFLOOP_DATABASE_URL is not a sqlite:///path or "
                    "postgresql://user:password@host:port/db URL"
                )
            return env_url
        url = make_url(self.database.url)
        secret = self.database.password.read(self.source.parent) if self.database.password else None
        if secret:
            url = url.set(password=secret)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            path = Path(url.database)
            if not path.is_absolute():
                # Relative SQLite paths are relative to the config file, not the cwd.
                url = url.set(database=str((self.source.parent / path).resolve()))
        return url.render_as_string(hide_password=False)

    def resolve(self, path: Path) -> Path:
        """Relative paths in the config are relative to the config file's folder."""
        return path if path.is_absolute() else (self.source.parent / path)

    def port_problems(self) -> list[str]:
        """Listeners (and HTTP) that would fight over one port."""
        wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - comparing, not binding
        seen: list[tuple[str, str, int]] = [("http", self.http.host, self.http.port)]
        seen += [
            (f"mllp.listeners[{i}]", x.host, x.port) for i, x in enumerate(self.mllp.listeners)
        ]
        problems = []
        for n, (key, host, port) in enumerate(seen):
            for other_key, other_host, other_port in seen[:n]:
                same_host = host == other_host or host in wildcard or other_host in wildcard
                if port and port == other_port and same_host:
                    problems.append(
                        f"{self.source}: {key}: port {port} is already used by {other_key}"
                    )
        return problems

    def file_problems(self) -> list[str]:
        """Files the config names that cannot be used: ``file: key.path: problem``."""
        problems: list[str] = []

        def need(key: str, path: Path | None) -> None:
            if path is not None and not self.resolve(path).is_file():
                problems.append(f"{self.source}: {key}: {self.resolve(path)} does not exist")

        for i, listener in enumerate(self.mllp.listeners):
            if listener.tls is None:
                continue
            key = f"mllp.listeners[{i}].tls"
            need(f"{key}.cert_file", listener.tls.cert_file)
            need(f"{key}.key_file", listener.tls.key_file)
            need(f"{key}.client_ca_file", listener.tls.client_ca_file)
            if listener.tls.key_password is not None:
                need(f"{key}.key_password.file", listener.tls.key_password.file)
        if self.database.password is not None and not os.environ.get("REFLOOP_DATABASE_URL"):
            ref = self.database.password
            if not (ref.env and os.environ.get(ref.env)):
                need("database.password.file", ref.file)
        for i, fhir_source in enumerate(self.fhir.sources):
            refs = (("token", fhir_source.token), ("hmac_secret", fhir_source.hmac_secret))
            for key, secret in refs:
                if secret is None or secret.file is None:
                    continue
                if secret.env and os.environ.get(secret.env):
                    continue
                try:
                    secret.read(self.source.parent)
                except ConfigError as exc:
                    problems.append(f"{self.source}: fhir.sources[{i}].{key}.file: {exc}")
        token = self.logging.token_key
        if not (token.env and os.environ.get(token.env)) and token.file is not None:
            path = self.resolve(token.file)
            folder = path.parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if not path.exists() and not os.access(folder, os.W_OK):
                problems.append(
                    f"{self.source}: logging.token_key.file: {path} does not exist and "
                    f"{folder} is not writable; create it or set env {token.env or '...'}"
                )
        return problems


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit or os.environ.get("REFLOOP_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the TOML; every error names the file and the key path."""
    source = config_path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such config file (pass --config FILE or set REFLOOP_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: Path) -> Config:
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if tuple(err["loc"]) == ("channels",) and err["type"] == "value_error":
                # One line per channel problem, each with its own key path.
                text = str(err["msg"]).removeprefix("Value error, ")
                lines += [f"{source}: channels.{p}" for p in text.split("; ")]
            elif not err["loc"] and err["type"] == "value_error":
                # A rule across sections names its own keys.
                lines.append(f"{source}: {str(err['msg']).removeprefix('Value error, ')}")
            else:
                lines.append(f"{source}: {_key_path(err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"
