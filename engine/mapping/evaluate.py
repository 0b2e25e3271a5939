"""Walk a compiled mapping over one message and produce canonical events (pure).

Evaluation is all-or-nothing: any error diagnostic (a required value missing, a code
a strict value set does not know, an event without a correlation key) discards every
event of the message and makes it a ``mapping_error``, so a half-mapped message never
moves a referral. Warnings and notes travel with the result either way.

Rules run in file order; every rule that fires emits, unless the mapping says
``defaults.rules: first`` — then a message (or ``foreach`` instance) takes the first rule
that fires, like a switch. An ``ignore`` rule that fires for the whole message stops
evaluation (cheap recognition of non-referral traffic); one that fires inside a
``foreach`` instance hides that instance from the rules after it.

FHIR mappings run through the same rule loop (:func:`evaluate_resource`); only reading
differs: paths are FHIRPath over the resource's JSON, values go through the FHIR readers,
the fallback ``occurred_at`` is ``meta.lastUpdated`` (MSH-7's counterpart), and the
unread-parts report names top-level elements instead of segments. JSON ``null`` (not
valid FHIR) is read as absent, with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.domain.events import (
    CATALOGUE,
    CLEAR,
    CORRELATE,
    CanonicalEvent,
    Diagnostic,
    Normalised,
    Outcome,
)
from engine.mapping import plan as p
from engine.mapping.fhir_readers import read_fhir
from engine.mapping.fhirmodel import ALWAYS_KNOWN
from engine.mapping.fhirpath import META_LAST_UPDATED, FhirPath, select
from engine.mapping.readers import Assumed, BadValue, apply_transform, read_as
from engine.protocol.hl7message import ABSENT, NULL, Message, Segment, Value
from engine.protocol.hl7path import Path, parse_path, read

MSH_7 = parse_path("/MSH-7")
_MSH_7_SPEC = p.Spec(p.Read(MSH_7), p.Reader.DATETIME)
_LAST_UPDATED_SPEC = p.Spec(p.Read(META_LAST_UPDATED), p.Reader.DATETIME)


class _Nothing:
    """No value: absent, or nulled when ``null`` is set."""

    __slots__ = ("null",)

    def __init__(self, null: bool = False) -> None:
        self.null = null


MISSING = _Nothing()
NULLED = _Nothing(null=True)


class _Run:
    """The state of one evaluation: message, current scope and findings.

    The FHIR twin, :class:`_FhirRun`, overrides how values are read (``raw``, ``scalar``,
    ``occupied``, ``typed``); rules, conditions, value sets and transforms are shared."""

    #: occurred_at when a rule does not say: the message's own time.
    fallback_time = _MSH_7_SPEC

    def __init__(
        self, mapping: p.Mapping, message: Message, valuesets: Mapping[str, p.ValueSet]
    ) -> None:
        self.mapping = mapping
        self.message = message
        self.valuesets = valuesets
        self.scope: Sequence[Segment] | None = None
        self.scope_index = -1
        self.scope_size = 0
        # Rules re-read the same paths (ORC-1 in every condition, the keys in every
        # event); a message is immutable, so each (path, instance) is read once.
        self.cache: dict[tuple[int, int, int], Value | list[Value]] = {}
        self.diagnostics: list[Diagnostic] = []
        self.rule = ""
        self.field = ""
        self.failed = False

    def note(self, code: str, message: str, *, path: str = "", severity: str = "error") -> None:
        if severity == "error":
            self.failed = True
        self.diagnostics.append(Diagnostic(code, message, self.rule, self.field, path, severity))

    # ---- reading ------------------------------------------------------------------

    def raw(self, path: p.Path) -> Any:
        # Plan paths live as long as the plan: their id is a cheap, exact key.
        key = (id(path), -1, 0) if path.absolute else (id(path), self.scope_index, self.scope_size)
        got = self.cache.get(key)
        if got is None:
            assert isinstance(path, Path)
            got = self.cache[key] = read(self.message, path, self.scope)
        return got

    def scalar(self, raw: Any) -> str | None:
        """The text of one read value, or None when it is not a value."""
        return self.message.unescape(raw) if isinstance(raw, str) else None

    def occupied(self, raw: Any) -> bool:
        """One read item that counts as a value (HL7: not absent, not ``""``)."""
        return isinstance(raw, str)

    def anchor(self, scope: Sequence[Segment]) -> int:
        return _anchor_position(self.message, scope)

    def value(self, spec: p.Spec) -> Any:
        got = self.source(spec)
        if isinstance(got, _Nothing) and got.null:
            got = CLEAR if spec.on_null_clear else MISSING
        if not isinstance(got, _Nothing) and got is not CLEAR:
            got = self.transform(spec, got)
            if spec.valueset is not None and isinstance(got, str):
                got = self.translate(spec, got)
        if isinstance(got, _Nothing) and spec.default is not None:
            got = spec.default
            self.note(
                "default_used", f"default {spec.default!r} used ({spec.where})", severity="info"
            )
        if spec.required and (isinstance(got, _Nothing) or got is CLEAR):
            where = _source_text(spec)
            self.note(
                "required_value_missing",
                f"{self.field or 'a required value'} is required but {where or 'its source'} "
                f"has no value ({spec.where})",
                path=where,
            )
        return got

    def source(self, spec: p.Spec) -> Any:
        src = spec.source
        if isinstance(src, p.Read):
            raw = self.raw(src.path)
            if raw is ABSENT:
                return MISSING
            if raw is NULL:
                return NULLED
            return self.typed(spec, raw, src.path)
        if isinstance(src, p.Const):
            return src.value
        if isinstance(src, p.FirstOf):
            nulled = False
            for alt in src.alternatives:
                if alt.when is not None and not self.holds(alt.when):
                    continue
                got = self.value(alt.spec)
                if got is CLEAR:
                    nulled = True
                    continue
                if not isinstance(got, _Nothing):
                    return got
                nulled = nulled or got.null
            return NULLED if nulled else MISSING
        if isinstance(src, p.Concat):
            texts = [v for v in (self.value(part) for part in src.parts) if isinstance(v, str)]
            texts = [t for t in texts if t]
            return src.sep.join(texts) if texts else MISSING
        if isinstance(src, p.Join):
            values = self.raw(src.path)
            items = values if isinstance(values, list) else [values]
            texts = [t.strip() for t in map(self.scalar, items) if t is not None]
            texts = [t for t in texts if t]
            return src.sep.join(texts) if texts else MISSING
        values = self.raw(src.path)
        items = values if isinstance(values, list) else [values]
        return sum(1 for v in items if self.occupied(v))

    def typed(self, spec: p.Spec, raw: Any, path: p.Path) -> Any:
        assert isinstance(raw, str)
        assert isinstance(path, Path)
        assumed = Assumed()
        try:
            got = read_as(spec.reader, raw, path, self.message, self.mapping.timezone, assumed)
        except BadValue as exc:
            self.note(
                "invalid_value",
                f"{path.text} is not a valid {spec.reader.value}: {exc}",
                path=path.text,
                severity="warning",
            )
            return MISSING
        if assumed.zone:
            self.note(
                "timezone_assumed",
                f"{path.text} has no UTC offset; {self.mapping.timezone_name} assumed",
                path=path.text,
                severity="info",
            )
        return MISSING if got is None or got == "" else got

    def transform(self, spec: p.Spec, got: Any) -> Any:
        for t in spec.transforms:
            minutes = None
            if t.minutes is not None:
                n = self.value(t.minutes)
                minutes = n if isinstance(n, int) else None
            try:
                got = apply_transform(t, got, minutes)
            except BadValue as exc:
                self.note("invalid_value", f"transform {t.name}: {exc} ({spec.where})")
                return MISSING
        return MISSING if got == "" else got

    def translate(self, spec: p.Spec, code: str) -> Any:
        assert spec.valueset is not None
        vs = self.valuesets[spec.valueset]
        hit = vs.lookup(code)
        if hit is not None:
            return hit
        policy = spec.on_unmapped or vs.on_unmapped
        where = _source_text(spec)
        text = f"code {code!r} is not in value set {vs.id!r} ({vs.file})"
        if policy is p.OnUnmapped.ERROR:
            self.note("unmapped_code", text, path=where)
            return MISSING
        self.note("unmapped_code", text, path=where, severity="warning")
        return code if policy is p.OnUnmapped.PASSTHROUGH else MISSING

    # ---- conditions ---------------------------------------------------------------

    def holds(self, cond: p.Condition) -> bool:
        if isinstance(cond, p.Present):
            raw = self.raw(cond.path)
            if isinstance(raw, list):
                return any(self.occupied(v) for v in raw)
            return self.occupied(raw)
        if isinstance(cond, p.Absent):
            raw = self.raw(cond.path)
            return raw is ABSENT or (isinstance(raw, list) and not raw)
        if isinstance(cond, p.IsNull):
            return self.raw(cond.path) is NULL
        if isinstance(cond, p.Compare):
            raw = self.raw(cond.path)
            if isinstance(raw, list):  # FHIR: a path over a repeating element, any item
                return any(self.compare(cond, self.scalar(v)) for v in raw)
            return self.compare(cond, self.scalar(raw))
        if isinstance(cond, p.CountIs):
            raw = self.raw(cond.path)
            items = raw if isinstance(raw, list) else [raw]
            n = sum(1 for v in items if self.occupied(v))
            return {
                "eq": n == cond.number,
                "gte": n >= cond.number,
                "lte": n <= cond.number,
                "gt": n > cond.number,
                "lt": n < cond.number,
            }[cond.op]
        if isinstance(cond, p.AllOf):
            return all(self.holds(c) for c in cond.conditions)
        if isinstance(cond, p.AnyOf):
            return any(self.holds(c) for c in cond.conditions)
        return not self.holds(cond.condition)

    def compare(self, cond: p.Compare, text: str | None) -> bool:
        if text is None:
            return False
        if cond.translate:
            text = self.valuesets[cond.translate].lookup(text)
            if text is None:
                return False
        if cond.op == "equals":
            return text == cond.values[0]
        if cond.op == "in":
            return text in cond.values
        if cond.op == "starts_with":
            return text.startswith(cond.values[0])
        return self.valuesets[cond.valueset].lookup(text) is not None


def _source_text(spec: p.Spec) -> str:
    src = spec.source
    if isinstance(src, (p.Read, p.Join, p.Count)):
        return src.path.text
    if isinstance(src, p.FirstOf):
        return " | ".join(filter(None, (_source_text(a.spec) for a in src.alternatives)))
    return ""


def instances(message: Message, anchors: tuple[str, ...]) -> list[list[Segment]]:
    """Split the message at its anchor segments (``foreach``).

    Anchors are listed in the order a group opens with them (``[ORC, OBR]``). A new
    instance starts at an anchor the current one has already seen, or at one that
    comes earlier in that order than an anchor it has seen — so with ``[ORC, OBR]``,
    ``ORC OBR OBX ORC OBR`` is two instances, ``OBR OBX OBR OBX`` two, and
    ``OBR OBX ORC OBR`` two as well (the ORC opens the second order, it does not join
    the first). Segments before the first anchor belong to none.
    """
    rank = {name: i for i, name in enumerate(anchors)}
    out: list[list[Segment]] = []
    current: list[Segment] | None = None
    seen: set[str] = set()
    highest = -1
    for seg in message.segments:
        position = rank.get(seg.name)
        if position is not None and (current is None or seg.name in seen or position < highest):
            current = []
            seen = set()
            highest = -1
            out.append(current)
        if current is not None:
            current.append(seg)
            if position is not None:
                seen.add(seg.name)
                highest = max(highest, position)
    return out


def _anchor_position(message: Message, scope: Sequence[Segment]) -> int:
    """Where an instance starts; with its length it identifies the instance for the
    read cache (two rules with different anchors may cut the same segments)."""
    first = scope[0]
    for i, seg in enumerate(message.segments):
        if seg is first:
            return i
    return -2


def message_type(message: Message) -> tuple[str, str]:
    """(MSH-9.1, MSH-9.2), unescaped, "" when absent: what ``match.message_type`` tests."""
    code = read(message, _MSH_9_1)
    trigger = read(message, _MSH_9_2)
    return (code if isinstance(code, str) else "", trigger if isinstance(trigger, str) else "")


def matches(
    mapping: p.Mapping,
    message: Message,
    valuesets: Mapping[str, p.ValueSet],
    kind: tuple[str, str] | None = None,
) -> bool:
    code, trigger = kind or message_type(message)
    if not any(t.matches(code, trigger) for t in mapping.message_types):
        return False
    return mapping.when is None or _Run(mapping, message, valuesets).holds(mapping.when)


def matches_resource(
    mapping: p.Mapping, resource: Mapping[str, Any], valuesets: Mapping[str, p.ValueSet]
) -> bool:
    """``match.when`` of a FHIR mapping (the resource type was checked by the caller)."""
    return mapping.when is None or _FhirRun(mapping, resource, valuesets).holds(mapping.when)


_MSH_9_1 = parse_path("MSH-9.1")
_MSH_9_2 = parse_path("MSH-9.2")


def evaluate(
    mapping: p.Mapping,
    message: Message,
    valuesets: Mapping[str, p.ValueSet],
    *,
    digest: str,
    received_at: datetime,
) -> Normalised:
    run = _Run(mapping, message, valuesets)
    return _evaluate(
        run,
        digest,
        lambda anchors: instances(message, anchors),
        lambda: _coverage(mapping, message, run),
    )


def evaluate_resource(
    mapping: p.Mapping,
    resource: Mapping[str, Any],
    valuesets: Mapping[str, p.ValueSet],
    *,
    digest: str,
    received_at: datetime,
) -> Normalised:
    """Evaluate a FHIR mapping over one resource (its parsed JSON)."""
    run = _FhirRun(mapping, resource, valuesets)
    return _evaluate(run, digest, _no_instances, lambda: _element_coverage(mapping, resource, run))


def _no_instances(anchors: tuple[str, ...]) -> list[list[Segment]]:
    raise AssertionError("FHIR rules have no foreach (the compiler refuses it)")


def _evaluate(
    run: _Run,
    digest: str,
    cut: Callable[[tuple[str, ...]], list[list[Segment]]],
    coverage: Callable[[], None],
) -> Normalised:
    mapping = run.mapping
    events: list[CanonicalEvent] = []
    fired: list[str] = []
    ignored_by: p.Rule | None = None  # a message-level ignore rule
    hid_by: p.Rule | None = None  # the first rule that hid a foreach instance
    handled: dict[tuple[str, ...], set[int]] = {}  # instances some rule fired on
    hidden: dict[tuple[str, ...], set[int]] = {}  # instances an ignore rule hid
    cuts: dict[tuple[str, ...], list[list[Segment]]] = {}
    for rule in mapping.rules:
        run.rule, run.field = rule.id, ""
        if rule.foreach and rule.foreach not in cuts:
            cuts[rule.foreach] = cut(rule.foreach)
        scopes: list[list[Segment] | None] = list(cuts[rule.foreach]) if rule.foreach else [None]
        done = handled.setdefault(rule.foreach, set())
        hid = hidden.setdefault(rule.foreach, set())
        for index, scope in enumerate(scopes):
            if index in hid or (mapping.first_match and index in done):
                continue
            run.scope = scope
            run.scope_index = -1 if scope is None else run.anchor(scope)
            run.scope_size = 0 if scope is None else len(scope)
            if rule.when is not None and not run.holds(rule.when):
                continue
            if rule.id not in fired:
                fired.append(rule.id)
            done.add(index)
            if rule.emit is None:
                if scope is None:
                    ignored_by = rule
                    break
                hid.add(index)
                hid_by = hid_by or rule
                continue
            events.append(_emit(run, rule, len(events)))
        run.scope, run.scope_index = None, -1
        if ignored_by is not None:
            break
        if mapping.first_match and not rule.foreach and events:
            break
    run.rule = run.field = ""
    if ignored_by is None and (events or hid_by is not None):
        _unhandled_instances(mapping, cuts, handled, run)

    def result(outcome: Outcome, **extra: Any) -> Normalised:
        return Normalised(
            outcome,
            diagnostics=tuple(run.diagnostics),
            mapping_id=mapping.id,
            mapping_digest=digest,
            fired=tuple(fired),
            **extra,
        )

    if run.failed:
        return _failed(result, run)
    if not events:
        ignored_by = ignored_by or hid_by
        if ignored_by is not None:
            return result(Outcome.IGNORED, rule_id=ignored_by.id)
        _no_match(mapping, run)
        return _failed(result, run) if run.failed else result(Outcome.IGNORED)
    coverage()
    if run.failed:
        return _failed(result, run)
    return result(Outcome.PROCESSED, events=tuple(events), clues=_clues(events[0]))


def _emit(run: _Run, rule: p.Rule, ordinal: int) -> CanonicalEvent:
    assert rule.emit is not None
    fields: dict[str, Any] = {}
    for name, spec in rule.fields:
        run.field = name
        got = run.value(spec)
        if not isinstance(got, _Nothing):
            fields[name] = got
    run.field = ""
    reported = {d.field for d in run.diagnostics if d.code == "required_value_missing"}
    for name in sorted(CATALOGUE[rule.emit].required):
        if (name not in fields or fields[name] is CLEAR) and name not in reported:
            run.field = name
            run.note("required_value_missing", f"{rule.emit.value} needs {name}")
            run.field = ""
    if not any(
        isinstance(fields.get(name), dict) and fields[name] is not CLEAR for name in CORRELATE
    ):
        run.note(
            "no_correlation_key",
            f"{rule.emit.value} has no correlation key (every correlate.* field is empty)",
        )
    if "occurred_at" not in fields:
        known = {(d.code, d.path) for d in run.diagnostics if d.rule == rule.id}
        mark = len(run.diagnostics)
        run.field = "occurred_at"
        at = run.value(run.fallback_time)
        run.field = ""
        # A field of this rule that read MSH-7 already said its zone was assumed.
        run.diagnostics[mark:] = [
            d for d in run.diagnostics[mark:] if (d.code, d.path) not in known
        ]
        if isinstance(at, str):
            fields["occurred_at"] = at
    return CanonicalEvent(rule.emit, fields, rule.id, ordinal)


def _failed(result: Any, run: _Run) -> Normalised:
    """A mapping_error names the rule of its first error, so an analyst knows where to look."""
    rule = next((d.rule for d in run.diagnostics if d.severity == "error" and d.rule), "")
    failed: Normalised = result(Outcome.MAPPING_ERROR, rule_id=rule)
    return failed


_NO_MATCH_SEVERITY = {
    p.OnNoMatch.ERROR: "error",
    p.OnNoMatch.WARN: "warning",
    p.OnNoMatch.IGNORE: "info",
}


def _no_match(mapping: p.Mapping, run: _Run) -> None:
    severity = _NO_MATCH_SEVERITY[mapping.on_no_match]
    run.note("no_rule_matched", f"no rule of {mapping.id} matched this message", severity=severity)


def _unhandled_instances(
    mapping: p.Mapping,
    cuts: Mapping[tuple[str, ...], list[list[Segment]]],
    handled: Mapping[tuple[str, ...], set[int]],
    run: _Run,
) -> None:
    """``on_no_match`` per ``foreach`` instance: one order of three that no rule reads
    (an ORC-1 nobody expected) is reported, not lost among its siblings' events."""
    severity = _NO_MATCH_SEVERITY[mapping.on_no_match]
    for anchors, cut in cuts.items():
        done = handled.get(anchors, set())
        for index, scope in enumerate(cut):
            if index not in done:
                run.note(
                    "no_rule_matched",
                    f"no rule of {mapping.id} matched {'/'.join(anchors)} instance "
                    f"{index + 1} (starting with {scope[0].name})",
                    path=scope[0].name,
                    severity=severity,
                )


