"""Analysts' YAML → compiled :mod:`engine.mapping.plan`, refusing anything doubtful.

Every problem is a :class:`SourceError` at the exact node, phrased as what was expected
and, for a misspelt key, what was probably meant. Checks made here (the rest of the
language is closed by construction):

* structure: known keys only, one value source per spec, types of every option;
* paths: the 1-based grammar, ``[*]`` only where a list is consumed (``join``,
  ``count``), and no plain read of a composite field whose datatype is known;
* events: ``emit`` is in the canonical catalogue, every field exists on that event with
  a compatible reader, the catalogue's required fields are covered, and a rule reads at
  least one path (a constant alone never makes an event);
* value sets: referenced ids exist, right-hand sides are text, no two codes collide
  after case folding.

A FHIR mapping (``input: fhir``) is the same language over a resource instead of a
message: ``match.resource`` instead of ``match.message_type``, ``elements:`` instead of
``segments:``, paths in the FHIRPath subset of :mod:`engine.mapping.fhirpath`, each
type-checked against every resource type the mapping names — unknown elements, a path
that may select several items where one is read, a reader that does not fit the
element's FHIR type (``as: coding`` on a HumanName), and codes a required binding does
not have (``{path: status, equals: activ}``) are all load errors. HL7-only parts
(``foreach``, ``is_null``, ``on_null``) are refused in a FHIR mapping.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator
from typing import Any

from engine.domain.events import CATALOGUE, FieldType
from engine.domain.referral import Event
from engine.mapping import fhirmodel
from engine.mapping import plan as p
from engine.mapping.checker import Abandon, Checker, hint
from engine.mapping.fhirpath import FhirPath, FhirPathError, compile_fhirpath
from engine.mapping.source import Document, KeyPath, SourceError
from engine.protocol.hl7path import PathError, parse_path
from engine.protocol.hl7types import COMPOSITES, field_type

MAPPING_SCHEMA = "referral-mapping/v1"
VALUESET_SCHEMA = "referral-valueset/v1"
SOURCE_SCHEMA = "referral-source/v1"
SOURCE_KEYS = ("schema", "description", "timezone")

MAPPING_KEYS = (
    "schema",
    "id",
    "title",
    "input",
    "match",
    "defaults",
    "segments",
    "elements",
    "field_sets",
    "rules",
)
MATCH_KEYS = ("message_type", "resource", "when")
DEFAULTS_KEYS = ("timezone", "on_no_match", "rules")
SEGMENTS_KEYS = ("ignore", "strict")
ELEMENTS_KEYS = ("ignore", "strict")
RULE_KEYS = ("id", "emit", "foreach", "when", "use", "fields", "reason")
SOURCES = ("path", "const", "first_of", "concat", "join", "count")
MODIFIERS = ("as", "map", "on_unmapped", "transform", "default", "required", "on_null", "sep")
CONDITIONS = ("present", "absent", "is_null", "path", "count", "all", "any", "not")
CONDITION_OPTIONS = ("map",)
COMPARISONS = ("equals", "in", "starts_with", "in_valueset")
COUNT_OPS = ("eq", "gte", "lte", "gt", "lt")
TRANSFORMS = ("trim", "upper", "lower", "digits", "truncate", "replace", "add_minutes", "tz")
VALUESET_KEYS = ("schema", "id", "description", "target", "case_sensitive", "on_unmapped", "map")
IGNORE = "ignore"

_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_SEGMENT = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MESSAGE_TYPE = re.compile(r"^(\*|[A-Z][A-Z0-9]{2})(\^(\*|[A-Z0-9]{3}))?$")

#: FHIR types each reader takes (a path selecting anything else is a load error).
_TEXTLIKE = frozenset(
    {"string", "code", "id", "uri", "url", "canonical", "oid", "uuid", "markdown"}
)
_INTEGERS = frozenset({"integer", "positiveInt", "unsignedInt", "integer64"})
_TIMES = frozenset({"date", "dateTime", "instant"})
FHIR_READS: dict[p.Reader, frozenset[str]] = {
    p.Reader.STRING: fhirmodel.PRIMITIVES - {"xhtml", "base64Binary"},
    p.Reader.INT: _INTEGERS | {"string"},
    p.Reader.DECIMAL: _INTEGERS | {"decimal", "string"},
    p.Reader.DATE: _TIMES,
    p.Reader.DATETIME: _TIMES,
    p.Reader.IDENTIFIER: _TEXTLIKE | {"Identifier", "Reference"},
    p.Reader.CODING: _TEXTLIKE | {"CodeableConcept", "Coding"},
    p.Reader.PERSON_NAME: frozenset({"HumanName"}),
}

#: Which readers may feed which canonical field type.
COMPATIBLE: dict[FieldType, frozenset[p.Reader]] = {
    FieldType.TEXT: frozenset({p.Reader.STRING}),
    FieldType.CODE: frozenset({p.Reader.STRING}),
    FieldType.DATETIME: frozenset({p.Reader.DATETIME}),
    FieldType.DATE: frozenset({p.Reader.DATE}),
    FieldType.INT: frozenset({p.Reader.INT}),
    FieldType.IDENTIFIER: frozenset({p.Reader.IDENTIFIER}),
    FieldType.CODING: frozenset({p.Reader.CODING}),
    FieldType.NAME: frozenset({p.Reader.PERSON_NAME}),
}
_READER_FOR = {
    FieldType.DATETIME: "datetime",
    FieldType.DATE: "date",
    FieldType.INT: "int",
    FieldType.IDENTIFIER: "identifier",
    FieldType.CODING: "coding",
    FieldType.NAME: "person_name",
}


class Compiler(Checker[SourceError]):
    """Compiles one document; collects every error instead of stopping at the first."""

    def __init__(self, doc: Document, overlay: str | None, valuesets: frozenset[str]) -> None:
        super().__init__(doc)
        self.overlay = overlay
        self.valuesets = valuesets
        self.segments: set[str] = set()
        self.input = p.Input.HL7V2
        self.resource_types: tuple[str, ...] = ()
        self.elements: set[str] = set()  # top-level FHIR elements some path reads
        self.field_sets: dict[str, dict[str, tuple[p.Spec, KeyPath]]] = {}

    def keep(self, error: SourceError) -> SourceError:
        return error

    def integer(self, value: Any, at: KeyPath, what: str) -> int:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        return self.fail(at, f"{what} must be a whole number")

    # ---- paths ----------------------------------------------------------------------

    def path(
        self,
        value: Any,
        at: KeyPath,
        *,
        many: bool = False,
        plain: bool = False,
        reader: p.Reader | None = None,
    ) -> p.Path:
        """A compiled path. ``many``: the value consumes a list; ``plain``: the value is
        read as text (no typed reader); ``reader``: the typed reader that reads it."""
        if self.input is p.Input.FHIR:
            return self.fhir_path(value, at, many=many, plain=plain, reader=reader)
        text = self.text(value, at, "a path")
        try:
            path = parse_path(text)
        except PathError as exc:
            self.fail(at, f"{exc.reason} in path {text!r} (character {exc.column})")
        if path.many and not many:
            self.fail(
                at,
                f"{text!r} selects a list ([*]); only join, count and conditions over "
                "counts take lists — pick one occurrence, e.g. [1]",
            )
        if plain and path.field is not None and path.component is None:
            kind = field_type(path.segment, path.field)
            if kind in COMPOSITES:
                self.fail(
                    at,
                    f"{text!r} is {kind}, a composite; a plain read needs a component "
                    f"(e.g. {text}.1) or a typed reader (as: identifier | coding | "
                    "person_name | datetime | date)",
                )
        self.segments.add(path.segment)
        return path

    def fhir_path(
        self, value: Any, at: KeyPath, *, many: bool, plain: bool, reader: p.Reader | None
    ) -> FhirPath:
        text = self.text(value, at, "a path")
        compiled: FhirPath | None = None
        for kind in self.resource_types:
            try:
                got = compile_fhirpath(text, kind)
            except FhirPathError as exc:
                where = f" (reading {kind})" if len(self.resource_types) > 1 else ""
                self.fail(at, f"{exc.reason} in path {text!r} (character {exc.column}){where}")
            compiled = compiled or got
        if compiled is None:
            self.fail(at, "a FHIR path needs match.resource to name the resource type")
        if compiled.many and not many:
            self.fail(
                at,
                f"{text!r} may select several items (a repeating element on the way); read "
                "one with first() or where(...).first() - only join, count and conditions "
                "take lists",
            )
        if reader is None and plain:
            reader = p.Reader.STRING
        if reader is not None and compiled.type not in FHIR_READS[reader]:
            if reader is p.Reader.STRING:
                self.fail(
                    at,
                    f"{text!r} is a {compiled.type}, not a primitive; a plain read needs one "
                    "of its elements (e.g. .text, .value, .code) or a typed reader (as: "
                    "identifier | coding | person_name)",
                )
            fits = ", ".join(sorted(FHIR_READS[reader]))
            self.fail(at, f"as: {reader.value} reads {fits}; {text!r} is a {compiled.type}")
        if compiled.head:
            self.elements.add(compiled.head)
        return compiled

    # ---- value specs ----------------------------------------------------------------

    def spec(self, value: Any, at: KeyPath) -> p.Spec:
        where = self.where(at)
        if isinstance(value, str):
            return p.Spec(p.Read(self.path(value, at, plain=True)), where=where)
        data = self.mapping_of(value, at, "a value")
        self.known_keys(data, at, SOURCES + MODIFIERS)
        sources = [k for k in SOURCES if k in data]
        if len(sources) != 1:
            self.fail(
                at,
                "a value needs exactly one source: path, const, first_of, concat, join or "
                f"count (found {', '.join(sources) or 'none'})",
            )
        kind = sources[0]
        reader = p.Reader.STRING
        if "as" in data:
            reader = p.Reader(
                self.choice(data["as"], (*at, "as"), "as", tuple(r.value for r in p.Reader))
            )
        source = self.source(kind, data, at, reader)
        if "sep" in data and kind not in ("concat", "join"):
            self.fail((*at, "sep"), "sep only goes with concat or join")
        valueset = None
        if "map" in data:
            valueset = self.valueset_ref(data["map"], (*at, "map"))
            if reader is not p.Reader.STRING:
                self.fail((*at, "map"), "map translates codes: use it on a plain (string) read")
        on_unmapped = None
        if "on_unmapped" in data:
            if valueset is None:
                self.fail((*at, "on_unmapped"), "on_unmapped only goes with map")
            on_unmapped = p.OnUnmapped(
                self.choice(
                    data["on_unmapped"],
                    (*at, "on_unmapped"),
                    "on_unmapped",
                    tuple(o.value for o in p.OnUnmapped),
                )
            )
        transforms = tuple(
            self.transform(t, (*at, "transform", i))
            for i, t in enumerate(
                self.list_of(data.get("transform", []), (*at, "transform"), "transform")
            )
        )
        default = None
        if "default" in data:
            default = self.text(data["default"], (*at, "default"), "default")
            if kind in ("count",) or reader is not p.Reader.STRING:
                self.fail(
                    (*at, "default"),
                    "a default is text, so it only goes with text and code values (not "
                    f"{'a count' if kind == 'count' else 'as: ' + reader.value})",
                )
        required = (
            self.flag(data["required"], (*at, "required"), "required")
            if "required" in data
            else False
        )
        on_null_clear = True
        if "on_null" in data and self.input is p.Input.FHIR:
            self.fail(
                (*at, "on_null"),
                'on_null is about HL7\'s "" (delete this value); FHIR has no such value',
            )
        if "on_null" in data:
            on_null_clear = (
                self.choice(data["on_null"], (*at, "on_null"), "on_null", ("clear", "ignore"))
                == "clear"
            )
        return p.Spec(
            source,
            reader,
            valueset,
            on_unmapped,
            transforms,
            default,
            required,
            on_null_clear,
            where,
        )

    def source(self, kind: str, data: dict[str, Any], at: KeyPath, reader: p.Reader) -> p.Source:
        value = data[kind]
        here = (*at, kind)
        if kind == "path":
            return p.Read(self.path(value, here, plain=reader is p.Reader.STRING, reader=reader))
        if kind == "const":
            if reader is not p.Reader.STRING:
                self.fail(here, "a const is text; typed readers (as:) read message paths")
            return p.Const(self.text(value, here, "const"))
        if kind == "first_of":
            items = self.list_of(value, here, "first_of")
            if not items:
                self.fail(here, "first_of needs at least one alternative")
            alternatives = []
            for i, item in enumerate(items):
                item_at = (*here, i)
                if isinstance(item, dict) and "when" in item:
                    self.known_keys(item, item_at, ("when", "value"))
                    if "value" not in item:
                        self.fail(item_at, "an alternative with `when` needs a `value`")
                    cond = self.condition(item["when"], (*item_at, "when"))
                    spec = self.spec(item["value"], (*item_at, "value"))
                    alternatives.append(p.Alternative(cond, spec))
                else:
                    alternatives.append(p.Alternative(None, self.spec(item, item_at)))
            return p.FirstOf(tuple(alternatives))
        if kind == "concat":
            items = self.list_of(value, here, "concat")
            parts = tuple(self.spec(item, (*here, i)) for i, item in enumerate(items))
            for i, part in enumerate(parts):
                if _produces(part) not in (p.Reader.STRING, p.Reader.DECIMAL):
                    self.fail((*here, i), "concat joins text: read each part as a string")
            return p.Concat(parts, _sep(data))
        if kind == "join":
            if reader is not p.Reader.STRING:
                self.fail((*at, "as"), "join makes text from a list: drop `as:`")
            return p.Join(self.path(value, here, many=True, reader=p.Reader.STRING), _sep(data))
        return p.Count(self.path(value, here, many=True))

    def transform(self, value: Any, at: KeyPath) -> p.Transform:
        if isinstance(value, str):
            if value not in ("trim", "upper", "lower", "digits"):
                self.fail(
                    at,
                    f"unknown transform {value!r}{hint(value, TRANSFORMS)}; "
                    f"expected one of {', '.join(TRANSFORMS)}",
                )
            return p.Transform(value)
        data = self.mapping_of(value, at, "a transform")
        if len(data) != 1:
            self.fail(at, "a transform with an argument is one key, e.g. {truncate: 20}")
        name, arg = next(iter(data.items()))
        here = (*at, name)
        if name == "truncate":
            number = self.integer(arg, here, "truncate")
            if number < 1:
                self.fail(here, "truncate keeps the first n characters: n must be 1 or more")
            return p.Transform(name, number=number)
        if name == "replace":
            args = self.mapping_of(arg, here, "replace")
            self.known_keys(args, here, ("from", "to"))
            old = self.text(args.get("from"), (*here, "from"), "replace.from")
            new = args.get("to") or ""
            if not isinstance(new, str):
                self.fail((*here, "to"), "replace.to must be text (empty to delete)")
            return p.Transform(name, old=old, new=new)
        if name == "add_minutes":
            return p.Transform(name, minutes=self.spec(arg, here))
        if name == "tz":
            return p.Transform(name, zone=self.zone(arg, here))
        return self.fail(
            here,
            f"unknown transform {name!r}{hint(name, TRANSFORMS)}; expected one of "
            f"{', '.join(TRANSFORMS)}",
        )

    def zone(self, value: Any, at: KeyPath) -> zoneinfo.ZoneInfo:
        name = self.text(value, at, "a time zone")
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            self.fail(at, f"unknown time zone {name!r}; use an IANA name like America/Chicago")

    def valueset_ref(self, value: Any, at: KeyPath) -> str:
        name = self.text(value, at, "a value set id")
        if name not in self.valuesets:
            self.fail(
                at,
                f"no value set {name!r}{hint(name, tuple(self.valuesets))} (value sets "
                "live in valuesets/ folders)",
            )
        return name

    # ---- conditions -----------------------------------------------------------------

    def condition(self, value: Any, at: KeyPath) -> p.Condition:
        data = self.mapping_of(value, at, "a condition")
        self.known_keys(data, at, CONDITIONS + COMPARISONS + COUNT_OPS + CONDITION_OPTIONS)
        heads = [k for k in CONDITIONS if k in data]
        if len(heads) != 1:
            self.fail(
                at,
                "a condition starts with exactly one of present, absent, is_null, path, "
                f"count, all, any, not (found {', '.join(heads) or 'none'})",
            )
        head = heads[0]
        here = (*at, head)
        if head in ("present", "absent", "is_null"):
            self._only(data, at, (head,))
            if head == "is_null" and self.input is p.Input.FHIR:
                self.fail(
                    here, 'is_null tests HL7\'s "" (delete this value); FHIR has none: use absent'
                )
            fhir = self.input is p.Input.FHIR  # FHIR asks "is there any?" of a list too
            path = self.path(data[head], here, plain=False, many=fhir)
            if head == "present":
                return p.Present(path)
            return p.Absent(path) if head == "absent" else p.IsNull(path)
        if head in ("all", "any"):
            self._only(data, at, (head,))
            items = self.list_of(data[head], here, head)
            conds = tuple(self.condition(c, (*here, i)) for i, c in enumerate(items))
            return p.AllOf(conds) if head == "all" else p.AnyOf(conds)
        if head == "not":
            self._only(data, at, ("not",))
            return p.Not(self.condition(data["not"], here))
        if head == "count":
            ops = [k for k in COUNT_OPS if k in data]
            if len(ops) != 1:
                self.fail(at, "count needs exactly one of eq, gte, lte, gt, lt")
            self._only(data, at, ("count", ops[0]))
            path = self.path(data["count"], here, many=True)
            return p.CountIs(path, ops[0], self.integer(data[ops[0]], (*at, ops[0]), ops[0]))
        ops = [k for k in COMPARISONS if k in data]
        if len(ops) != 1:
            self.fail(at, "path needs exactly one of equals, in, starts_with, in_valueset")
        op = ops[0]
        self._only(data, at, ("path", op, "map"))
        # FHIR: a comparison over a repeating element holds when any item does
        # (the codes of every category coding, say).
        path = self.path(data["path"], here, plain=True, many=self.input is p.Input.FHIR)
        translate = self.valueset_ref(data["map"], (*at, "map")) if "map" in data else ""
        if isinstance(path, FhirPath) and path.codes and not translate and op in ("equals", "in"):
            given = data[op] if isinstance(data[op], list) else [data[op]]
            for i, code in enumerate(given):
                if isinstance(code, str) and code not in path.codes:
                    here_op = (*at, op, i) if isinstance(data[op], list) else (*at, op)
                    self.fail(
                        here_op,
                        f"{code!r} is not a code of {path.label} ({', '.join(path.codes)})",
                    )
        if op == "in_valueset":
            if translate:
                self.fail((*at, "map"), "in_valueset already looks the code up; drop map")
            return p.Compare(path, op, valueset=self.valueset_ref(data[op], (*at, op)))
        if op == "in":
            items = self.list_of(data[op], (*at, op), "in")
            values = tuple(self.text(v, (*at, op, i), "a code") for i, v in enumerate(items))
            return p.Compare(path, op, values, translate=translate)
        return p.Compare(path, op, (self.text(data[op], (*at, op), op),), translate=translate)

    def _only(self, data: dict[str, Any], at: KeyPath, keys: tuple[str, ...]) -> None:
        for key in data:
            if key not in keys:
                self.fail((*at, key), f"{key!r} does not go with {keys[0]!r} in one condition")

    # ---- the mapping file -----------------------------------------------------------

    def mapping(self) -> p.Mapping | None:
        try:
            return self._mapping()
        except Abandon:
            return None

    def _mapping(self) -> p.Mapping:
        data = self.mapping_of(self.doc.data, (), "a mapping file")
        self.known_keys(data, (), MAPPING_KEYS)
        for key in ("id", "match", "defaults", "rules"):
            if key not in data:
                self.fail((), f"a mapping needs {key!r}")
        mapping_id = self.text(data["id"], ("id",), "id")
        if not _ID.match(mapping_id):
            self.fail(("id",), "an id is lower-case letters, digits, '.', '_' or '-'")
        if "input" in data:
            self.input = p.Input(
                self.choice(data["input"], ("input",), "input", tuple(i.value for i in p.Input))
            )
        fhir = self.input is p.Input.FHIR
        match = self.mapping_of(data["match"], ("match",), "match")
        self.known_keys(match, ("match",), MATCH_KEYS)
        types: tuple[p.MessageType, ...] = ()
        if fhir:
            if "message_type" in match:
                self.fail_at_key(
                    ("match", "message_type"),
                    "a FHIR mapping (input: fhir) matches `resource:`, e.g. "
                    "resource: ServiceRequest, not message_type",
                )
            if "resource" not in match:
                self.fail(("match",), "a FHIR mapping needs match.resource (e.g. ServiceRequest)")
            self.resource_types = self.resources(match["resource"], ("match", "resource"))
        else:
            if "resource" in match:
                self.fail_at_key(
                    ("match", "resource"),
                    "match.resource is for FHIR mappings: add `input: fhir` at the top",
                )
            types = self.message_types(match.get("message_type"), ("match", "message_type"))
        when = (
            self.attempt(self.condition, match["when"], ("match", "when"))
            if "when" in match
            else None
        )
        defaults = self.mapping_of(data["defaults"], ("defaults",), "defaults")
        self.known_keys(defaults, ("defaults",), DEFAULTS_KEYS)
        if "timezone" not in defaults:
            self.fail(
                ("defaults",),
                "defaults.timezone is required: the zone of timestamps sent "
                "without an offset (e.g. America/Chicago)",
            )
        tz_name = self.text(defaults["timezone"], ("defaults", "timezone"), "timezone")
        tz = self.zone(tz_name, ("defaults", "timezone"))
        on_no_match = p.OnNoMatch(
            self.choice(
                defaults.get("on_no_match", "error"),
                ("defaults", "on_no_match"),
                "on_no_match",
                tuple(o.value for o in p.OnNoMatch),
            )
        )
        first_match = (
            self.choice(
                defaults.get("rules", "all"), ("defaults", "rules"), "rules", ("all", "first")
            )
            == "first"
        )
        ignore: frozenset[str] = frozenset()
        strict = False
        ignore_elements: frozenset[str] = frozenset()
        if fhir and "segments" in data:
            self.fail_at_key(
                ("segments",), "a FHIR mapping has no segments: list unread elements in `elements:`"
            )
        if not fhir and "elements" in data:
            self.fail_at_key(
                ("elements",), "elements: is for FHIR mappings (input: fhir); HL7 has `segments:`"
            )
        if "elements" in data:
            ignore_elements, strict = self.element_settings(data["elements"])
        if "segments" in data:
            segs = self.mapping_of(data["segments"], ("segments",), "segments")
            self.known_keys(segs, ("segments",), SEGMENTS_KEYS)
            names = self.list_of(segs.get("ignore", []), ("segments", "ignore"), "ignore")
            for i, name in enumerate(names):
                if not isinstance(name, str) or not _SEGMENT.match(name):
                    self.fail(("segments", "ignore", i), "a segment name like PV1 or ZPI")
            ignore = frozenset(names)
            if "strict" in segs:
                strict = self.flag(segs["strict"], ("segments", "strict"), "strict")
        for name, fields in self.mapping_of(
            data.get("field_sets", {}), ("field_sets",), "field_sets"
        ).items():
            self.attempt(self.field_set, name, fields)
        rules_data = self.list_of(data["rules"], ("rules",), "rules")
        if not rules_data:
            self.fail(("rules",), "a mapping needs at least one rule")
        rules = []
        seen: dict[str, int] = {}
        for i, rule_data in enumerate(rules_data):
            rule = self.attempt(self.rule, rule_data, ("rules", i))
            if rule is None:
                continue
            if rule.id in seen:
                self.report(
                    ("rules", i, "id"),
                    f"rule id {rule.id!r} is already used by rule {seen[rule.id] + 1}",
                )
            seen[rule.id] = i
            rules.append(rule)
        if self.errors:
            raise Abandon
        return p.Mapping(
            id=mapping_id,
            file=self.doc.file,
            title=str(data.get("title") or ""),
            overlay=self.overlay,
            message_types=types,
            when=when,
            timezone=tz,
            timezone_name=tz_name,
            on_no_match=on_no_match,
            ignore_segments=ignore,
            read_segments=frozenset(self.segments),
            rules=tuple(rules),
            strict_coverage=strict,
            first_match=first_match,
            input=self.input,
            resource_types=self.resource_types,
            ignore_elements=ignore_elements,
            read_elements=frozenset(self.elements),
            known_elements=frozenset().union(
                *(fhirmodel.elements(fhirmodel.resource_model(t)) for t in self.resource_types)
            ),
        )

    def resources(self, value: Any, at: KeyPath) -> tuple[str, ...]:
        items = value if isinstance(value, list) else [value]
        out: list[str] = []
        for i, item in enumerate(items):
            here = (*at, i) if isinstance(value, list) else at
            name = self.text(item, here, "match.resource")
            try:
                fhirmodel.resource_model(name)
            except fhirmodel.UnknownType as exc:
                meant = f" (did you mean {exc.hint!r}?)" if exc.hint else ""
                self.fail(here, f"{name!r} is not a FHIR R4 resource type{meant}")
            if name in out:
                self.fail(here, f"{name} is listed twice")
            out.append(name)
        if not out:
            self.fail(at, "match.resource names at least one resource type")
        return tuple(out)

    def element_settings(self, value: Any) -> tuple[frozenset[str], bool]:
        at: KeyPath = ("elements",)
        data = self.mapping_of(value, at, "elements")
        self.known_keys(data, at, ELEMENTS_KEYS)
        names = self.list_of(data.get("ignore", []), (*at, "ignore"), "ignore")
        for i, name in enumerate(names):
            here = (*at, "ignore", i)
            text = self.text(name, here, "an element name")
            for kind in self.resource_types:
                known = fhirmodel.elements(fhirmodel.resource_model(kind))
                if text not in known:
                    self.fail(
                        here,
                        f"{kind} has no element {text!r}{hint(text, tuple(known))} "
                        "(elements.ignore lists top-level elements, e.g. note, encounter)",
                    )
        strict = self.flag(data["strict"], (*at, "strict"), "strict") if "strict" in data else False
        return frozenset(names), strict

    def message_types(self, value: Any, at: KeyPath) -> tuple[p.MessageType, ...]:
        items = value if isinstance(value, list) else [value]
        out = []
        for i, item in enumerate(items):
            here = (*at, i) if isinstance(value, list) else at
            text = self.text(item, here, "match.message_type")
            if not _MESSAGE_TYPE.match(text):
                self.fail(here, "a message type is MSH-9.1^MSH-9.2 like ORM^O01, SIU^* or ADT")
            code, _, trigger = text.partition("^")
            out.append(p.MessageType(code, trigger or "*"))
        return tuple(out)

    def field_set(self, name: str, value: Any) -> None:
        at: KeyPath = ("field_sets", name)
        fields = self.mapping_of(value, at, f"field set {name!r}")
        compiled = {}
        for key, spec in fields.items():
            done = self.attempt(self.spec, spec, (*at, key))
            if done is not None:
                compiled[key] = (done, (*at, key))
        self.field_sets[name] = compiled

    def rule(self, value: Any, at: KeyPath) -> p.Rule:
        data = self.mapping_of(value, at, "a rule")
        errors_before = len(self.errors)
        self.known_keys(data, at, RULE_KEYS)
        for key in ("id", "emit"):
            if key not in data:
                self.fail(at, f"a rule needs {key!r}")
        rule_id = self.text(data["id"], (*at, "id"), "id")
        if not _ID.match(rule_id):
            self.fail((*at, "id"), "a rule id is lower-case letters, digits, '.', '_' or '-'")
        emit_text = self.text(data["emit"], (*at, "emit"), "emit")
        events = tuple(e.value for e in Event)
        if emit_text != IGNORE and emit_text not in events:
            self.fail(
                (*at, "emit"),
                f"unknown event {emit_text!r}{hint(emit_text, events)}; "
                "expected a canonical event (see README) or `ignore`",
            )
        emit = None if emit_text == IGNORE else Event(emit_text)
        foreach: tuple[str, ...] = ()
        if "foreach" in data and self.input is p.Input.FHIR:
            self.fail(
                (*at, "foreach"),
                "foreach cuts an HL7 message at segments; a FHIR mapping reads one resource",
            )
        if "foreach" in data:
            raw = data["foreach"]
            names = raw if isinstance(raw, list) else [raw]
            for i, name in enumerate(names):
                if not isinstance(name, str) or not _SEGMENT.match(name):
                    here = (*at, "foreach", i) if isinstance(raw, list) else (*at, "foreach")
                    self.fail(
                        here, "foreach names the segment(s) that start each instance, e.g. ORC"
                    )
            foreach = tuple(names)
            self.segments.update(foreach)
        when = self.condition(data["when"], (*at, "when")) if "when" in data else None
        fields: dict[str, tuple[p.Spec, KeyPath]] = {}
        for i, name in enumerate(self.list_of(data.get("use", []), (*at, "use"), "use")):
            if not isinstance(name, str):
                self.fail((*at, "use", i), "use lists field set names (text)")
            if name not in self.field_sets:
                self.fail(
                    (*at, "use", i), f"no field set {name!r}{hint(name, tuple(self.field_sets))}"
                )
            fields.update(self.field_sets[name])
        own = self.mapping_of(data.get("fields", {}), (*at, "fields"), "fields")
        for key, spec in own.items():
            done = self.attempt(self.spec, spec, (*at, "fields", key))
            if done is not None:
                fields[key] = (done, (*at, "fields", key))
        reason = str(data.get("reason") or "")
        if emit is None:
            if fields:
                self.fail((*at, "fields"), "an ignore rule emits nothing, so it takes no fields")
            if when is None and not foreach:
                pass  # a catch-all ignore (e.g. every ADT) is legitimate
            return p.Rule(rule_id, None, foreach, when, (), reason, self.where(at))
        # A field that failed to compile is missing from `fields`: checking what the
        # event lacks would only repeat that error in other words.
        self.check_fields(emit, fields, at, complete=len(self.errors) == errors_before)
        if when is None and not any(_reads(spec) for spec, _ in fields.values()):
            self.fail(at, "a rule must read the message (a constant alone never makes an event)")
        return p.Rule(
            rule_id,
            emit,
            foreach,
            when,
            tuple((k, s) for k, (s, _) in fields.items()),
            reason,
            self.where(at),
        )

    def check_fields(
        self,
        emit: Event,
        fields: dict[str, tuple[p.Spec, KeyPath]],
        at: KeyPath,
        *,
        complete: bool = True,
    ) -> None:
        spec_of = CATALOGUE[emit]
        for name, (spec, here) in fields.items():
            kind = spec_of.fields.get(name)
            if kind is None:
                meant = hint(name, tuple(spec_of.fields))
                self.report(here, f"{emit.value} has no field {name!r}{meant}")
                continue
            produced = _produces(spec)
            if produced is not None and produced not in COMPATIBLE[kind]:
                wanted = _READER_FOR.get(kind, "string")
                self.report(
                    here,
                    f"{name} is a {kind.value}; read it with `as: {wanted}` "
                    f"(this value gives {produced.value})",
                )
        if not complete:
            return
        for name in sorted(spec_of.required):
            entry = fields.get(name)
            if entry is None or not (entry[0].required or entry[0].default is not None):
                self.report(
                    (*at, "fields"),
                    f"{emit.value} requires {name!r}: give it a spec with "
                    "`required: true` (or a default)",
                )
        if not any(name.startswith("correlate.") for name in fields):
            self.report(
                (*at, "fields"),
                "every event needs a correlation key: at least one of "
                "correlate.referral_id, correlate.placer_order, correlate.filler_order, "
                "correlate.appointment",
            )

    # ---- a source's own settings (sources/<name>/source.yaml) ------------------------

    def source_settings(self) -> p.SourceSettings | None:
        try:
            data = self.mapping_of(self.doc.data, (), "a source settings file")
            self.known_keys(data, (), SOURCE_KEYS)
            zone = None
            if "timezone" in data:
                name = self.text(data["timezone"], ("timezone",), "timezone")
                zone = (self.zone(name, ("timezone",)), name)
            return p.SourceSettings(self.overlay or "", self.doc.file, zone)
        except Abandon:
            return None

    # ---- value sets -----------------------------------------------------------------

    def valueset(self) -> p.ValueSet | None:
        try:
            return self._valueset()
        except Abandon:
            return None

    def _valueset(self) -> p.ValueSet:
        data = self.mapping_of(self.doc.data, (), "a value set file")
        self.known_keys(data, (), VALUESET_KEYS)
        for key in ("id", "map"):
            if key not in data:
                self.fail((), f"a value set needs {key!r}")
        vs_id = self.text(data["id"], ("id",), "id")
        if not _ID.match(vs_id):
            self.fail(("id",), "an id is lower-case letters, digits, '.', '_' or '-'")
        case_sensitive = (
            self.flag(data["case_sensitive"], ("case_sensitive",), "case_sensitive")
            if "case_sensitive" in data
            else True
        )
        on_unmapped = p.OnUnmapped(
            self.choice(
                data.get("on_unmapped", "error"),
                ("on_unmapped",),
                "on_unmapped",
                tuple(o.value for o in p.OnUnmapped),
            )
        )
        entries: dict[str, str] = {}
        first: dict[str, str] = {}
        for code, target in self.mapping_of(data["map"], ("map",), "map").items():
            here: KeyPath = ("map", code)
            self.text(target, here, f"the translation of {code!r}")
            key = code if case_sensitive else code.casefold()
            if key in entries:
                self.fail(
                    here, f"code {code!r} collides with {first[key]!r} (case_sensitive is false)"
                )
            entries[key] = target
            first[key] = code
        return p.ValueSet(vs_id, self.doc.file, self.overlay, case_sensitive, on_unmapped, entries)


def _sep(data: dict[str, Any]) -> str:
    sep = data.get("sep")
    return ", " if sep is None else str(sep).replace("\\n", "\n")


def _produces(spec: p.Spec) -> p.Reader | None:
    """The reader whose type this spec yields (None when it cannot be told statically)."""
    src = spec.source
    if isinstance(src, p.FirstOf):
        kinds = {_produces(a.spec) for a in src.alternatives}
        return kinds.pop() if len(kinds) == 1 else None
    if isinstance(src, p.Count):
        return p.Reader.INT
    if isinstance(src, (p.Concat, p.Join, p.Const)):
        return p.Reader.STRING
    return spec.reader


def _reads(spec: p.Spec) -> bool:
    src = spec.source
    if isinstance(src, (p.Read, p.Join, p.Count)):
        return True
    if isinstance(src, p.FirstOf):
        return any(_reads(a.spec) or a.when is not None for a in src.alternatives)
    if isinstance(src, p.Concat):
        return any(_reads(s) for s in src.parts)
    return False


def walk_paths(spec: p.Spec) -> Iterator[p.Path]:
    """Every path a spec reads (for coverage reports)."""
    src = spec.source
    if isinstance(src, (p.Read, p.Join, p.Count)):
        yield src.path
    elif isinstance(src, p.FirstOf):
        for alt in src.alternatives:
            yield from walk_paths(alt.spec)
    elif isinstance(src, p.Concat):
        for part in src.parts:
            yield from walk_paths(part)
