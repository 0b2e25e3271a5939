"""HL7 v2 datatypes a mapping reads through typed readers, and the TS/DTM time format.

Only what referral traffic needs: the composite fields of the segments in STANDARDS §2
(v2.3-v2.5.1 datatypes; CE and CWE share their first three components, so they are one
entry). A typed reader uses this table to know where an identifier's namespace sits
(EI.2, CX.4, XCN.9 differ), and the mapping loader uses it to refuse a plain read of a
composite field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

#: (segment, field) → datatype. Fields not listed are treated as primitives unless the
#: path reads a component.
FIELD_TYPES: dict[tuple[str, int], str] = {
    **{("PID", n): "CX" for n in (2, 3, 4, 18, 21)},
    ("PID", 5): "XPN",
    ("PID", 9): "XPN",
    ("PID", 6): "XPN",
    ("PID", 7): "TS",
    ("PID", 29): "TS",
    ("MRG", 1): "CX",
    ("PV1", 19): "CX",
    **{("PV1", n): "XCN" for n in (7, 8, 9, 17)},
    **{("ORC", n): "EI" for n in (2, 3, 4)},
    ("ORC", 9): "TS",
    ("ORC", 15): "TS",
    **{("ORC", n): "XCN" for n in (10, 11, 12, 19)},
    **{("ORC", n): "CE" for n in (16, 30)},
    ("ORC", 21): "XON",
    **{("OBR", n): "EI" for n in (2, 3)},
    ("OBR", 4): "CE",
    **{("OBR", n): "TS" for n in (6, 7, 8, 14, 22, 36)},
    **{("OBR", n): "XCN" for n in (16, 28)},
    ("OBR", 31): "CE",
    ("OBR", 32): "NDL",
    ("OBX", 3): "CE",
    ("OBX", 14): "TS",
    ("OBX", 16): "XCN",
    **{("SCH", n): "EI" for n in (1, 2, 4, 23, 24, 26, 27)},
    **{("SCH", n): "CE" for n in (6, 7, 8, 25)},
    ("SCH", 11): "TQ",
    **{("SCH", n): "XCN" for n in (12, 16, 20)},
    ("AIS", 3): "CE",
    ("AIS", 4): "TS",
    ("AIS", 8): "CE",
    ("AIG", 3): "CE",
    ("AIL", 3): "PL",
    ("AIP", 3): "XCN",
    ("AIP", 4): "CE",
    ("AIP", 6): "TS",
    **{("RF1", n): "CE" for n in (1, 2, 3, 4, 5, 10)},
    **{("RF1", n): "EI" for n in (6, 11)},
    **{("RF1", n): "TS" for n in (7, 8, 9)},
    ("PRD", 1): "CE",
    ("PRD", 2): "XPN",
    ("PRD", 7): "PLN",
    **{("AUT", n): "CE" for n in (1, 2)},
    **{("AUT", n): "TS" for n in (4, 5)},
    ("AUT", 6): "EI",
    ("DG1", 3): "CE",
    ("DG1", 5): "TS",
    ("IN1", 2): "CE",
    ("IN1", 3): "CX",
    ("IN1", 4): "XON",
    ("IN1", 49): "CX",
    ("TXA", 2): "IS",
    **{("TXA", n): "TS" for n in (4, 6, 7, 8)},
    **{("TXA", n): "XCN" for n in (5, 9, 10, 11, 22)},
    **{("TXA", n): "EI" for n in (12, 13, 14, 15)},
    ("MSH", 7): "TS",
    ("MSH", 9): "MSG",
    **{("MSH", n): "HD" for n in (3, 4, 5, 6)},
    ("EVN", 2): "TS",
    ("EVN", 6): "TS",
}

#: Composite datatypes (a plain read of one of these needs a component number).
COMPOSITES = frozenset(
    {"CX", "EI", "XCN", "XPN", "XON", "CE", "CWE", "HD", "PL", "PLN", "NDL", "TQ", "MSG", "TS"}
)

#: Where an identifier's parts sit, per datatype: (value, namespace, universal id, type).
#: Components are 1-based; (4, 1) is component 4, subcomponent 1.
IDENTIFIER_LAYOUT: dict[str, tuple[tuple[int, int | None], ...]] = {
    "EI": ((1, None), (2, None), (3, None), (0, None)),
    "CX": ((1, None), (4, 1), (4, 2), (5, None)),
    "XCN": ((1, None), (9, 1), (9, 2), (13, None)),
    "PLN": ((1, None), (3, None), (0, None), (2, None)),
    "CE": ((1, None), (3, None), (0, None), (0, None)),
    "HD": ((1, None), (0, None), (2, None), (3, None)),
}

#: Where a person's name parts sit: (family, given, middle) as (component, subcomponent).
NAME_LAYOUT: dict[str, tuple[tuple[int, int], ...]] = {
    "XPN": ((1, 1), (2, 1), (3, 1)),
    "XCN": ((2, 1), (3, 1), (4, 1)),
}


def field_type(segment: str, field: int) -> str | None:
    return FIELD_TYPES.get((segment, field))


_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<frac>\d{1,4}))?(?P<tz>[+-]\d{4})?$"
)


class TimestampError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Timestamp:
    """A parsed TS/DTM: the value, whether an offset was sent, and the precision."""

    value: datetime  # naive when no offset was sent
    has_offset: bool
    date_only: bool

    def as_date(self) -> date:
        return self.value.date()


def parse_ts(text: str) -> Timestamp:
    """Parse ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`` (v2.5 DTM, older TS.1).

    Raises :class:`TimestampError` for anything else, including impossible dates.
    """
    m = _TS.match(text.strip())
    if m is None:
        raise TimestampError("not an HL7 timestamp (YYYYMMDDHHMMSS[+/-ZZZZ])")
    parts = m.groupdict()
    try:
        naive = datetime(
            int(parts["y"]),
            int(parts["mo"] or 1),
            int(parts["d"] or 1),
            int(parts["h"] or 0),
            int(parts["mi"] or 0),
            int(parts["s"] or 0),
            int((parts["frac"] or "0").ljust(6, "0")[:6]),
        )
    except ValueError as exc:
        raise TimestampError(f"impossible date or time ({exc})") from None
    tz = parts["tz"]
    if tz:
        sign = 1 if tz[0] == "+" else -1
        hours, minutes = int(tz[1:3]), int(tz[3:5])
        if hours > 14 or minutes > 59:
            raise TimestampError("time zone offset out of range")
        offset = timezone(sign * timedelta(hours=hours, minutes=minutes))
        return Timestamp(naive.replace(tzinfo=offset), True, parts["h"] is None)
    return Timestamp(naive, False, parts["h"] is None)
