"""Who is calling the FHIR endpoints: per-source credentials and CIDR allow-lists.

EHRs post to one base URL, so a REST request names no source: the credential does. Each
source's bearer token is compared with the presented one (in constant time, every
source every time, so timing tells nothing about which or how many); the one that
matches is the source, and then its ``allowed_cidrs`` must hold the client address.
Sources that sign (``hmac_secret``) present ``X-Hub-Signature: sha256=<hex of
HMAC-SHA256(secret, body)>`` instead, checked the same way over the raw body before it
is parsed.

Every credential failure gets the same 401 (missing header, wrong scheme, unknown token,
bad signature: no hint which); an address outside the list gets 403. Secrets are read
once, when :class:`FhirAuth` is built, so an unreadable secret file stops the start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from starlette.responses import JSONResponse, Response

from engine.config import Config, ConfigError, FhirSourceConfig
from engine.logs import get_logger
from engine.protocol.fhir import FHIR_JSON, Issue, operation_outcome

log = get_logger("refloop.fhir")

Verdict = Literal["ok", "unauthorized", "forbidden"]
SIGNATURE_HEADERS = ("x-hub-signature-256", "x-hub-signature")

_UNAUTHORIZED = operation_outcome(
    [Issue("error", "login", "authentication failed: present this source's credential")]
)
_FORBIDDEN = operation_outcome(
    [Issue("error", "forbidden", "this client may not call this endpoint")]
)


def unauthorized() -> Response:
    """The one 401 answer, whatever failed."""
    return JSONResponse(
        _UNAUTHORIZED,
        status_code=401,
        media_type=FHIR_JSON,
        headers={"WWW-Authenticate": 'Bearer realm="refloop"'},
    )


def forbidden() -> Response:
    return JSONResponse(_FORBIDDEN, status_code=403, media_type=FHIR_JSON)


@dataclass(frozen=True, slots=True)
class _Credential:
    source: FhirSourceConfig
    token_digest: bytes | None  # sha256 of the token: equal lengths for compare_digest
    hmac_key: bytes | None


class FhirAuth:
    """The FHIR sources of a config and their secrets, read once."""

    def __init__(self, sources: Sequence[FhirSourceConfig], base_dir: Path) -> None:
        self._creds: list[_Credential] = []
        seen: dict[tuple[str, bytes], str] = {}
        for source in sources:
            token = source.token.read(base_dir) if source.token else None
            secret = source.hmac_secret.read(base_dir) if source.hmac_secret else None
            digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None
            key = secret.encode("utf-8") if secret else None
            for kind, value in (("token", digest), ("hmac_secret", key)):
                if value is None:
                    continue
                if (kind, value) in seen:
                    # Which source sent it would be a guess: the credential IS the identity.
                    raise ConfigError(
                        f"fhir.sources: {seen[kind, value]} and {source.name} have the same "
                        f"{kind}; each source needs its own"
                    )
                seen[kind, value] = source.name
            if digest is None and key is None:
                log.warning("fhir.source.no_credential", source=source.name)
            self._creds.append(_Credential(source, digest, key))

    @classmethod
    def from_config(cls, config: Config) -> FhirAuth:
        return cls(config.fhir.sources, config.source.parent)

    @property
    def sources(self) -> tuple[FhirSourceConfig, ...]:
        return tuple(c.source for c in self._creds)

    def source_for(self, name: str) -> FhirSourceConfig | None:
        return next((c.source for c in self._creds if c.source.name == name), None)

    def signature_body_limit(self) -> int:
        """How much body to read before a signature can be checked (0: nobody signs)."""
        return max((c.source.max_body_bytes for c in self._creds if c.hmac_key), default=0)

    def by_bearer(self, headers: Mapping[str, str]) -> FhirSourceConfig | None:
        """The source whose token the request presents, if any."""
        token = bearer_token(headers)
        if token is None:
            return None
        presented = _presented_digest(token)
        found = None
        for cred in self._creds:
            # No early exit: every source costs the same comparison.
            if cred.token_digest is not None and hmac.compare_digest(presented, cred.token_digest):
                found = found or cred.source
        return found

    def by_signature(self, headers: Mapping[str, str], body: bytes) -> FhirSourceConfig | None:
        """The source whose HMAC secret signed ``body``, if any."""
        signature = signature_hex(headers)
        if signature is None:
            return None
        found = None
        for cred in self._creds:
            if cred.hmac_key is not None and _signed(cred.hmac_key, body, signature):
                found = found or cred.source
        return found

    def identify(
        self, headers: Mapping[str, str], client_ip: str, body: bytes | None = None
    ) -> tuple[Verdict, FhirSourceConfig | None]:
        """A REST request: the source its credential names, then that source's CIDRs.
        ``body`` (when read) lets a signed request identify its source."""
        source = self.by_bearer(headers)
        if source is None and body is not None:
            source = self.by_signature(headers, body)
        if source is None:
            return "unauthorized", None
        if not allowed(source, client_ip):
            return "forbidden", source
        return "ok", source

    def check(
        self, source: FhirSourceConfig, headers: Mapping[str, str], body: bytes, client_ip: str
    ) -> Verdict:
        """A request for a named source (notifications): its token or its signature."""
        cred = next((c for c in self._creds if c.source.name == source.name), None)
        if cred is None:
            return "unauthorized"
        ok = False
        token = bearer_token(headers)
        if token is not None and cred.token_digest is not None:
            presented = _presented_digest(token)
            ok = hmac.compare_digest(presented, cred.token_digest)
        signature = signature_hex(headers)
        if not ok and signature is not None and cred.hmac_key is not None:
            ok = _signed(cred.hmac_key, body, signature)
        if not ok:
            return "unauthorized"
        return "ok" if allowed(source, client_ip) else "forbidden"


def allowed(source: FhirSourceConfig, client_ip: str) -> bool:
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in source.networks())


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (Starlette's Headers are; a plain dict is not)."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lower), None)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = header(headers, "authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def signature_hex(headers: Mapping[str, str]) -> str | None:
    for name in SIGNATURE_HEADERS:
        value = header(headers, name)
        if value:
            algorithm, _, hexdigest = value.strip().partition("=")
            if algorithm.lower() == "sha256" and hexdigest:
                return hexdigest.strip().lower()
            return None
    return None


def _presented_digest(token: str) -> bytes:
    # surrogateescape: a presented value holding lone surrogates still hashes (and then
    # does not match) instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _signed(key: bytes, body: bytes, signature: str) -> bool:
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii", "replace"))
