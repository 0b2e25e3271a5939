"""Policy fixtures (``policies/tests/*.cases.yaml``): a referral's story in, timers out.

A case is a sequence of steps in time order. An ``event`` step folds a canonical event
into the referral (the real state machine and projection) and asks the policy what it
arms and clears; an ``until`` step only lets time pass. Before either, every pending
timer due by the step's time fires, earliest first (at the same instant: windows, then
ladders in file order), as the scheduler would: ``effects`` of a step are what those
timers did; ``clear`` and ``pending`` list timers in that order too. A case states what
it cares about: each listed item is compared on the keys it gives, lists in order and in
full::

    schema: referral-policy-cases/v1
    cases:
      - name: routine referral never scheduled
        start: 2025-03-03T09:00:00-05:00
        steps:
          - {at: +0h, event: referral.created, fields: {specialty: cardiology}}
          - at: +1h
            event: referral.sent
            expect:
              set: [{rule: unscheduled, kind: window, due: +14d1h}]
          - until: +15d
            expect:
              effects: [{kind: outreach, at: +3d1h}, ...]

Times are offsets from ``start`` (``+3d``, ``+1d12h``) or ISO 8601 with an offset.
Failures print as want/got lines an analyst can act on::

    FAIL policies/tests/default.cases.yaml:12 > routine referral never scheduled
      step 2 (referral.sent) set[0].due  -want +14d  +got +14d1h
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from engine.domain.events import CATALOGUE
from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import Event
from engine.mapping.source import Document, KeyPath, SourceError, load
from engine.policy.language import (
    CASES_SUFFIX,
    EVENTS,
    POLICIES_DIR,
    STATES,
    Checker,
    Policy,
    PolicyError,
    format_duration,
    hint,
    load_policy,
    parse_duration,
)
from engine.policy.timers import Effect, Timer, on_due, on_transition

__all__ = ["CASES_SCHEMA", "PolicyCaseResult", "policy_case_files", "run_policy_cases"]

CASES_SCHEMA = "referral-policy-cases/v1"
TESTS_DIR = "tests"
FILE_KEYS = ("schema", "description", "cases")
CASE_KEYS = ("name", "start", "steps")
STEP_KEYS = ("at", "event", "fields", "until", "expect")
EXPECT_KEYS = ("state", "set", "clear", "pending", "effects")
TIMER_KEYS = ("rule", "kind", "step", "due")
CLEAR_KEYS = ("rule", "kind", "step")
EFFECT_KEYS = (
    "kind",
    "rule",
    "at",
    "reason",
    "level",
    "owner",
    "due",
    "template",
    "prefer",
    "to",
    "route",
)
_TIMES = frozenset({"due", "at"})


@dataclass
class PolicyCaseResult:
    file: str
    line: int
    name: str
    problems: list[str] = field(default_factory=list)
    rules: set[str] = field(default_factory=set)  # every rule that armed a timer in the case

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        head = f"{'ok  ' if self.ok else 'FAIL'} {self.file}:{self.line} > {self.name}"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def policy_case_files(root: Path) -> list[Path]:
    """The fixtures of a mappings directory's policies: ``policies/tests/*.cases.yaml``."""
    folder = root / POLICIES_DIR / TESTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(CASES_SUFFIX))


def run_policy_cases(path: Path, policy: Policy | None = None) -> list[PolicyCaseResult]:
    """Run every case of one fixture file against ``policy`` (default: the policy set of
    the mappings directory the file sits in)."""
    if policy is None:
        root = next((p.parent for p in path.resolve().parents if p.name == POLICIES_DIR), None)
        if root is None:
            return [PolicyCaseResult(str(path), 1, "(file)", [_NO_POLICY])]
        try:
            policy = load_policy(root)
        except PolicyError as exc:
            return [PolicyCaseResult(str(path), 1, "(policy)", exc.errors)]
    try:
        doc = load(path)
    except SourceError as exc:
        return [PolicyCaseResult(exc.file, exc.line, "(file)", [str(exc)])]
    check = Checker(doc)
    cases = check.attempt(_read, check)
    if cases is None or check.errors:
        return [PolicyCaseResult(str(path), 1, "(file)", list(check.errors))]
    return [_run(case, policy, doc) for case in cases]


_NO_POLICY = "a policy fixture lives under a policies/ folder (policies/tests/*.cases.yaml)"


# ---- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    at: KeyPath
    time: datetime
    event: Event | None  # None: an `until` step
    fields: Mapping[str, str]
    expect: Mapping[str, Any]


@dataclass(frozen=True)
class _Case:
    at: KeyPath
    name: str
    start: datetime
    steps: tuple[_Step, ...]