def _coverage(mapping: p.Mapping, message: Message, run: _Run) -> None:
    known = mapping.read_segments | mapping.ignore_segments | {"MSH"}
    unread: dict[str, int] = {}
    for seg in message.segments:
        if seg.name not in known:
            unread[seg.name] = unread.get(seg.name, 0) + 1
    for name, count in unread.items():
        run.note(
            "unmapped_segment",
            f"{count} {name} segment(s) neither read nor listed in segments.ignore",
            path=name,
            severity="error" if mapping.strict_coverage else "warning",
        )


class _FhirRun(_Run):
    """Reading a resource: FHIRPath selections, FHIR readers, no scopes, no HL7 null."""

    fallback_time = _LAST_UPDATED_SPEC

    def __init__(
        self,
        mapping: p.Mapping,
        resource: Mapping[str, Any],
        valuesets: Mapping[str, p.ValueSet],
    ) -> None:
        self.mapping = mapping
        self.resource = resource
        self.valuesets = valuesets
        self.scope = None
        self.scope_index = -1
        self.scope_size = 0
        self.fhir_cache: dict[int, Any] = {}
        self.diagnostics = []
        self.rule = ""
        self.field = ""
        self.failed = False
        kind = resource.get("resourceType")
        self.resource_type = kind if isinstance(kind, str) else ""

    def raw(self, path: p.Path) -> Any:
        """ABSENT, the one item of a singular path, or the list a ``many`` path selects."""
        got = self.fhir_cache.get(id(path))
        if got is not None:
            return got
        assert isinstance(path, FhirPath)
        items, nulls = select(path, self.resource)
        if nulls:
            # Reported once per path (the read is cached), where the mapping reads it.
            self.note(
                "null_value",
                f"{path.text} meets a JSON null, which FHIR does not allow; read as absent",
                path=path.text,
                severity="warning",
            )
        if path.many:
            got = items
        elif not items:
            got = ABSENT
        elif len(items) == 1:
            got = items[0]
        else:  # the models say one; the JSON sent several (invalid FHIR)
            self.note(
                "invalid_value",
                f"{path.text} holds {len(items)} values where FHIR allows one; read as absent",
                path=path.text,
                severity="warning",
            )
            got = ABSENT
        self.fhir_cache[id(path)] = got
        return got

    def scalar(self, raw: Any) -> str | None:
        if isinstance(raw, str):
            return raw
        if isinstance(raw, bool):
            return "true" if raw else "false"
        if isinstance(raw, (int, float)):
            return str(raw)
        return None

    def occupied(self, raw: Any) -> bool:
        return raw is not ABSENT

    def anchor(self, scope: Sequence[Segment]) -> int:
        raise AssertionError("FHIR rules have no foreach")

    def typed(self, spec: p.Spec, raw: Any, path: p.Path) -> Any:
        assert isinstance(path, FhirPath)
        assumed = Assumed()
        try:
            got = read_fhir(
                spec.reader, raw, path, self.resource_type, self.mapping.timezone, assumed
            )
        except BadValue as exc:
            self.note(
                "invalid_value",
                f"{path.text} is not a valid {spec.reader.value}: {exc}",
                path=path.text,
                severity="warning",
            )
            return MISSING
        if assumed.zone:
            self.note(
                "timezone_assumed",
                f"{path.text} has no UTC offset; {self.mapping.timezone_name} assumed",
                path=path.text,
                severity="info",
            )
        return MISSING if got is None or got == "" else got


