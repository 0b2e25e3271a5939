"""The compiled form of a mapping: immutable data, walked by :mod:`engine.mapping.evaluate`.

Nothing here executes analyst text: paths are pre-parsed, value sets are referenced by
id, and every node remembers where it was written (``file:line:column``) so a runtime
diagnostic can point back at the YAML that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo

from engine.domain.referral import Event
from engine.mapping.fhirpath import FhirPath
from engine.protocol.hl7path import Path as Hl7Path

#: A compiled path: HL7 v2 (``ORC-2.1``) or the FHIRPath subset (``basedOn.first()``),
#: by the mapping's ``input``.
Path = Hl7Path | FhirPath


class Reader(StrEnum):
    """``as:`` — how a read value becomes canonical data."""

    STRING = "string"
    INT = "int"
    DECIMAL = "decimal"
    DATE = "date"
    DATETIME = "datetime"
    IDENTIFIER = "identifier"
    CODING = "coding"
    PERSON_NAME = "person_name"


class Input(StrEnum):
    """``input:`` — what a mapping reads."""

    HL7V2 = "hl7v2"
    FHIR = "fhir"


class OnUnmapped(StrEnum):
    ERROR = "error"
    WARN = "warn"
    PASSTHROUGH = "passthrough"


class OnNoMatch(StrEnum):
    IGNORE = "ignore"
    WARN = "warn"
    ERROR = "error"


# ---- value sources -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    path: Path


@dataclass(frozen=True, slots=True)
class Const:
    value: str


@dataclass(frozen=True, slots=True)
class Alternative:
    when: Condition | None
    spec: Spec


@dataclass(frozen=True, slots=True)
class FirstOf:
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True, slots=True)
class Concat:
    parts: tuple[Spec, ...]
    sep: str


@dataclass(frozen=True, slots=True)
class Join:
    path: Path
    sep: str


@dataclass(frozen=True, slots=True)
class Count:
    path: Path


Source = Read | Const | FirstOf | Concat | Join | Count


@dataclass(frozen=True, slots=True)
class Transform:
    name: str  # trim upper lower digits truncate replace add_minutes tz
    number: int = 0  # truncate
    old: str = ""  # replace
    new: str = ""
    minutes: Spec | None = None  # add_minutes
    zone: ZoneInfo | None = None  # tz


@dataclass(frozen=True, slots=True)
class Spec:
    source: Source
    reader: Reader = Reader.STRING
    valueset: str | None = None
    on_unmapped: OnUnmapped | None = None  # None: the value set's own policy
    transforms: tuple[Transform, ...] = ()
    default: str | None = None
    required: bool = False
    on_null_clear: bool = True
    where: str = ""  # file:line:column of the spec, for diagnostics


# ---- conditions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Present:
    path: Path


@dataclass(frozen=True, slots=True)
class Absent:
    path: Path


@dataclass(frozen=True, slots=True)
class IsNull:
    path: Path


@dataclass(frozen=True, slots=True)
class Compare:
    path: Path
    op: str  # equals in starts_with in_valueset
    values: tuple[str, ...] = ()
    valueset: str = ""
    translate: str = ""  # compare the code's translation in this value set, not the code


@dataclass(frozen=True, slots=True)
class CountIs:
    path: Path
    op: str  # eq gte lte gt lt
    number: int


@dataclass(frozen=True, slots=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    condition: Condition


Condition = Present | Absent | IsNull | Compare | CountIs | AllOf | AnyOf | Not


# ---- rules and mappings --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    emit: Event | None  # None: an ignore rule
    foreach: tuple[str, ...]  # anchor segments; () = the whole message
    when: Condition | None
    fields: tuple[tuple[str, Spec], ...]
    reason: str = ""  # why an ignore rule ignores
    where: str = ""


@dataclass(frozen=True, slots=True)
class MessageType:
    code: str  # MSH-9.1, or * for any
    trigger: str  # MSH-9.2, or * for any

    def matches(self, code: str, trigger: str) -> bool:
        return self.code in ("*", code) and self.trigger in ("*", trigger)


@dataclass(frozen=True, slots=True)
class Mapping:
    id: str
    file: str
    title: str
    overlay: str | None  # None: shared by every source
    message_types: tuple[MessageType, ...]
    when: Condition | None
    timezone: ZoneInfo
    timezone_name: str
    on_no_match: OnNoMatch
    ignore_segments: frozenset[str]
    read_segments: frozenset[str]  # every segment a path in the file names
    rules: tuple[Rule, ...]
    strict_coverage: bool = False  # unmapped segments are errors, not warnings
    first_match: bool = False  # a message (or foreach instance) takes the first rule that fires
    input: Input = Input.HL7V2
    # FHIR mappings: the resource types they read (match.resource), the top-level elements
    # read on purpose by nobody (elements.ignore), those some path reads, and every
    # element those types have (an element outside it is not R4).
    resource_types: tuple[str, ...] = ()
    ignore_elements: frozenset[str] = frozenset()
    read_elements: frozenset[str] = frozenset()
    known_elements: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ValueSet:
    id: str
    file: str
    overlay: str | None
    case_sensitive: bool
    on_unmapped: OnUnmapped
    entries: dict[str, str]  # keys folded when not case_sensitive

    def lookup(self, code: str) -> str | None:
        return self.entries.get(code if self.case_sensitive else code.casefold())


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """``sources/<name>/source.yaml``: what is true of everything one sender sends."""

    overlay: str
    file: str
    # The zone of its timestamps sent without an offset; applied to the shared mappings
    # that read this source's messages (its own mappings state their zone themselves).
    timezone: tuple[ZoneInfo, str] | None = None
