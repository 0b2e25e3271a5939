"""Structured logging (structlog): JSON lines by default, a console renderer on a TTY.

PHI never reaches a log line. Fields whose names say they identify a patient are
replaced by keyed HMAC tokens (stable across restarts with the same key, useless
without it); message bodies are never logged at all. Event names are stable,
dotted, lower-case: ``mllp.listener.started``, ``ingest.commit.failed``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

#: Log keys whose values are patient identifiers; they are tokenised, never printed.
PHI_KEYS = frozenset(
    {
        "patient",
        "patient_id",
        "mrn",
        "name",
        "patient_name",
        "dob",
        "birth_date",
        "ssn",
        "phone",
        "address",
        "email",
    }
)


class Tokenizer:
    """Keyed HMAC tokens for identifiers: ``tok_`` + 16 hex chars."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, value: object) -> str:
        digest = hmac.new(self._key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
        return f"tok_{digest[:16]}"


def load_token_key(env: str | None, path: Path | None) -> bytes:
    """The HMAC key: from the environment, else from a file (created 0600 if missing)."""
    if env and os.environ.get(env):
        return os.environ[env].encode("utf-8")
    if path is None:
        return secrets.token_bytes(32)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode("utf-8")


def _redactor(tokenize: Tokenizer) -> Any:
    def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        for key in PHI_KEYS.intersection(event):
            event[key] = tokenize(event[key])
        return event

    return redact


def configure(
    *,
    level: str = "info",
    fmt: str = "auto",
    tokenizer: Tokenizer | None = None,
    stream: TextIO | None = None,
) -> None:
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redactor(tokenizer or Tokenizer(secrets.token_bytes(32))),
    ]
    if not console:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    # Libraries (uvicorn, asyncio, alembic) log through stdlib: keep them quiet and
    # on the same stream, without message content.
    logging.basicConfig(
        level=logging.WARNING, stream=out, format="%(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("uvicorn.access").disabled = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