def _read(check: Checker) -> list[_Case]:
    data = check.mapping(check.doc.data, (), "the file")
    if data.get("schema") != CASES_SCHEMA:
        check.fail(("schema",), f"expected `schema: {CASES_SCHEMA}` at the top")
    check.known_keys(data, (), FILE_KEYS)
    out: list[_Case] = []
    for i, item in enumerate(check.items(data.get("cases") or [], ("cases",), "cases")):
        case = check.attempt(_case, check, item, ("cases", i))
        if case is not None:
            out.append(case)
    return out


def _case(check: Checker, value: Any, at: KeyPath) -> _Case:
    data = check.mapping(value, at, "a case")
    check.known_keys(data, at, CASE_KEYS)
    check.required(data, at, ("name", "start", "steps"), "a case")
    name = check.text(data["name"], (*at, "name"), "name")
    start = _absolute(check, data["start"], (*at, "start"))
    steps: list[_Step] = []
    last = start
    for i, item in enumerate(check.items(data["steps"], (*at, "steps"), "steps")):
        where = (*at, "steps", i)
        step = _step(check, item, where, start)
        if step.time < last:
            check.fail(where, "steps run in time order: this one is earlier than the one before")
        last = step.time
        steps.append(step)
    if not steps or steps[0].event is not Event.REFERRAL_CREATED:
        check.fail((*at, "steps"), "a case starts with a referral.created step")
    return _Case(at, name, start, tuple(steps))


def _step(check: Checker, value: Any, at: KeyPath, start: datetime) -> _Step:
    data = check.mapping(value, at, "a step")
    check.known_keys(data, at, STEP_KEYS)
    if ("event" in data) == ("until" in data):
        check.fail(at, "a step is either `event:` (with `at:`) or `until:`")
    event: Event | None = None
    fields: dict[str, str] = {}
    if "event" in data:
        check.required(data, at, ("at",), "an event step")
        name = check.choice(data["event"], (*at, "event"), "event", EVENTS)
        event = Event(name)
        time = _time(check, data["at"], (*at, "at"), start)
        if data.get("fields") is not None:
            fields = _fields(check, data["fields"], (*at, "fields"), event)
    else:
        if "at" in data or "fields" in data:
            check.fail(at, "an `until:` step has no `at:` or `fields:`")
        time = _time(check, data["until"], (*at, "until"), start)
    expect: dict[str, Any] = {}
    if data.get("expect") is not None:
        expect = _expect(check, data["expect"], (*at, "expect"), start)
    return _Step(at, time, event, fields, expect)


def _fields(check: Checker, value: Any, at: KeyPath, event: Event) -> dict[str, str]:
    data = check.mapping(value, at, "fields")
    known = tuple(CATALOGUE[event].fields)
    out: dict[str, str] = {}
    for key, raw in data.items():
        if key not in known:
            check.fail(
                (*at, key), f"{event.value} has no field {key!r}{hint(key, known)} (see events)"
            )
        out[key] = check.text(raw, (*at, key), key)
    return out


def _expect(check: Checker, value: Any, at: KeyPath, start: datetime) -> dict[str, Any]:
    data = check.mapping(value, at, "expect")
    check.known_keys(data, at, EXPECT_KEYS)
    out: dict[str, Any] = {}
    for key, raw in data.items():
        where = (*at, key)
        if key == "state":
            out[key] = check.choice(raw, where, "state", STATES)
            continue
        allowed = {"effects": EFFECT_KEYS, "clear": CLEAR_KEYS}.get(key, TIMER_KEYS)
        items: list[dict[str, Any]] = []
        for i, item in enumerate(check.items(raw if raw is not None else [], where, key)):
            entry = check.mapping(item, (*where, i), f"an item of {key}")
            check.known_keys(entry, (*where, i), allowed)
            items.append(
                {
                    k: _want(check, k, v, (*where, i, k), start)
                    for k, v in entry.items()
                    if v is not None
                }
            )
        out[key] = items
    return out


def _want(check: Checker, key: str, value: Any, at: KeyPath, start: datetime) -> Any:
    if key in _TIMES:
        return _time(check, value, at, start)
    if key == "prefer":
        return tuple(check.texts(value, at, key))
    if key in ("step", "level"):
        text = check.text(value, at, key)
        if not (text.isascii() and text.isdigit()):
            check.fail(at, f"{key} must be a whole number")
        return int(text)
    return check.text(value, at, key)


def _absolute(check: Checker, value: Any, at: KeyPath) -> datetime:
    text = check.text(value, at, "a time")
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        found = None
    if found is None or found.tzinfo is None:
        check.fail(at, "a time is ISO 8601 with an offset, like 2025-03-03T09:00:00-05:00")
    return found


def _time(check: Checker, value: Any, at: KeyPath, start: datetime) -> datetime:
    text = check.text(value, at, "a time")
    if text.startswith("+"):
        offset = parse_duration(text[1:])
        if offset is None:
            check.fail(at, "an offset from start is written like +3d, +72h or +1d12h")
        return start + offset
    return _absolute(check, value, at)


