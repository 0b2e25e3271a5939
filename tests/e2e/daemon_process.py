"""Run ``refloop run`` as a real subprocess: the way clinic IT runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import MAPPINGS, REFLOOP, free_port, wait_until


def upgrade(config: Path) -> None:
    subprocess.run(
        [str(REFLOOP), "db", "upgrade", "--config", str(config)], check=True, capture_output=True
    )


def write_config(directory: Path, database_url: str, **listener: Any) -> tuple[Path, int, int]:
    mllp_port, http_port = free_port(), free_port()
    opts = "".join(f"{k} = {json.dumps(v)}\n" for k, v in listener.items())
    path = directory / "engine.toml"
    path.write_text(
        f"[database]\nurl = {json.dumps(database_url)}\n\n"
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
        f'[[mllp.listeners]]\nname = "e2e"\nhost = "127.0.0.1"\nport = {mllp_port}\n{opts}\n'
        f'[logging]\nformat = "json"\n\n'
        f"[mappings]\ndir = {json.dumps(str(MAPPINGS))}\n"
    )
    return path, mllp_port, http_port


class DaemonProcess:
    def __init__(self, config: Path, http_port: int, *, log_level: str = "info") -> None:
        self.config, self.http_port = config, http_port
        self.log_path = config.parent / f"daemon-{os.getpid()}-{id(self)}.log"
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.proc = self._spawn(log)
        wait_until(self.ready, timeout=30)
        return self

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(REFLOOP), "run", "--config", str(self.config), "--log-level", self.log_level],
            stdout=log,
            stderr=log,
            env={k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")},
            # Its own process group: a kill takes its children too (render and normaliser
            # processes), as a container or systemd stop would, and leaves no orphans.
            start_new_session=True,
        )

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return (
                httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._kill_group()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._kill_group()

    def _kill_group(self) -> None:
        """What the daemon started and its death left behind (a SIGKILL gives it no
        chance to stop its render and normaliser processes)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
