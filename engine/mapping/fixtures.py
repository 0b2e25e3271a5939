"""Analysts' fixtures (``*.cases.yaml``): a message in, the events (or error) expected out.

A case states what it cares about and nothing more: the events in order with the
fields listed (others are not compared), the rule that ignored the message, or the
error. Failures print as path-level want/got lines an analyst can act on::

    FAIL hl7v2/tests/orders.cases.yaml:14 > new cardiology referral
      events[0].fields.priority  -want "routine"  +got "stat"  (rule new_referral)

Warnings and errors are compared exactly when ``diagnostics`` is given; notes
(``timezone_assumed``, ``default_used``) only when the case lists them.

A FHIR case gives its resource as ``resource:`` (JSON text) or ``file:`` a ``.json``
sample; ``index: n`` then takes the n-th entry of a Bundle, as the intake splits one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.domain.events import CLEAR, Diagnostic, Normalised, Outcome
from engine.mapping.mapset import MappingSet, mapping_files, overlay_of
from engine.mapping.source import Document, SourceError, load
from engine.protocol.fhir import link_entries
from engine.protocol.hl7v2 import HeaderError, codec_for, decode, parse_header

CASES_KEYS = ("mapping", "overlay", "context", "cases")
CASE_KEYS = ("name", "message", "file", "index", "overlay", "expect", "resource")
EXPECT_KEYS = ("outcome", "rule", "events", "diagnostics", "error")
EVENT_KEYS = ("emit", "rule", "fields")
DIAGNOSTIC_KEYS = ("code", "severity", "rule", "field", "path")
DEFAULT_RECEIVED_AT = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class CaseResult:
    file: str
    line: int
    name: str
    problems: list[str] = field(default_factory=list)
    result: Normalised | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        head = f"{'ok  ' if self.ok else 'FAIL'} {self.file}:{self.line} > {self.name}"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


@dataclass
class Run:
    results: list[CaseResult]
    fired: dict[str, set[str]]  # mapping id → rules that fired in some case

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]


def case_files(root: Path) -> list[Path]:
    return [p for p in mapping_files(root) if p.name.endswith(".cases.yaml")]


def read_messages(path: Path) -> list[str]:
    """Messages in a sample file: line endings normalised to CR, batch envelopes (FHS,
    BHS, BTS, FTS), comment lines (``#``, ``//``) and text before the first MSH dropped,
    split at each MSH; decoded per the first MSH-18."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        charset = parse_header(raw.lstrip(b"\r\n").split(b"\r")[0].split(b"\n")[0]).charset
    except HeaderError:
        charset = ""
    text = decode(raw, codec_for(charset, "utf-8"))
    lines = [ln for ln in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if ln]
    messages: list[list[str]] = []
    for line in lines:
        if line[:3] in ("FHS", "BHS", "BTS", "FTS") or line.startswith(("#", "//")):
            continue
        if line.startswith("MSH"):
            messages.append([])
        if messages:  # text before the first MSH (a file's preamble) is not a message
            messages[-1].append(line)
    return ["\r".join(m) + "\r" for m in messages]


def run_cases(mapset: MappingSet, files: Iterable[Path], *, name_filter: str = "") -> Run:
    results: list[CaseResult] = []
    fired: dict[str, set[str]] = {m.id: set() for m in mapset.mappings}
    for path in files:
        try:
            doc = load(path)
            results.extend(_run_file(mapset, doc, path, name_filter, fired))
        except SourceError as exc:
            results.append(CaseResult(exc.file, exc.line, "(file)", [exc.message]))
        except _CaseError as exc:
            err = exc.locate(doc)
            results.append(
                CaseResult(
                    err.file, err.line, "(file)", [f"{err.file}:{err.line}:{err.column}: {exc}"]
                )
            )
    return Run(results, fired)


class _CaseError(Exception):
    def __init__(self, at: tuple[str | int, ...], message: str, *, key: bool = False) -> None:
        super().__init__(message)
        self.at = at
        self.key = key  # locate the key itself (a misspelt key), not its value

    def locate(self, doc: Document) -> SourceError:
        return doc.key_error(self.at, str(self)) if self.key else doc.error(self.at, str(self))


def _run_file(
    mapset: MappingSet, doc: Document, path: Path, name_filter: str, fired: dict[str, set[str]]
) -> list[CaseResult]:
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise doc.error((), "a fixtures file needs `cases:`, a list of cases")
    _known(doc, data, (), CASES_KEYS)
    context = data.get("context") or {}
    received_at = DEFAULT_RECEIVED_AT
    if isinstance(context, dict) and context.get("received_at"):
        try:
            received_at = datetime.fromisoformat(str(context["received_at"]))
        except ValueError:
            raise doc.error(("context", "received_at"), "received_at is ISO 8601") from None
    out = []
    for i, case in enumerate(data["cases"]):
        at: tuple[str | int, ...] = ("cases", i)
        line = doc.error(at, "").line
        name = str(case.get("name", f"case {i + 1}")) if isinstance(case, dict) else f"case {i + 1}"
        if name_filter and name_filter.casefold() not in name.casefold():
            continue
        result = CaseResult(doc.file, line, name)
        try:
            if not isinstance(case, dict):
                raise _CaseError(at, "a case is a mapping with name, message (or file), expect")
            _known(doc, case, at, CASE_KEYS)
            given = _input(case, at, path)
            # Fixtures inside sources/<name>/ speak for that source unless they say otherwise.
            overlay = case.get("overlay", data.get("overlay", overlay_of(mapset.root, path)))
            if isinstance(given, str):
                got = mapset.normalise(given, received_at=received_at, overlay=overlay)
            else:
                got = mapset.normalise_resource(given, received_at=received_at, overlay=overlay)
            result.result = got
            fired.setdefault(got.mapping_id, set()).update(got.fired)
            want_mapping = data.get("mapping")
            if want_mapping and got.mapping_id and got.mapping_id != want_mapping:
                result.problems.append(f"mapping  -want {want_mapping!r}  +got {got.mapping_id!r}")
            expect = case.get("expect")
            if not isinstance(expect, dict):
                raise _CaseError(at, "a case needs `expect:` (events, rule, or error)")
            _known(doc, expect, (*at, "expect"), EXPECT_KEYS)
            _check_expect(doc, expect, (*at, "expect"))
            result.problems.extend(_compare(expect, got))
        except _CaseError as exc:
            err = exc.locate(doc)
            result.line = err.line
            result.problems.append(f"{err.file}:{err.line}:{err.column}: {exc}")
        out.append(result)
    return out


def _known(
    doc: Document, data: Mapping[str, Any], at: tuple[str | int, ...], keys: tuple[str, ...]
) -> None:
    for key in data:
        if key not in keys:
            raise _CaseError(
                (*at, key), f"unknown key {key!r}; expected one of {', '.join(keys)}", key=True
            )


def _input(case: Mapping[str, Any], at: tuple[str | int, ...], path: Path) -> str | dict[str, Any]:
    """The HL7 message (text) or FHIR resource (parsed JSON) a case feeds the mappings."""
    given = [k for k in ("message", "resource", "file") if k in case]
    if len(given) > 1:
        raise _CaseError((*at, given[1]), "a case takes one of message, resource, file")
    if "resource" in case:
        if "index" in case:
            raise _CaseError((*at, "index"), "index picks from a sample file, not from resource:")
        return _resource(str(case["resource"] or ""), (*at, "resource"), "resource")
    if "file" in case and str(case["file"]).endswith(".json"):
        return _sample_resource(case, at, path)
    return _message(case, at, path)


def _resource(text: str, at: tuple[str | int, ...], what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _CaseError(
            at, f"{what} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise _CaseError(at, f"{what} is not a FHIR resource (a JSON object with resourceType)")
    return data


def _sample_resource(
    case: Mapping[str, Any], at: tuple[str | int, ...], path: Path
) -> dict[str, Any]:
    sample = path.parent / str(case["file"])
    if not sample.is_file():
        raise _CaseError((*at, "file"), f"no such sample file: {sample}")
    try:
        text = sample.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        raise _CaseError((*at, "file"), f"{sample.name} is not UTF-8 (FHIR JSON is)") from None
    resource = _resource(text, (*at, "file"), sample.name)
    if "index" not in case:
        return resource
    raw_index = str(case["index"])
    entries = resource.get("entry") if resource.get("resourceType") == "Bundle" else None
    if not isinstance(entries, list):
        raise _CaseError((*at, "index"), f"index picks a Bundle entry; {sample.name} is no Bundle")
    if not raw_index.isdigit() or not 1 <= int(raw_index) <= len(entries):
        raise _CaseError((*at, "index"), f"{sample.name} holds {len(entries)} entries")
    # The entry as the intake stores it: references to other entries made readable.
    inner = link_entries(resource)[int(raw_index) - 1]
    if not isinstance(inner, dict) or not isinstance(inner.get("resourceType"), str):
        raise _CaseError((*at, "index"), f"entry {raw_index} of {sample.name} carries no resource")
    return inner


def _message(case: Mapping[str, Any], at: tuple[str | int, ...], path: Path) -> str:
    if "message" in case:
        text = str(case["message"]).strip("\n")
        return "\r".join(text.split("\n")) + "\r"
    if "file" not in case:
        raise _CaseError(
            at,
            "a case needs `message:` (inline) or `file:` (a sample); for FHIR, `resource:` "
            "(JSON) or a .json file",
        )
    sample = path.parent / str(case["file"])
    if not sample.is_file():
        raise _CaseError((*at, "file"), f"no such sample file: {sample}")
    messages = read_messages(sample)
    raw_index = str(case.get("index", "1"))
    if not raw_index.isdigit():
        raise _CaseError((*at, "index"), "index is a number")
    index = int(raw_index)
    if not 1 <= index <= len(messages):
        raise _CaseError((*at, "index"), f"{sample.name} holds {len(messages)} message(s)")
    return messages[index - 1]


def _check_expect(doc: Document, expect: Mapping[str, Any], at: tuple[str | int, ...]) -> None:
    """Refuse a malformed expectation at its line, before comparing anything."""
    events = expect.get("events", [])
    if events is not None and not isinstance(events, list):
        raise _CaseError((*at, "events"), "events is a list of {emit, rule, fields}")
    for i, event in enumerate(events or []):
        here = (*at, "events", i)
        if not isinstance(event, dict):
            raise _CaseError(here, "an expected event is a mapping: {emit: ..., fields: {...}}")
        _known(doc, event, here, EVENT_KEYS)
        if not isinstance(event.get("fields", {}), dict):
            raise _CaseError((*here, "fields"), "fields maps event fields to expected values")
    diagnostics = expect.get("diagnostics", [])
    if diagnostics is not None and not isinstance(diagnostics, list):
        raise _CaseError((*at, "diagnostics"), "diagnostics is a list")
    for i, diag in enumerate(diagnostics or []):
        if isinstance(diag, dict):
            _known(doc, diag, (*at, "diagnostics", i), DIAGNOSTIC_KEYS)
    error = expect.get("error")
    if isinstance(error, dict):
        _known(doc, error, (*at, "error"), DIAGNOSTIC_KEYS)


def _compare(expect: Mapping[str, Any], got: Normalised) -> list[str]:
    problems: list[str] = []
    want_outcome = expect.get("outcome")
    if want_outcome is None:
        if "error" in expect:
            want_outcome = Outcome.MAPPING_ERROR.value
        elif "rule" in expect and not expect.get("events"):
            want_outcome = Outcome.IGNORED.value
        elif expect.get("events"):
            want_outcome = Outcome.PROCESSED.value
        elif "events" in expect:
            want_outcome = Outcome.IGNORED.value  # `events: []`: nothing, and no error
    if want_outcome is not None and want_outcome != got.outcome.value:
        problems.append(f"outcome  -want {want_outcome!r}  +got {got.outcome.value!r}")
        problems.extend(f"  {_diag_text(d)}" for d in got.diagnostics if d.severity != "info")
    if "rule" in expect and expect["rule"] != got.rule_id:
        problems.append(f"rule  -want {expect['rule']!r}  +got {got.rule_id or None!r}")
    if "events" in expect:
        problems.extend(_compare_events(expect["events"] or [], got))
    if "error" in expect:
        problems.extend(_compare_error(expect["error"], got))
    if "diagnostics" in expect:
        problems.extend(_compare_diagnostics(expect["diagnostics"] or [], got.diagnostics))
    return problems


def _compare_events(want: list[Any], got: Normalised) -> list[str]:
    problems = []
    for i, spec in enumerate(want):
        where = f"events[{i}]"
        if i >= len(got.events):
            problems.append(f"{where}  -want {spec.get('emit')!r}  +got nothing")
            continue
        event = got.events[i]
        if spec.get("emit") != event.type.value:
            problems.append(f"{where}.emit  -want {spec.get('emit')!r}  +got {event.type.value!r}")
        if "rule" in spec and spec["rule"] != event.rule_id:
            problems.append(f"{where}.rule  -want {spec['rule']!r}  +got {event.rule_id!r}")
        for name, value in (spec.get("fields") or {}).items():
            have = event.fields.get(name)
            if have is None:
                problems.append(
                    f"{where}.fields.{name}  -want {_show(value)}  +got nothing  "
                    f"(rule {event.rule_id})"
                )
            elif _canonical(value) != _canonical(have):
                problems.append(
                    f"{where}.fields.{name}  -want {_show(value)}  +got {_show(have)}  "
                    f"(rule {event.rule_id})"
                )
    for j in range(len(want), len(got.events)):
        event = got.events[j]
        problems.append(
            f"events[{j}]  +got {event.type.value!r} (rule {event.rule_id}) not expected"
        )
    return problems


def _compare_error(want: Any, got: Normalised) -> list[str]:
    errors = [d for d in got.diagnostics if d.severity == "error"]
    spec = want if isinstance(want, dict) else {"code": want}
    for d in errors:
        if all(str(getattr(d, k)) == str(v) for k, v in spec.items() if k in DIAGNOSTIC_KEYS):
            return []
    got_text = "; ".join(_diag_text(d) for d in errors) or "no error"
    return [f"error  -want {_show(spec)}  +got {got_text}"]


def _compare_diagnostics(want: list[Any], got: Iterable[Diagnostic]) -> list[str]:
    problems = []
    remaining = list(got)
    for spec in want:
        spec = spec if isinstance(spec, dict) else {"code": spec}
        hit = next(
            (d for d in remaining if all(str(getattr(d, k)) == str(v) for k, v in spec.items())),
            None,
        )
        if hit is None:
            problems.append(f"diagnostics  -want {_show(spec)}  +got nothing like it")
        else:
            remaining.remove(hit)
    for d in remaining:
        if d.severity != "info":
            problems.append(f"diagnostics  +got {_diag_text(d)}")
    return problems


def _diag_text(d: Diagnostic) -> str:
    extra = ", ".join(
        f"{k} {v}" for k, v in (("rule", d.rule), ("field", d.field), ("path", d.path)) if v
    )
    return f"{d.severity} {d.code}: {d.message}" + (f" ({extra})" if extra else "")


def _canonical(value: Any) -> Any:
    if value is CLEAR:
        return {"clear": "true"}
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return str(value)


def _show(value: Any) -> str:
    return json.dumps(_canonical(value), ensure_ascii=False)