# ---- running -----------------------------------------------------------------------------


def _run(case: _Case, policy: Policy, doc: Document) -> PolicyCaseResult:
    line = doc.error(case.at, "").line
    result = PolicyCaseResult(doc.file, line, case.name)
    referral: Referral | None = None
    pending: dict[str, Timer] = {}
    position = {rule.id: i for i, rule in enumerate(policy.rules())}

    def order(timer: Timer) -> tuple[datetime, int, int, str]:
        # Simultaneous timers in the order the policy reads: windows, then ladders.
        return (timer.due_at, position.get(timer.rule, len(position)), timer.step, timer.id)

    for number, step in enumerate(case.steps, 1):
        fired: list[Effect] = []
        armed: list[Timer] = []
        cleared: list[Timer] = []
        # The scheduler never sleeps: everything due by now fires first, earliest first.
        while referral is not None:
            due = sorted((t for t in pending.values() if t.due_at <= step.time), key=order)
            if not due:
                break
            timer = pending.pop(due[0].id)
            effects, next_ = on_due(policy, referral, timer, timer.due_at)
            fired.extend(effects)
            _apply(pending, next_.set, next_.clear, armed, cleared)
        if step.event is not None:
            event = LoggedEvent(step.event, dict(step.fields), step.time, step.time)
            before = referral.state if referral else None
            referral, done = fold(referral, "case", event)
            if referral is None or done.state_after is None:
                result.problems.append(f"step {number}: the referral does not exist yet")
                return result
            change = on_transition(
                policy,
                referral,
                before,
                done.state_after,
                step.event,
                step.time,
                pending=tuple(pending.values()),
            )
            _apply(pending, change.set, change.clear, armed, cleared)
        assert referral is not None  # the first step creates it (checked on reading)
        result.rules.update(t.rule for t in armed)
        label = f"step {number} ({step.event.value if step.event else 'until'})"
        got: dict[str, Any] = {
            "state": referral.state.value,
            "set": [_timer_view(t) for t in armed],
            "clear": [_timer_view(t) for t in sorted(cleared, key=order)],
            "pending": [_timer_view(t) for t in sorted(pending.values(), key=order)],
            "effects": [_effect_view(e) for e in fired],
        }
        for key, want in step.expect.items():
            result.problems.extend(
                f"{label} {p}" for p in _compare(key, want, got[key], case.start)
            )
    return result


def _apply(
    pending: dict[str, Timer],
    set_: tuple[Timer, ...],
    clear: tuple[str, ...],
    armed: list[Timer],
    cleared: list[Timer],
) -> None:
    for ident in clear:
        gone = pending.pop(ident, None)
        if gone is not None:
            cleared.append(gone)
    for timer in set_:
        pending[timer.id] = timer
        armed.append(timer)


def _timer_view(timer: Timer) -> dict[str, Any]:
    return {"rule": timer.rule, "kind": timer.kind, "step": timer.step, "due": timer.due_at}


def _effect_view(effect: Effect) -> dict[str, Any]:
    return {
        "kind": effect.kind,
        "rule": effect.rule,
        "at": effect.at,
        "reason": effect.reason,
        "level": effect.level,
        "owner": effect.owner,
        "due": effect.due_at,
        "template": effect.template,
        "prefer": effect.prefer,
        "to": effect.to,
        "route": effect.route,
    }


def _compare(key: str, want: Any, got: Any, start: datetime) -> list[str]:
    if key == "state":
        return [] if want == got else [f"state  -want {want}  +got {got}"]
    problems: list[str] = []
    for i, (w, g) in enumerate(zip(want, got, strict=False)):
        for name, value in w.items():
            if g.get(name) != value:
                problems.append(
                    f"{key}[{i}].{name}  -want {_show(value, start)}  +got "
                    f"{_show(g.get(name), start)}  ({_summary(g, start)})"
                )
    if len(want) != len(got):
        extra = [_summary(g, start) for g in got[len(want) :]]
        problems.append(
            f"{key}  -want {len(want)} item(s)  +got {len(got)}"
            + (f": also {'; '.join(extra)}" if extra else "")
        )
    return problems


def _summary(item: Mapping[str, Any], start: datetime) -> str:
    keys = ("kind", "rule", "step", "at", "due")
    return " ".join(f"{k}={_show(item[k], start)}" for k in keys if item.get(k))


def _show(value: Any, start: datetime) -> str:
    if isinstance(value, datetime):
        delta = value - start
        if delta >= timedelta(0) and delta % timedelta(hours=1) == timedelta(0):
            return f"+{format_duration(delta)}"
        return value.isoformat()
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    return repr(value) if isinstance(value, str) else str(value)
