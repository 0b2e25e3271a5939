"""The group-commit writer: inbound messages become durable here, before any ACK.

Theory of operation
-------------------
Listeners run on the event loop; the database driver blocks. Writer threads, each with
its own database connection, drain a queue of pending messages: everything that is
waiting when one wakes (up to ``max_batch``) goes into ONE transaction (see
:mod:`engine.store.ingest`) and only then are the listeners' futures resolved, so no
ACK can precede its commit. Under load, batches grow by themselves and
one fsync covers many messages; when idle, a lone message commits immediately.

If the database refuses a row (a data or integrity error), the batch's messages are
retried one by one, so one poisonous row cannot turn its neighbours' ACKs into NAKs. A
connection error gets one retry on a fresh connection (the server may have dropped an
idle one); if that fails too, the whole batch is answered with a reject at once and the
senders resend later — never one timeout per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import PoolProxiedConnection

from engine.logs import get_logger
from engine.metrics import Metrics
from engine.protocol.ack import next_control_id
from engine.protocol.fhir import fhir_conflict
from engine.services.intake import conflict_answer
from engine.store.ingest import ConflictCheck, IngestStore, Written
from engine.store.schema import is_fhir_message

log = get_logger("refloop.ingest")


#: The writer's answer for one message (see :class:`engine.store.ingest.Written`).
Stored = Written


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


class _Lane:
    """One writer thread's database connection, opened lazily, dropped after any error.

    A lane keeps its connection: a pool checkout (and its liveness ping) per batch
    would cost a round trip on every commit.
    """

    def __init__(self, engine: Engine, conflict: ConflictCheck) -> None:
        self._engine = engine
        self._conflict = conflict
        self._raw: PoolProxiedConnection | None = None
        self._store: IngestStore | None = None

    def is_data_error(self, exc: BaseException) -> bool:
        """The database refused this data (a constraint, a value), not the connection."""
        dbapi = self._engine.dialect.dbapi
        kinds = tuple(
            k
            for k in (getattr(dbapi, "DataError", None), getattr(dbapi, "IntegrityError", None))
            if isinstance(k, type)
        )
        return bool(kinds) and isinstance(exc, kinds)

    @property
    def connected(self) -> bool:
        """True when the next batch reuses a connection opened for an earlier one."""
        return self._store is not None

    def store(self) -> IngestStore:
        if self._store is None:
            self._raw = self._engine.raw_connection()
            self._store = IngestStore(
                self._raw.driver_connection, self._engine.dialect.name, self._conflict
            )
        return self._store

    def drop(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate()
        self._raw = None
        self._store = None


class GroupCommitWriter:
    """``lanes`` writer threads drain one queue. On PostgreSQL more than one lane lets a
    batch be built and sent while another waits for its commit to reach disk; SQLite
    has a single write lock, so it gets one lane. Messages from one MLLP connection are
    sequential (each waits for its ACK), so lanes never reorder a connection's stream.
    """

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch: int = 256,
        lanes: int = 1,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        # Called from the writer thread after each successful commit (wakes the normaliser).
        self._on_commit = on_commit
        self._metrics = metrics
        self._max_batch = max_batch
        self._lanes = max(1, lanes)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0
        metrics.queue_depth.set_function(lambda: self._pending)

    def start(self) -> None:
        for n in range(self._lanes):
            thread = threading.Thread(
                target=self._run,
                args=(_Lane(self._engine, _conflict_check),),
                name=f"refloop-writer-{n}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Commit everything already queued, then stop the threads."""
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    async def store(self, row: dict[str, Any], window: timedelta) -> Stored:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Stored] = loop.create_future()
        self._pending += 1
        self._queue.put(_Pending(row, window, fut, loop))
        try:
            return await fut
        finally:
            self._pending -= 1

    # -- the writer threads ----------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
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
                self._commit_and_answer(lane, batch)
            # Anything queued after the stop marker still gets its commit. Other lanes'
            # stop markers go back in the queue for them.
            rest: list[_Pending] = []
            markers = 0
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    markers += 1
                else:
                    rest.append(nxt)
            for _ in range(markers):
                self._queue.put(_STOP)
            if rest:
                self._commit_and_answer(lane, rest)
        finally:
            lane.drop()

    def _commit_and_answer(self, lane: _Lane, batch: list[_Pending]) -> None:
        self._commit(lane, batch)
        # One wake-up of the event loop per batch, not one per message.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for p in batch:
            by_loop.setdefault(p.loop, []).append(p)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, [(p.future, p.result) for p in items])

    def _commit(self, lane: _Lane, batch: list[_Pending], *, fresh: bool = False) -> None:
        started = time.perf_counter()
        reused = lane.connected
        try:
            written = lane.store().write([p.row for p in batch], [p.window for p in batch])
        except Exception as exc:  # driver errors too: a writer thread must never die
            lane.drop()
            self._metrics.db_errors.inc()
            data_error = lane.is_data_error(exc)
            if reused and not fresh and not data_error:
                # The server may have dropped an idle connection (restart, failover): try
                # once more on a new one before answering a reject. A commit that did land
                # before the error is caught by the duplicate check.
                log.warning("ingest.commit.reconnecting", error=type(exc).__name__)
                self._commit(lane, batch, fresh=True)
                return
            if data_error and len(batch) > 1:
                # One row the database refuses must not turn its neighbours' ACKs into
                # NAKs. Only for data errors: when the database is down or hanging,
                # retrying row by row would make every sender wait for each timeout.
                log.warning("ingest.commit.batch_failed", size=len(batch), error=type(exc).__name__)
                for one in batch:
                    self._commit(lane, [one], fresh=True)
                return
            log.error(
                "ingest.commit.failed",
                size=len(batch),
                error=type(exc).__name__,
                detail=_safe(exc),
            )
            for p in batch:
                p.result = StorageUnavailable(type(exc).__name__)
            return
        for p, w in zip(batch, written, strict=True):
            p.result = w
        self._metrics.db_commit.observe(time.perf_counter() - started)
        self._metrics.db_batch.observe(len(batch))
        if self._on_commit is not None:
            self._on_commit()


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


def _conflict_check(row: dict[str, Any], original_raw: bytes, original_id: int) -> Any:
    # A FHIR resend is judged by FHIR's rules (same version, same content), an HL7 one by
    # its content without MSH-7.
    if is_fhir_message(row.get("message_type")):
        return fhir_conflict(row, original_raw, original_id)
    return conflict_answer(row, original_raw, original_id, control_id=next_control_id())
