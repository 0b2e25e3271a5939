"""The ingest hot path: commit a batch of inbound messages and recognise duplicates.

Theory of operation
-------------------
Accepted messages carry ``dedup_key`` = sha256(MSH-3, MSH-4, MSH-10), and a partial
UNIQUE index covers the non-null keys. A batch is written with
``INSERT … ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING``: in the
common case (no duplicates) that is the whole transaction — one statement and one
commit, whatever the batch size. A row that conflicts (a resend, possibly from the
same batch, possibly from another replica committing at the same moment: the index
serialises them) takes the slow path:

* the original is within the listener's duplicate window → the row is stored with
  status ``duplicate``, no key, ``duplicate_of`` the original, and the original's ACK;
* the original is older than the window → it gives up its key and the row is stored
  as a new accepted message.

This module talks to the driver directly with constant SQL: SQLAlchemy's per-statement
work and its variable-length multi-VALUES inserts (which defeat the driver's statement
cache) cost more than the commit itself. Column order is the table's, and
``tests/integration/test_migrations.py`` keeps table and migrations in step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.store.schema import NORMALISER_COLUMNS, is_fhir_message, messages

COLUMNS = [c.name for c in messages.columns if c.name != "id" and c.name not in NORMALISER_COLUMNS]
_TIME = COLUMNS.index("received_at")
_KEY = COLUMNS.index("dedup_key")
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DateTime storage format on SQLite


@dataclass(frozen=True, slots=True)
class Written:
    """What happened to one row of the batch."""

    message_id: int
    duplicate_of: int | None = None
    ack: bytes | None = None  # for a duplicate: the original's ACK; for a conflict: the NAK
    conflict_with: int | None = None  # same key, different content: rejected


#: (row, original raw, original id) -> row updates when the resend is a conflict, else None.
ConflictCheck = Callable[[dict[str, Any], bytes, int], dict[str, Any] | None]


class IngestStore:
    """Writes batches on one DBAPI connection (psycopg 3 or sqlite3)."""

    def __init__(self, dbapi_connection: Any, dialect: str, conflict: ConflictCheck) -> None:
        self.conn = dbapi_connection
        self._conflict = conflict
        self.sqlite = dialect == "sqlite"
        mark = "?" if self.sqlite else "%s"
        cols = ", ".join(COLUMNS)
        values = ", ".join([mark] * len(COLUMNS))
        self._insert = f"INSERT INTO messages ({cols}) VALUES ({values}) RETURNING id"
        self._insert_new = (
            f"INSERT INTO messages ({cols}) VALUES ({values}) "
            "ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING RETURNING id"
        )
        self._original = (
            "SELECT id, received_at, ack, ack_code, "
            f"CASE WHEN payload_sha256 = {mark} THEN NULL ELSE raw END "
            f"FROM messages WHERE dedup_key = {mark}"
        )
        self._release_key = f"UPDATE messages SET dedup_key = NULL WHERE id = {mark}"

    def write(self, rows: Sequence[dict[str, Any]], windows: Sequence[timedelta]) -> list[Written]:
        """Insert ``rows`` (dicts of ``messages`` columns) in ONE transaction.

        Rows may be updated in place (a duplicate's status, ack and key). Raises the
        driver's exception after rolling back; nothing of the batch is then stored.
        """
        try:
            out = self._write(rows, windows)
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()
        return out

    def _write(self, rows: Sequence[dict[str, Any]], windows: Sequence[timedelta]) -> list[Written]:
        cur = self.conn.cursor()
        try:
            ids = self._insert_all(cur, rows)
            out: list[Written] = []
            for row, window, new_id in zip(rows, windows, ids, strict=True):
                out.append(
                    Written(new_id) if new_id is not None else self._resend(cur, row, window)
                )
            return out
        finally:
            cur.close()

    def _insert_all(self, cur: Any, rows: Sequence[dict[str, Any]]) -> list[int | None]:
        params = [self._params(row) for row in rows]
        if self.sqlite:
            # In-process: one statement per row costs microseconds.
            ids: list[int | None] = []
            for p in params:
                cur.execute(self._insert_new if p[_KEY] else self._insert, p)
                got = cur.fetchone()
                ids.append(int(got[0]) if got else None)
            return ids
        cur.executemany(self._insert_new, params, returning=True)
        ids = []
        while True:
            got = cur.fetchone()
            ids.append(int(got[0]) if got else None)
            if not cur.nextset():
                break
        return ids

    def _resend(self, cur: Any, row: dict[str, Any], window: timedelta) -> Written:
        # The original's raw body is only fetched when the digests differ: an exact
        # resend needs no content comparison.
        cur.execute(self._original, (row["payload_sha256"], row["dedup_key"]))
        orig_id, received_at, ack, ack_code, raw = cur.fetchone()
        orig_id, ack = int(orig_id), bytes(ack) if ack else None
        if self._time(received_at) < row["received_at"] - window:
            # Older than this listener's window: the key now belongs to the new message.
            cur.execute(self._release_key, (orig_id,))
            cur.execute(self._insert, self._params(row))
            return Written(int(cur.fetchone()[0]))
        updates = self._conflict(row, bytes(raw), orig_id) if raw is not None else None
        if updates is not None:
            row.update(updates, dedup_key=None, duplicate_of=orig_id)
            cur.execute(self._insert, self._params(row))
            return Written(int(cur.fetchone()[0]), None, row["ack"], orig_id)
        row.update(status="duplicate", dedup_key=None, duplicate_of=orig_id, ack=ack)
        row["ack_code"] = ack_code
        if raw is not None:
            row["error"] = (
                f"a resend of message {orig_id}"
                if is_fhir_message(row.get("message_type"))
                else f"a resend of message {orig_id} with a new MSH-7"
            )
        cur.execute(self._insert, self._params(row))
        return Written(int(cur.fetchone()[0]), orig_id, ack)

    def _params(self, row: dict[str, Any]) -> list[Any]:
        # Optional columns (headers: FHIR writes only) default to NULL.
        values: list[Any] = [row.get(c) for c in COLUMNS]
        if self.sqlite:
            values[_TIME] = row["received_at"].astimezone(UTC).strftime(_SQLITE_TIME)
        return values

    def _time(self, value: Any) -> datetime:
        if isinstance(value, str):
            return datetime.strptime(value, _SQLITE_TIME).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value if value.tzinfo else value.replace(tzinfo=UTC)
