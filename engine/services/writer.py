"""The group-commit writer: inbound messages become durable here, before any ACK.

Theory of operation
-------------------
Listeners run on the event loop; the database driver blocks. A single writer thread
owns a database connection and drains a queue of pending messages: everything that is
waiting when it wakes (up to ``max_batch``) goes into ONE transaction — look up
duplicates, insert every row, commit — and only then are the listeners' futures
resolved, so no ACK can precede its commit. Under load, batches grow by themselves and
one fsync covers many messages; when idle, a lone message commits immediately.

If a batch fails, each message is retried alone, so one poisonous row cannot turn its
neighbours' ACKs into NAKs. If the database is down, every waiting message gets the
exception and its listener answers a reject: the sender keeps the message and resends.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import PoolProxiedConnection

from engine.logs import get_logger
from engine.metrics import Metrics
from engine.store.ingest import IngestStore

log = get_logger("refloop.ingest")


@dataclass(frozen=True, slots=True)
class Stored:
    """The writer's answer: the row id, and for a duplicate the original's ACK."""

    message_id: int
    duplicate_of: int | None = None
    original_ack: bytes | None = None


@dataclass(slots=True)
class _Pending:
    row: dict[str, Any]
    window: timedelta
    future: asyncio.Future[Stored]
    loop: asyncio.AbstractEventLoop
    result: Stored | BaseException | None = field(default=None)


_STOP = object()


class StorageUnavailable(Exception):
    """The message could not be committed; it was not stored."""


class GroupCommitWriter:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int = 256) -> None:
        self._engine = engine
        self._metrics = metrics
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._raw: PoolProxiedConnection | None = None
        self._ingest: IngestStore | None = None

    @property
    def depth(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="refloop-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Commit everything already queued, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    async def store(self, row: dict[str, Any], window: timedelta) -> Stored:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Stored] = loop.create_future()
        self._pending += 1
        self._metrics.queue_depth.set(self._pending)
        self._queue.put(_Pending(row, window, fut, loop))
        try:
            return await fut
        finally:
            self._pending -= 1
            self._metrics.queue_depth.set(self._pending)

    # -- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                item = self._queue.get()
                if item is _STOP:
                    break
                batch: list[_Pending] = [item]
                while len(batch) < self._max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stopping = True
                        break
                    batch.append(nxt)
                self._commit_and_answer(batch)
            # Anything queued after the stop marker still gets its commit.
            rest: list[_Pending] = []
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is not _STOP:
                    rest.append(nxt)
            if rest:
                self._commit_and_answer(rest)
        finally:
            self._disconnect()

    def _commit_and_answer(self, batch: list[_Pending]) -> None:
        self._commit(batch)
        # One wake-up of the event loop per batch, not one per message.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for p in batch:
            by_loop.setdefault(p.loop, []).append(p)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, [(p.future, p.result) for p in items])

    def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            self._write(batch)
        except Exception as exc:  # driver errors too: the writer thread must never die
            self._disconnect()
            self._metrics.db_errors.inc()
            if len(batch) > 1:
                log.warning("ingest.commit.batch_failed", size=len(batch), error=type(exc).__name__)
                for one in batch:
                    self._commit([one])
                return
            log.error("ingest.commit.failed", error=type(exc).__name__, detail=_safe(exc))
            batch[0].result = StorageUnavailable(type(exc).__name__)
        else:
            self._metrics.db_commit.observe(time.perf_counter() - started)
            self._metrics.db_batch.observe(len(batch))

    def _store(self) -> IngestStore:
        # The writer keeps one connection: a pool checkout (and its liveness ping) per
        # batch would cost a round trip on every commit. It reconnects after any error.
        if self._ingest is None:
            self._raw = self._engine.raw_connection()
            self._ingest = IngestStore(self._raw.driver_connection, self._engine.dialect.name)
        return self._ingest

    def _disconnect(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate()
        self._raw = None
        self._ingest = None

    def _write(self, batch: list[_Pending]) -> None:
        written = self._store().write([p.row for p in batch], [p.window for p in batch])
        for p, w in zip(batch, written, strict=True):
            p.result = Stored(w.message_id, w.duplicate_of, w.ack)


def _safe(exc: Exception) -> str:
    # Driver messages can quote parameters (message content) in later lines; keep only
    # the first line of the driver's error, which names the failure, not the data.
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).splitlines()
    return lines[0][:200] if lines else type(orig).__name__


def _resolve_all(
    results: list[tuple[asyncio.Future[Stored], Stored | BaseException | None]],
) -> None:
    for fut, result in results:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        elif result is None:
            fut.set_exception(StorageUnavailable("not committed"))
        else:
            fut.set_result(result)