def _element_coverage(mapping: p.Mapping, resource: Mapping[str, Any], run: _Run) -> None:
    """The FHIR counterpart of unread segments: top-level elements no path reads and
    ``elements.ignore`` does not list. A modifierExtension nobody reads is an error
    whatever ``strict`` says: it may change what the resource means (R4 §2.4.1.1)."""
    known = mapping.read_elements | mapping.ignore_elements | ALWAYS_KNOWN
    for name, value in resource.items():
        if name in known or name.startswith("_"):
            continue  # _status and friends extend a primitive: they go with it
        if value is None:
            run.note(
                "null_value",
                f"{name} is JSON null, which FHIR does not allow; read as absent",
                path=name,
                severity="warning",
            )
            continue
        if name == "modifierExtension":
            run.note(
                "unread_modifier_extension",
                "modifierExtension may change the meaning of the resource and no rule reads "
                "it; read it, or list it in elements.ignore once you know what it says",
                path=name,
            )
        elif name not in mapping.known_elements:
            run.note(
                "unknown_element",
                f"{name} is not an element of {'/'.join(mapping.resource_types)} in FHIR R4",
                path=name,
                severity="warning",
            )
        else:
            run.note(
                "unmapped_element",
                f"{name} is neither read nor listed in elements.ignore",
                path=name,
                severity="error" if mapping.strict_coverage else "warning",
            )


def _clues(event: CanonicalEvent) -> dict[str, str]:
    out: dict[str, str] = {}
    patient = event.fields.get("patient.identifier")
    if isinstance(patient, dict) and patient.get("value"):
        out["patient"] = f"{patient['value']}^{patient.get('namespace', '')}"
    specialty = event.fields.get("specialty")
    if isinstance(specialty, str):
        out["specialty"] = specialty
    return out
