"""The normaliser in its own OS process, beside the daemon (the default).

Why a process: ingest and normalisation are both Python, and one interpreter runs
Python on one core at a time. In one process, normalising a burst halves the rate at
which the listeners can store and acknowledge; in two, each gets a core, and a sender
never waits for a mapping.

The daemon (parent) spawns a fresh interpreter that runs :class:`NormaliserWorker`
exactly as the in-process mode does, on its own database connection. Two pipes join them:

* parent → child, single bytes: ``w`` a commit happened (wake up), ``r`` reload the
  mapping set now (SIGHUP), ``s`` finish the batch in hand and exit. End of file (the
  daemon died) also means exit: an orphan never normalises on its own.
* child → parent: the Prometheus text of the referral-core metrics, once a second,
  which the daemon's ``/metrics`` serves in place of its own (zero) copies; and the
  single byte ``o`` after a batch committed, so the daemon's dispatcher looks at the
  outbox at once instead of at its next poll.

If the child dies, the daemon logs it and starts another after a back-off; messages it
had not finished are still ``received`` in the store, so nothing is lost. Two
normalisers never interleave: the event log takes a database-level turn (advisory lock
on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) for every batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from engine.config import Config
from engine.logs import get_logger
from engine.metrics import REFERRAL_CORE_FAMILIES, Metrics, select_families

log = get_logger("refloop.normaliser.process")

WAKE, RELOAD, STOP = b"w", b"r", b"s"
OUTBOX = b"o"
REPORT_SECONDS = 1.0
STOP_SECONDS = 30.0


class NormaliserProcess:
    """Parent side: start, wake, reload, stop and supervise the child."""

    MAX_BACKOFF = 30.0

    def __init__(self, config: Config) -> None:
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._wake_w: Connection | None = None
        self._report_r: Connection | None = None
        self._reader: threading.Thread | None = None
        self._metrics_text = b""
        self.on_outbox: Callable[[], None] | None = None  # called from the reader thread
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0

    # -- control -------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name="refloop-normaliser-supervisor"
        )

    def _spawn(self) -> None:
        wake_r, wake_w = self._ctx.Pipe(duplex=False)
        report_r, report_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=child_main,
            args=(self.config, wake_r, report_w),
            name="refloop-normaliser",
            daemon=False,
        )
        process.start()
        # The child holds its own copies; ours would keep the pipes open after it exits.
        wake_r.close()
        report_w.close()
        os.set_blocking(wake_w.fileno(), False)
        self._process, self._wake_w, self._report_r = process, wake_w, report_r
        self._reader = threading.Thread(
            target=self._read_reports, args=(report_r,), name="refloop-normaliser-metrics"
        )
        self._reader.daemon = True
        self._reader.start()
        log.info("normaliser.process.started", pid=process.pid)

    def wake_threadsafe(self) -> None:
        """After each commit (writer thread): one byte, dropped if the pipe is full —
        a full pipe already holds more wake-ups than the child needs."""
        self._send(WAKE)

    def request_reload(self) -> None:
        self._send(RELOAD)

    def _send(self, signal_byte: bytes) -> None:
        conn = self._wake_w
        if conn is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(conn.fileno(), signal_byte)

    async def stop(self) -> None:
        """Let the child finish its batch and exit; what is still ``received`` waits for
        the next start."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        process = self._process
        if process is None:
            return
        self._send(STOP)
        await asyncio.to_thread(process.join, STOP_SECONDS)
        if process.is_alive():
            log.error("normaliser.process.stop_timeout", pid=process.pid)
            process.terminate()
            await asyncio.to_thread(process.join, 5.0)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for conn in (self._wake_w, self._report_r):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        self._wake_w = self._report_r = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    # -- supervision and metrics ------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 0.5
        started = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.2)
            process = self._process
            if process is None or process.is_alive():
                continue
            # A child that keeps dying waits longer each time; one that ran a while
            # starts the count again.
            backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, self.MAX_BACKOFF)
            log.error(
                "normaliser.process.died",
                pid=process.pid,
                exitcode=process.exitcode,
                restart_in_seconds=backoff,
            )
            self._close_pipes()
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            self.restarts += 1
            self._spawn()
            started = time.monotonic()

    def _read_reports(self, conn: Connection) -> None:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if data == OUTBOX:
                if self.on_outbox is not None:
                    self.on_outbox()
            else:
                self._metrics_text = data

    def metrics_text(self) -> bytes:
        """The child's referral-core metrics, as last reported (empty before the first)."""
        return self._metrics_text


# -- the child ---------------------------------------------------------------------------


def child_main(config: Config, wake: Connection, report: Connection) -> None:
    """Entry point of the spawned process."""
    # Ctrl-C reaches the whole process group; the daemon decides when its child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.edges.cli_common import setup_logging

    with contextlib.suppress(Exception):
        setup_logging(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child(config, wake, report))


async def _child(config: Config, wake: Connection, report: Connection) -> None:
    from engine.edges.daemon import load_mappings, prepare_database
    from engine.services.normaliser import NormaliserWorker, sources_from

    metrics = Metrics()
    mappings = await asyncio.to_thread(load_mappings, config, metrics)
    engine = await asyncio.to_thread(prepare_database, config)
    worker = NormaliserWorker(
        engine,
        mappings,
        metrics,
        sources_from(config.mllp.listeners, config.fhir.sources),
        config.normalizer,
        reload_seconds=config.mappings.reload_seconds,
        share_cpu=False,  # this process has no listeners to yield to
    )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    threading.Thread(target=_read_commands, args=(wake, worker, loop, done), daemon=True).start()
    worker.on_batch = lambda: _send(report, OUTBOX)
    worker.start()
    log.info("normaliser.process.ready", mappings=mappings.current.digest)
    try:
        while not done.is_set():
            _report(report, metrics)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_SECONDS):
                    await done.wait()
    finally:
        await worker.stop()
        _report(report, metrics)
        engine.dispose()
        log.info("normaliser.process.stopped")


def _read_commands(
    wake: Connection, worker: Any, loop: asyncio.AbstractEventLoop, done: asyncio.Event
) -> None:
    fd = wake.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data or STOP in data:
            # The daemon asked us to stop, or it is gone (end of file).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done.set)
            return
        if RELOAD in data:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(worker.request_reload)
        if WAKE in data:
            worker.wake_threadsafe()


def _send(conn: Connection, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send_bytes(data)


def _report(conn: Connection, metrics: Metrics) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send_bytes(select_families(metrics.exposition(), REFERRAL_CORE_FAMILIES))
