"""A real FHIR R4 server for tests: SEKMET (PyPI ``sekmet-fhir`` 0.1.1).

SEKMET lives in its own venv at ``.peers/sekmet`` (``make peers`` creates it; its pins
fight ours). Each :meth:`Sekmet.start` runs one ``sekmet serve`` process on 127.0.0.1
with its own data dir and free port, strict validation on write and the order
simulator off, and returns once ``GET /fhir/metadata`` answers. Stop it with
:meth:`SekmetHandle.stop` (or use the handle as a context manager).

What SEKMET does, as proven in /work/shared/reference/PEERS.md section 1: create/update
with ``Location: .../_history/n``, search, history, ``If-Match`` (412 when stale),
``If-None-Exist``, transaction/batch with ``urn:uuid`` references, 400 +
OperationOutcome for invalid resources, rest-hook Subscriptions, and inbound auth:
static bearer tokens and a SMART Backend Services token endpoint (``/auth/token``).

When the venv is missing, call :func:`require_sekmet` first: it skips the test locally
and fails it under ``CI=true`` (CI must run these).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".peers" / "sekmet"
SEKMET = VENV / "bin" / "sekmet"
VERSION = "0.1.1"
START_TIMEOUT = 30.0  # about 1 s when idle; the test machine has two shared cores


def sekmet_available() -> bool:
    return SEKMET.is_file() and os.access(SEKMET, os.X_OK)


def require_sekmet() -> None:
    """Skip the calling test when SEKMET is not installed; under CI=true, fail it."""
    if sekmet_available():
        return
    why = f"SEKMET FHIR server not installed at {SEKMET} (run `make peers`)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires it: {why}", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SekmetHandle:
    """A running SEKMET: its FHIR base, its files, and helpers to read what it stored."""

    base_url: str  # http://127.0.0.1:<port>/fhir
    root_url: str  # http://127.0.0.1:<port> (the SMART token endpoint is root_url/auth/token)
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    bearer: str | None = None  # a token it accepts, when it was started with bearer auth
    _log: Any = field(default=None, repr=False)

    @property
    def token_url(self) -> str:
        return f"{self.root_url}/auth/token"

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client for reading back (close it, or use it in a ``with``)."""
        headers = {"Accept": "application/fhir+json", **kwargs.pop("headers", {})}
        if self.bearer:
            headers.setdefault("Authorization", f"Bearer {self.bearer}")
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10.0, **kwargs)

    def search(self, resource_type: str, params: Mapping[str, str] | None = None) -> list[Any]:
        """The resources a search matches, in creation order."""
        with self.client() as client:
            response = client.get(f"/{resource_type}", params={**(params or {}), "_count": "100"})
            response.raise_for_status()
            bundle = response.json()
        return [
            e["resource"]
            for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"
        ]

    def read(self, reference: str) -> Any:
        """``Type/id`` (or ``Type/id/_history/v``) as stored now."""
        with self.client() as client:
            response = client.get(f"/{reference}")
            response.raise_for_status()
            return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: a clean uvicorn shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> SekmetHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Sekmet:
    @staticmethod
    def start(
        tmp_path: Path,
        *,
        bearer_tokens: Sequence[str] = (),
        smart_clients: Sequence[Mapping[str, Any]] = (),
        token_lifetime: int = 3600,
        settings: Mapping[str, Any] | None = None,
    ) -> SekmetHandle:
        """Start SEKMET with data under ``tmp_path``; ready when this returns.

        ``bearer_tokens`` and ``smart_clients`` (SEKMET ``SmartClient`` tables:
        ``{"client_id", "jwks": {"keys": [...]}, "scopes"}``) turn inbound auth on;
        ``settings`` adds other SEKMET settings.yaml keys."""
        require_sekmet()
        last = ""
        for _ in range(3):  # another process may take the free port before SEKMET binds it
            handle = _launch(
                tmp_path, _free_port(), bearer_tokens, smart_clients, token_lifetime, settings
            )
            try:
                _wait_ready(handle)
                return handle
            except _PortTaken:
                last = handle.log_tail()
                handle.stop()
            except BaseException:
                handle.stop()
                raise
        raise RuntimeError(f"SEKMET could not bind a port:\n{last}")


class _PortTaken(Exception):
    pass


def _launch(
    tmp_path: Path,
    port: int,
    bearer_tokens: Sequence[str],
    smart_clients: Sequence[Mapping[str, Any]],
    token_lifetime: int,
    extra: Mapping[str, Any] | None,
) -> SekmetHandle:
    home = tmp_path / f"sekmet-{port}"
    data = home / "data"
    data.mkdir(parents=True)
    base_url = f"http://127.0.0.1:{port}/fhir"
    types = [t for t, on in (("bearer", bearer_tokens), ("smart", smart_clients)) if on]
    config: dict[str, Any] = {
        "base_url": base_url,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(data),
        "own_private_key_path": str(data / "keys" / "sekmet.pem"),
        "simulator": {"enabled": False},  # it would act on orders we send
        "validation": {"inbound": "strict"},
        "log_inbound": False,
        "server_auth": {
            "types": types or ["none"],
            "tokens": list(bearer_tokens),
            "smart_clients": [dict(c) for c in smart_clients],
            "token_lifetime": token_lifetime,
        },
        **(extra or {}),
    }
    config_path = home / "sekmet.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = home / "sekmet.log"
    log = log_path.open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    process = subprocess.Popen(
        [str(SEKMET), "serve", "--config", str(config_path)],
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return SekmetHandle(
        base_url=base_url,
        root_url=f"http://127.0.0.1:{port}",
        data_dir=data,
        log_path=log_path,
        process=process,
        bearer=bearer_tokens[0] if bearer_tokens else None,
        _log=log,
    )


def _wait_ready(handle: SekmetHandle) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if handle.process.poll() is not None:
                tail = handle.log_tail()
                if "address already in use" in tail.lower():
                    raise _PortTaken
                raise RuntimeError(f"SEKMET exited ({handle.process.returncode}):\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                # /metadata is open even when inbound auth is on.
                if client.get(f"{handle.base_url}/metadata").status_code == 200:
                    return
            time.sleep(0.05)  # polling a condition with a deadline, not synchronising
    raise RuntimeError(f"SEKMET not ready after {START_TIMEOUT} s:\n{handle.log_tail()}")


@contextlib.contextmanager
def running(tmp_path: Path, **kwargs: Any) -> Iterator[SekmetHandle]:
    """``with running(tmp_path) as fhir: ...`` — started, then stopped."""
    handle = Sekmet.start(tmp_path, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()
