"""The HL7 v2 path dialect of refloop's mappings, parsed once and evaluated many times.

    SEG[occ]-field[rep].component.subcomponent

All indices are 1-based, as in the standard (``PID-3.1`` is the ID number of the
first patient identifier). ``[*]`` selects every occurrence or repetition and yields a
list; ``[.5=MR]`` selects the first repetition whose component 5 equals ``MR``, and
``PRD[1=RT]`` the first PRD segment whose field 1 (first repetition, first component)
equals ``RT`` (``[4.2=X]`` compares component 2 of field 4).
Omitting ``[n]`` means the first. Examples: ``PID-3[.5=MR].1``, ``OBX[*]-5``,
``SCH-26[1].1``, ``MSH-9.2``.

A leading ``/`` marks a path as absolute: inside a mapping's ``foreach`` it reads the
whole message rather than the current instance. :func:`read` takes the instance as
``scope`` (the segments a relative path may see).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.protocol.hl7message import ABSENT, Message, Segment, Value, classify

ALL = -1  # "[*]"

_PATH = re.compile(
    r"""^/?
    (?P<seg>[A-Z][A-Z0-9]{2})
    (?:\[(?P<occ>\*|[0-9]+|[0-9]+(?:\.[0-9]+)?=[^\]]*)\])?
    (?:-(?P<field>[0-9]+)
        (?:\[(?P<rep>\*|[0-9]+|\.[0-9]+(?:\.[0-9]+)?=[^\]]*)\])?
        (?:\.(?P<comp>[0-9]+)(?:\.(?P<sub>[0-9]+))?)?
    )?$""",
    re.VERBOSE,
)


class PathError(ValueError):
    """A path that does not follow the grammar; ``column`` is 1-based."""

    def __init__(self, path: str, reason: str, column: int = 1) -> None:
        super().__init__(f"{reason} in path {path!r} (column {column})")
        self.path = path
        self.reason = reason
        self.column = column


@dataclass(frozen=True, slots=True)
class Filter:
    component: int
    subcomponent: int | None
    equals: str


@dataclass(frozen=True, slots=True)
class SegmentFilter:
    field: int
    component: int
    equals: str


@dataclass(frozen=True, slots=True)
class Path:
    text: str
    segment: str
    occurrence: int | SegmentFilter = 1  # or ALL
    field: int | None = None
    repetition: int | Filter = 1  # or ALL
    component: int | None = None
    subcomponent: int | None = None
    absolute: bool = False

    @property
    def many(self) -> bool:
        return self.occurrence == ALL or self.repetition == ALL


def parse_path(text: str) -> Path:
    m = _PATH.match(text)
    if m is None:
        raise PathError(text, _explain(text), _first_bad_column(text))

    def index(name: str) -> int | None:
        raw = m.group(name)
        if raw is None:
            return None
        if raw == "*":
            return ALL
        value = int(raw)
        if value < 1:
            raise PathError(text, "indices are 1-based; 0 is not a position", m.start(name) + 1)
        return value

    occ_text = m.group("occ")
    occurrence: int | SegmentFilter
    if occ_text is not None and "=" in occ_text:
        target, _, equals = occ_text.partition("=")
        fld, _, comp = target.partition(".")
        if int(fld) < 1 or (comp and int(comp) < 1):
            raise PathError(text, "indices are 1-based; 0 is not a position", m.start("occ") + 1)
        occurrence = SegmentFilter(int(fld), int(comp) if comp else 1, equals)
    else:
        occurrence = index("occ") or 1
    rep_text = m.group("rep")
    repetition: int | Filter
    if rep_text is not None and rep_text.startswith("."):
        target, _, equals = rep_text[1:].partition("=")
        comp, _, sub = target.partition(".")
        if int(comp) < 1 or (sub and int(sub) < 1):
            raise PathError(text, "indices are 1-based; 0 is not a position", m.start("rep") + 1)
        repetition = Filter(int(comp), int(sub) if sub else None, equals)
    else:
        repetition = index("rep") or 1
    if m.group("sub") is not None and m.group("comp") is None:
        raise PathError(text, "a subcomponent needs a component", m.start("sub") + 1)
    return Path(
        text=text,
        segment=m.group("seg"),
        occurrence=occurrence,
        field=index("field"),
        repetition=repetition,
        component=index("comp"),
        subcomponent=index("sub"),
        absolute=text.startswith("/"),
    )


def read(
    message: Message, path: Path, scope: Sequence[Segment] | None = None
) -> Value | list[Value]:
    """Evaluate ``path``: one value, or a list when the path has ``[*]``.

    ``scope`` limits a relative path to some segments (a ``foreach`` instance); an
    absolute path always reads the whole message. Values are still escaped; unescape
    with :meth:`Message.unescape` when needed.
    """
    if scope is None or path.absolute:
        segments = message.all(path.segment)
    else:
        segments = [s for s in scope if s.name == path.segment]
    occurrence = path.occurrence
    if type(occurrence) is int and occurrence > 0 and type(path.repetition) is int:
        # The common case (SEG[n]-f[r].c.s, one value), without building lists.
        if occurrence > len(segments) or path.field is None or path.repetition < 1:
            return _read_slow(message, segments, path)
        return _read_one(message, segments[occurrence - 1], path, path.field, path.repetition)
    return _read_slow(message, segments, path)


def _read_one(message: Message, seg: Segment, path: Path, field: int, repetition: int) -> Value:
    raw = seg.field(field)
    if raw is None or raw == "":
        return ABSENT
    if field != 2 or seg.name != "MSH":
        sep = message.delims.repetition
        if repetition == 1:
            raw = raw.partition(sep)[0]
        else:
            reps = raw.split(sep)
            if repetition > len(reps):
                return ABSENT
            raw = reps[repetition - 1]
    elif repetition != 1:
        return ABSENT
    return _drill(message, raw, path.component, path.subcomponent)


def _read_slow(message: Message, segments: list[Segment], path: Path) -> Value | list[Value]:
    if isinstance(path.occurrence, SegmentFilter):
        chosen = [s for s in segments if _segment_matches(message, s, path.occurrence)][:1]
    elif path.occurrence == ALL:
        chosen = segments
    else:
        chosen = segments[path.occurrence - 1 : path.occurrence]
    values: list[Value] = []
    for seg in chosen:
        values.extend(_read_segment(message, seg, path))
    if path.many:
        return values
    return values[0] if values else ABSENT


def _read_segment(message: Message, seg: Segment, path: Path) -> list[Value]:
    if path.field is None:
        return [seg.text]
    raw = seg.field(path.field)
    if raw is None or raw == "":
        return [ABSENT]
    reps = raw.split(message.delims.repetition) if path.field != 2 or seg.name != "MSH" else [raw]
    if path.repetition == ALL:
        picked = reps
    elif isinstance(path.repetition, Filter):
        picked = [
            r for r in reps if _component(message, r, path.repetition) == path.repetition.equals
        ][:1]
    else:
        picked = reps[path.repetition - 1 : path.repetition]
    if not picked:
        return [ABSENT]
    return [_drill(message, rep, path.component, path.subcomponent) for rep in picked]


def _segment_matches(message: Message, seg: Segment, flt: SegmentFilter) -> bool:
    raw = seg.field(flt.field)
    if not raw:
        return False
    first = raw.split(message.delims.repetition)[0]
    value = _drill(message, first, flt.component, None)
    return isinstance(value, str) and message.unescape(value) == flt.equals


def _component(message: Message, rep: str, flt: Filter) -> str | None:
    value = _drill(message, rep, flt.component, flt.subcomponent)
    return message.unescape(value) if isinstance(value, str) else None


def _drill(message: Message, rep: str, component: int | None, sub: int | None) -> Value:
    if component is None:
        return classify(rep)
    comps = rep.split(message.delims.component)
    if component > len(comps):
        return ABSENT
    comp = comps[component - 1]
    if sub is None:
        return classify(comp)
    subs = comp.split(message.delims.subcomponent)
    return classify(subs[sub - 1]) if sub <= len(subs) else ABSENT


def _explain(text: str) -> str:
    if not text:
        return "empty path"
    if not re.match(r"^/?[A-Z][A-Z0-9]{2}", text):
        return "a path starts with a three-character segment name like PID"
    if "[0]" in text or re.search(r"-0(\D|$)|\.0(\D|$)", text):
        return "indices are 1-based; 0 is not a position"
    return "expected SEG[occ]-field[rep].component.subcomponent"


def _first_bad_column(text: str) -> int:
    # The longest prefix that still reads as the start of a path, plus one.
    for end in range(len(text), 0, -1):
        if _PREFIX.match(text[:end]):
            return min(end + 1, len(text)) if end < len(text) else end
    return 1


_PREFIX = re.compile(
    r"^/?[A-Z][A-Z0-9]{0,2}(\[(\*|[0-9.]*(=[^\]]*)?)\]?)?(-[0-9]*(\[[^\]]*\]?)?(\.[0-9]*(\.[0-9]*)?)?)?$"
)
