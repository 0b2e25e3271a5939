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

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from engine.logs import get_logger
from engine.metrics import Metrics
from engine.store.messages import Original, find_originals, insert_messages

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
        self._conn: Connection | None = None

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
        except SQLAlchemyError as exc:
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

    def _connection(self) -> Connection:
        # The writer keeps one connection: a pool checkout (and its liveness ping) per
        # batch would cost a round trip on every commit. It reconnects after any error.
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None

    def _write(self, batch: list[_Pending]) -> None:
        keys = [p.row["dedup_key"] for p in batch if p.row["dedup_key"]]
        conn = self._connection()
        with conn.begin():
            originals: dict[str, Original] = {}
            if keys:
                oldest = min(p.row["received_at"] - p.window for p in batch)
                originals = find_originals(conn, keys, oldest)
            firsts: list[_Pending] = []
            repeats: list[tuple[_Pending, _Pending | Original]] = []
            seen: dict[str, _Pending] = {}
            for p in batch:
                key = p.row["dedup_key"]
                orig = originals.get(key) if key else None
                if orig is not None and orig.received_at >= p.row["received_at"] - p.window:
                    repeats.append((p, orig))
                elif key and key in seen:
                    repeats.append((p, seen[key]))
                else:
                    if key:
                        seen[key] = p
                    firsts.append(p)
            ids = insert_messages(conn, [p.row for p in firsts])
            for p, new_id in zip(firsts, ids, strict=True):
                p.result = Stored(new_id)
            if repeats:
                rows = []
                for p, first in repeats:
                    if isinstance(first, Original):
                        orig_id, orig_ack, orig_sha = first.id, first.ack, first.payload_sha256
                    else:
                        assert isinstance(first.result, Stored)
                        orig_id, orig_ack = first.result.message_id, first.row["ack"]
                        orig_sha = first.row["payload_sha256"]
                    row = dict(p.row)
                    row.update(
                        status="duplicate",
                        dedup_key=None,
                        duplicate_of=orig_id,
                        ack=orig_ack,
                        ack_code=_ack_code(orig_ack),
                    )
                    if orig_sha != row["payload_sha256"]:
                        row["error"] = (
                            f"same sender and MSH-10 as message {orig_id} but different content"
                        )
                    rows.append(row)
                    p.row = row
                dup_ids = insert_messages(conn, rows)
                for (p, _orig), new_id in zip(repeats, dup_ids, strict=True):
                    p.result = Stored(new_id, p.row["duplicate_of"], p.row["ack"])


def _ack_code(ack: bytes | None) -> str | None:
    if not ack:
        return None
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            return segment[4:6].decode("ascii", "replace")
    return None


def _safe(exc: SQLAlchemyError) -> str:
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
