"""Plumbing every kind of channel shares: files named in the config, and the TLS trust
they build from a ``ca_file``.

Paths in a ``[channels.<name>]`` table are relative to the config file's folder
(:attr:`~channels.base.ChannelContext.base_dir`), wherever the daemon was started.

:func:`ca_context` builds the client context that trusts the CAs of one PEM file *instead
of* the system store (a private gateway or relay CA). A file it cannot load raises
:class:`CaFileError` with the resolved path and the OS or OpenSSL error: each channel
words that its own way and decides whether it is a configuration error at start or a
permanent delivery error.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def config_path(path: Path, base: Path) -> Path:
    """``path`` as the config means it: a relative one starts at ``base`` (the config
    file's folder). Pure."""
    return path if path.is_absolute() else base / path


class CaFileError(Exception):
    """``ca_file`` cannot be loaded. ``path`` is the resolved file, ``cause`` the error
    (an :class:`OSError` or :class:`ssl.SSLError`); neither holds the file's content."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(f"cannot load {path}")
        self.path = path
        self.cause = cause


def ca_context(ca_file: Path | None, base: Path) -> ssl.SSLContext:
    """A client TLS context (hostname and certificate checked) that trusts only the CAs in
    ``ca_file`` (relative to ``base``), or the system store when it is None."""
    if ca_file is None:
        return ssl.create_default_context()
    path = config_path(ca_file, base)
    try:
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise CaFileError(path, exc) from None


__all__ = ["CaFileError", "ca_context", "config_path"]
