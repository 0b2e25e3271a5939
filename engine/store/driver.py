"""Constant SQL on a DBAPI connection (psycopg 3 or sqlite3), shared by the hot paths.

The event log and the outbox talk to the driver directly, with statement texts built once:
a variable-length list is one parameter (``= ANY(%s)`` on PostgreSQL, ``json_each(?)`` on
SQLite), timestamps are bound in SQLAlchemy's SQLite storage format there and as aware
datetimes on PostgreSQL, so both read back what the SQLAlchemy tables wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DateTime storage format on SQLite


class DriverQueries:
    """Named statements (``self.sql``) run on one DBAPI connection."""

    sql: dict[str, str]

    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        self.conn = dbapi_connection
        self.sqlite = dialect == "sqlite"
        self.mark = "?" if self.sqlite else "%s"

    def among(self, column: str) -> str:
        """``column`` is one of a list bound as a single parameter."""
        if self.sqlite:
            return f"{column} IN (SELECT value FROM json_each({self.mark}))"
        return f"{column} = ANY({self.mark})"

    def _exec(self, name: str, *params: Any) -> int:
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql[name], params)
            return int(cur.rowcount or 0)
        finally:
            cur.close()

    def _all(self, name: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql[name], params)
            return list(cur.fetchall())
        finally:
            cur.close()

    def _list(self, values: Iterable[Any]) -> Any:
        items = list(values)
        return json.dumps(items) if self.sqlite else items

    def _stamp(self, value: datetime) -> Any:
        if self.sqlite:
            return value.astimezone(UTC).strftime(SQLITE_TIME)
        return value

    def _time(self, value: Any) -> datetime:
        if isinstance(value, str):
            return datetime.strptime(value, SQLITE_TIME).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def _maybe_time(self, value: Any) -> datetime | None:
        return None if value is None else self._time(value)
