"""A throw-away PostgreSQL cluster that a test owns and can stop and start at will.

The shared test database (``REFLOOP_TEST_DATABASE_URL``) cannot be taken down by a test,
so outage tests initdb their own cluster in a temporary directory: 127.0.0.1 only, on a
free port, Unix socket in that directory, trust authentication. PostgreSQL refuses to
run as root, so under root the server runs as the ``postgres`` OS user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.helpers import free_port

_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates: list[str] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10
            )
            candidates.append(out.stdout.strip())
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(str(Path(pg_ctl).resolve().parent))

    def version(path: str) -> tuple[int, ...]:
        try:
            return (int(Path(path).parent.name),)
        except ValueError:
            return (0,)

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for c in candidates:
        if c and all(os.access(Path(c, t), os.X_OK) for t in _TOOLS):
            return Path(c)
    return None


def unavailable() -> str | None:
    """None when a private cluster can be started here, else why not."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via pg_config, "
            "PATH or /usr/lib/postgresql/*/bin"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' OS user to run PostgreSQL as"
    return None


class PgCluster:
    """``start()``/``stop()`` the same cluster (same data, same port) as often as needed."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are mode 0700 and owned by root, and
        # the server (running as postgres) must reach its data and socket directory.
        self.root = Path(tempfile.mkdtemp(prefix="refloop-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/refloop"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        cmd = [*self._as, str(self.bindir / tool), *args]
        done = subprocess.run(
            cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"server log:\n{self.server_log()}"
            )

    def init(self) -> PgCluster:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.start()
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE refloop")
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "30",
            "-o",
            opts,
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown, clients disconnected; ``immediate``: like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server if it runs (whatever our bookkeeping says) and delete everything."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
