"""The file channel: each delivery written as one file into a pickup folder.

Theory of operation
-------------------
Pickup folders are read by other programs (an EHR's import job, a fax server, a
scanner of a shared drive) that take whatever file they see. So a file must never be
seen half written: the payload goes to a hidden temporary file in the same folder
(same file system, so the rename is atomic), is flushed and fsynced, then
``os.replace``\\d onto its final name; the folder is fsynced too, so the name survives
a crash. A reader sees no file or the whole file, never a part.

The name comes from the ``filename`` template (``{delivery_id}``, ``{idempotency_key}``,
``{referral_id}``, ``{kind}``, ``{ext}``, with format specs such as
``{delivery_id:08d}``). A retry of the same delivery has the same idempotency key, so it
lands on the same name and replaces the earlier copy: writing twice is writing once.
``metadata["filename"]`` replaces the name's stem (the extension stays); the envelope's
``endpoint`` picks a sub-folder. Both are refused (permanently) when they could leave
the folder or hide the file: no separators in a name, no ``..``, no leading dot.

An unwritable folder, a full disk or a missing folder are the operator's to fix:
retryable. A name the file system refuses is permanent. Reasons name the folder and the
errno, never the file name (``metadata["filename"]`` may be built from patient data).

Files are created 0600 (``mkstemp``): they hold PHI. Blocking I/O runs in a worker
thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import string
import tempfile
from pathlib import Path, PurePosixPath
from typing import ClassVar

from pydantic import Field, field_validator

from channels._common import config_path
from channels.base import (
    FHIR_JSON,
    HL7V2,
    HTML,
    JSON,
    PDF,
    TEXT,
    ChannelContext,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
)

#: File extension per content type (anything else is ``bin``).
EXTENSIONS: dict[str, str] = {
    HL7V2: "hl7",
    FHIR_JSON: "json",
    JSON: "json",
    PDF: "pdf",
    HTML: "html",
    TEXT: "txt",
}

PLACEHOLDERS = ("delivery_id", "idempotency_key", "referral_id", "kind", "ext")
_SAMPLE: dict[str, object] = {
    "delivery_id": 1,
    "idempotency_key": "d3b07384-d9a0-4c2b-8f9e-000000000001",
    "referral_id": "0b7f8e36-0000-4000-8000-000000000001",
    "kind": "packet",
    "ext": "hl7",
}
#: Longest file name most file systems take (bytes).
MAX_NAME_BYTES = 255
_TEMP_PREFIX = ".refloop-"
_TEMP_SUFFIX = ".part"


class FileSettings(ChannelSettings):
    """``[channels.<name>]`` with ``type = "file"``."""

    directory: Path  # relative paths start at the config file's folder
    create: bool = True  # create the folder (and endpoint sub-folders) when missing
    filename: str = Field(default="{delivery_id}-{idempotency_key}.{ext}", min_length=1)
    fsync: bool = True  # flush file and folder to disk before the receipt

    @field_validator("filename")
    @classmethod
    def _template(cls, value: str) -> str:
        for _, name, spec, conversion in string.Formatter().parse(value):
            if name is None:
                continue
            if name not in PLACEHOLDERS or conversion is not None:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValueError(f"unknown placeholder {{{name}}}; use {known}")
            if spec and "{" in spec:
                raise ValueError("nested placeholders are not supported")
        try:
            sample = value.format(**_SAMPLE)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"template does not format: {exc}") from None
        problem = name_problem(sample)
        if problem:
            raise ValueError(f"template makes a bad file name: {problem}")
        return value


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe single file name in a pickup folder, or None."""
    if not name:
        return "empty"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with a dot (hidden, or a parent folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


def subfolder(endpoint: str) -> PurePosixPath:
    """The relative sub-folder an endpoint names; PermanentError when it could escape."""
    # Split the text itself: PurePosixPath would quietly drop "." and empty parts.
    parts = endpoint.split("/")
    if endpoint.startswith("/") or "\\" in endpoint:
        raise PermanentError("endpoint must be a relative sub-folder name")
    if any(part in ("", ".", "..") or name_problem(part) for part in parts):
        raise PermanentError("endpoint must be a sub-folder without '..', hidden or unsafe parts")
    return PurePosixPath(*parts)


class FileChannel:
    """Writes each envelope's payload atomically into a folder (see the module doc)."""

    Settings: ClassVar[type[ChannelSettings]] = FileSettings

    def __init__(self, name: str, settings: FileSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self.directory = config_path(settings.directory, context.base_dir)

    def file_name(self, envelope: Envelope) -> str:
        """The final file name for an envelope; PermanentError when it is not safe."""
        ext = EXTENSIONS.get(envelope.content_type, "bin")
        name = self.settings.filename.format(
            delivery_id=envelope.delivery_id,
            idempotency_key=envelope.idempotency_key,
            referral_id=envelope.referral_id,
            kind=envelope.kind,
            ext=ext,
        )
        if name_problem(name):
            raise PermanentError(f"file name from the template is not safe ({name_problem(name)})")
        stem = envelope.metadata.get("filename", "")
        if stem:
            problem = name_problem(stem)
            if problem:
                raise PermanentError(f"metadata filename is not safe ({problem})")
            suffix = PurePosixPath(name).suffix
            name = stem if not suffix or stem.endswith(suffix) else stem + suffix
            if name_problem(name):
                raise PermanentError(f"metadata filename is not safe ({name_problem(name)})")
        return name

    async def send(self, envelope: Envelope) -> Receipt:
        name = self.file_name(envelope)
        folder = self.directory
        if envelope.endpoint:
            folder = folder / subfolder(envelope.endpoint)
        await asyncio.to_thread(self._write, folder, name, envelope.payload)
        return Receipt(peer_reference=name, detail="file written")

    async def aclose(self) -> None:
        return None

    def _write(self, folder: Path, name: str, payload: bytes) -> None:
        try:
            if self.settings.create:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                raise RetryableError(f"folder {folder} does not exist (create = false)")
            fd, temp = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(payload)
                    if self.settings.fsync:
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(temp, folder / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            if self.settings.fsync:
                _fsync_folder(folder)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if exc.errno == errno.ENAMETOOLONG:
                raise PermanentError(f"file name too long for {folder} ({code})") from None
            why = exc.strerror or type(exc).__name__
            raise RetryableError(f"cannot write into {folder}: {why} ({code})") from None


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable: the new directory entry lives in the folder's data."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
