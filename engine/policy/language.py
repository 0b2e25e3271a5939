"""The referral policy language (``referral-policy/v1``): windows and ladders as data.

Theory of operation
-------------------
Analysts write ``mappings/policies/*.yaml``. Two kinds of rule:

* a **window** bounds how long a referral may stay in a set of states (``sent`` and
  ``accepted``: "scheduled within 14 days"). Its clock starts when the referral enters
  one of the states from outside them and stops when it leaves them all; moving between
  them (sent → accepted) keeps the clock running. A miss escalates (a
  ``referral.escalated`` with the window's reason and level) and puts an item on the
  owner's worklist;
* a **ladder** is a list of steps at offsets from the same kind of entry — patient
  reminders on days 3, 7 and 14, an escalation on day 21, a note request to the
  specialist a week after the visit. Each step does one thing: ``outreach``,
  ``worklist``, ``escalate`` or ``notify``.

A ladder may count back from the appointment instead (``before_appointment:``, steps
``{before: 72h, …}``): reminders 72 and 24 hours before the booked start. Its states are
``scheduled`` only; its steps are due at the projection's ``appointment.start`` minus
their offset, a step already past when the appointment is booked is skipped (booked 20
hours ahead: no reminder at all), and a new start (a reschedule, or a booking that
moves the time) re-arms the ladder from the new time without any ``restart_on``.

Both may be narrowed by ``specialty`` and ``priority``. Windows form one *family*; each
ladder belongs to the family its ``ladder:`` names (default: its own id). For a referral
in a state, every family contributes at most one rule: of the rules whose states hold it
and whose filters match, the **most specific** wins — specialty and priority, then
specialty alone, then priority alone, then neither. Two rules of a family that could
both win for some referral (same specificity, a shared state, overlapping filters) are a
load error, so the outcome never depends on file order.

Time is calendar time: ``14d`` is 14 times 24 hours from the state entry, weekends and
holidays included. Durations are written ``14d``, ``72h`` or ``1d12h``; ISO 8601
(``P14D``) is refused with the short form as a hint, because its months and years have
no fixed length.

Loading reads every file, collects every problem as ``file:line:column: what was
expected`` and refuses the whole set on any of them, like the mappings. The result is a
frozen :class:`Policy`; :mod:`engine.policy.timers` makes the decisions with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine.domain.referral import Event, State
from engine.mapping.checker import Abandon, TextChecker
from engine.mapping.checker import hint as hint
from engine.mapping.source import KeyPath, SourceError, loads

__all__ = [
    "POLICIES_DIR",
    "POLICY_SCHEMA",
    "Ladder",
    "Policy",
    "PolicyError",
    "Scope",
    "Step",
    "Window",
    "load_policy",
    "parse_duration",
    "policy_files",
]

POLICY_SCHEMA = "referral-policy/v1"
POLICIES_DIR = "policies"
WINDOW_FAMILY = "window"
YAML_SUFFIXES = (".yaml", ".yml")
CASES_SUFFIX = ".cases.yaml"
AUTHORIZATION_FILE = "authorization.yaml"  # the payer table: its own language

TOP_KEYS = ("schema", "description", "windows", "ladders")
SCOPE_KEYS = ("states", "specialty", "priority", "restart_on")
WINDOW_KEYS = ("id", "description", *SCOPE_KEYS, "within", "reason", "level", "owner", "due")
LADDER_KEYS = ("id", "description", "ladder", *SCOPE_KEYS, "steps", "before_appointment")
#: What a ladder's steps count from: the state entry, or back from the appointment start.
ENTRY = "entry"
APPOINTMENT = "appointment"
#: The states an appointment ladder may name: the ones with a booked appointment ahead.
APPOINTMENT_STATES = ("scheduled",)
ACTIONS = ("outreach", "worklist", "escalate", "notify")
#: The keys each action takes besides ``after`` and ``do`` (required ones first).
ACTION_KEYS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType(
    {
        "outreach": (("template",), ("prefer",)),
        "worklist": (("reason",), ("owner", "due")),
        "escalate": (("reason",), ("level",)),
        "notify": (("to", "route"), ("reason",)),
    }
)
#: How a patient can be reached, in the order a step prefers them.
OUTREACH_CHANNELS = ("sms", "email", "voice", "letter", "portal")
#: Whom a notification goes to: the referring physician or the specialist.
NOTIFY_TO = ("referrer", "specialist")
DEFAULT_OWNER = "coordinator"
MAX_LEVEL = 9
#: Ten years: anything longer is a typo, not a policy.
MAX_DURATION = timedelta(days=3650)

STATES = tuple(s.value for s in State)
EVENTS = tuple(e.value for e in Event)
#: Ids, reasons, templates and owners: codes that end up in metrics and worklists, so
#: they are plain lower-case tokens, never free text.
CODE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?$")
_ISO = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?)?$", re.IGNORECASE)


class PolicyError(Exception):
    """The policy set did not load; ``errors`` holds every problem, each
    ``file:line:column: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors) or "policy set did not load")


def parse_duration(text: str) -> timedelta | None:
    """``14d``, ``72h``, ``1d12h`` → a timedelta; None when ``text`` is not one."""
    found = _DURATION.match(text)
    if not text or found is None:
        return None
    days, hours = (int(g) if g else 0 for g in found.groups())
    return timedelta(days=days, hours=hours)


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole hours (``+`` not included)."""
    hours = int(value.total_seconds()) // 3600
    days, hours = divmod(hours, 24)
    if days and hours:
        return f"{days}d{hours}h"
    return f"{days}d" if days or not hours else f"{hours}h"


# ---- the compiled policy -----------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Where a rule applies. None: not filtered."""

    states: frozenset[State]
    specialty: frozenset[str] | None = None
    priority: frozenset[str] | None = None
    restart_on: frozenset[Event] = frozenset()

    @property
    def specificity(self) -> tuple[bool, bool]:
        """Compared as a tuple: specialty outranks priority, both outrank either."""
        return (self.specialty is not None, self.priority is not None)

    def admits(self, state: State, specialty: str | None, priority: str | None) -> bool:
        return (
            state in self.states
            and (self.specialty is None or specialty in self.specialty)
            and (self.priority is None or priority in self.priority)
        )

    def overlaps(self, other: Scope) -> bool:
        """Could one referral in one state be admitted by both?"""

        def meet(a: frozenset[str] | None, b: frozenset[str] | None) -> bool:
            return a is None or b is None or bool(a & b)

        return (
            bool(self.states & other.states)
            and meet(self.specialty, other.specialty)
            and meet(self.priority, other.priority)
        )


@dataclass(frozen=True)
class Window:
    id: str
    scope: Scope
    within: timedelta
    reason: str  # of the escalation and the worklist item when it is missed
    level: int = 1
    owner: str = DEFAULT_OWNER
    due: timedelta = timedelta(0)  # the worklist item is due this long after the miss
    where: str = ""

    @property
    def family(self) -> str:
        return WINDOW_FAMILY


@dataclass(frozen=True)
class Step:
    # From the ladder's anchor, not from the previous step: the state entry, or for an
    # appointment ladder the appointment's start (negative: ``before: 72h`` is -72h).
    after: timedelta
    do: str  # outreach | worklist | escalate | notify
    template: str = ""  # outreach
    prefer: tuple[str, ...] = ()  # outreach: contact methods in order of preference
    reason: str = ""  # worklist, escalate, notify
    level: int = 0  # escalate
    owner: str = ""  # worklist
    due: timedelta = timedelta(0)  # worklist: after the step fires
    to: str = ""  # notify: referrer | specialist
    route: str = ""  # notify: the outbound route that says how
    where: str = ""


@dataclass(frozen=True)
class Ladder:
    id: str
    family: str
    scope: Scope
    steps: tuple[Step, ...]
    where: str = ""
    anchor: str = ENTRY  # entry | appointment: what the steps' offsets count from


Rule = Window | Ladder


@dataclass(frozen=True)
class Policy:
    digest: str  # sha256 of the files, first 16 hex digits
    windows: tuple[Window, ...] = ()
    ladders: tuple[Ladder, ...] = ()
    files: tuple[Path, ...] = ()
    _by_id: Mapping[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules: dict[str, Rule] = {r.id: r for r in self.rules()}
        object.__setattr__(self, "_by_id", MappingProxyType(rules))

    def rule(self, id: str) -> Rule | None:
        return self._by_id.get(id)

    def rules(self) -> tuple[Rule, ...]:
        """Windows, then ladders, each in file order."""
        return (*self.windows, *self.ladders)

    def select(self, state: State, specialty: str | None, priority: str | None) -> tuple[Rule, ...]:
        """The winning rule of each family for a referral in ``state`` (windows first, then
        ladders in file order). Loading guaranteed there is never a tie."""
        best: dict[str, Rule] = {}
        for rule in self.rules():
            if not rule.scope.admits(state, specialty, priority):
                continue
            held = best.get(rule.family)
            if held is None or rule.scope.specificity > held.scope.specificity:
                best[rule.family] = rule
        return tuple(best.values())

    def routes(self) -> frozenset[str]:
        """Every outbound route a notify step names (the composition root checks them)."""
        return frozenset(s.route for ladder in self.ladders for s in ladder.steps if s.route)


EMPTY = Policy(digest=hashlib.sha256().hexdigest()[:16])


# ---- checking ----------------------------------------------------------------------------


class Checker(TextChecker):
    """The shared checks plus the policy language's own: codes, lists of names, durations
    and levels."""

    def code(self, value: Any, at: KeyPath, what: str) -> str:
        found = self.text(value, at, what)
        if not CODE.match(found):
            self.fail(at, f"{what} is a code: lower-case letters, digits, '_', '.' and '-'")
        return found

    def choice(self, value: Any, at: KeyPath, what: str, options: tuple[str, ...]) -> str:
        if value not in options:
            self.fail(at, f"{what} must be one of {', '.join(options)}{hint(value, options)}")
        return str(value)

    def choices(self, value: Any, at: KeyPath, what: str, options: tuple[str, ...]) -> list[str]:
        names = self.texts(value, at, what)
        for i, name in enumerate(names):
            if name not in options:
                self.fail(
                    (*at, i) if isinstance(value, list) else at,
                    f"unknown {what} {name!r}{hint(name, options)}; expected one of "
                    f"{', '.join(options)}",
                )
        return list(names)

    def duration(self, value: Any, at: KeyPath, what: str) -> timedelta:
        text = self.text(value, at, what)
        found = parse_duration(text)
        if found is None:
            iso = _ISO.match(text)
            if iso and any(iso.groups()):
                days, hours = (int(g) if g else 0 for g in iso.groups())
                short = format_duration(timedelta(days=days, hours=hours))
                self.fail(at, f"{what} is written like 14d or 72h: for {text!r} write {short}")
            self.fail(at, f"{what} must be a duration like 14d, 72h or 1d12h (calendar time)")
        if found > MAX_DURATION:
            self.fail(at, f"{what} must be at most {MAX_DURATION.days}d")
        return found

    def level(self, value: Any, at: KeyPath) -> int:
        text = self.text(value, at, "level")
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_LEVEL):
            self.fail(at, f"level must be a whole number from 1 to {MAX_LEVEL}")
        return int(text)

    def required(self, data: dict[str, Any], at: KeyPath, keys: tuple[str, ...], what: str) -> None:
        # a key written with no value (``within:``) is as missing as one not written
        missing = [k for k in keys if data.get(k) is None]
        if missing:
            self.fail(at, f"{what} needs {', '.join(missing)}")


# ---- loading -----------------------------------------------------------------------------


@dataclass
class _Loading:
    known_routes: Collection[str] | None
    windows: list[Window] = field(default_factory=list)
    ladders: list[Ladder] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # id → where
    # where each rule's id was written, to report a clash at the later rule
    at: dict[str, tuple[Checker, KeyPath]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def policy_files(root: Path) -> list[Path]:
    """The policy files of a mappings directory: ``policies/*.yaml`` (fixtures and the
    pre-authorization table, engine.policy.authorization, excluded)."""
    folder = root / POLICIES_DIR
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix in YAML_SUFFIXES
        and not p.name.endswith(CASES_SUFFIX)
        and p.name != AUTHORIZATION_FILE
    )


def load_policy(root: Path, *, known_routes: Collection[str] | None = None) -> Policy:
    """Read, check and compile ``root/policies/*.yaml``; raises :class:`PolicyError` with
    every problem. No folder: the empty policy (no timers at all). ``known_routes``, when
    given, are the outbound route ids a ``notify`` step may name."""
    if not root.is_dir():
        raise PolicyError([f"{root}:1:1: no such mappings directory"])
    digest = hashlib.sha256()
    files = policy_files(root)
    sources: list[tuple[str, bytes]] = []
    for path in files:
        raw = path.read_bytes()
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + raw + b"\0")
        sources.append((str(path), raw))
    policy = compile_policy(sources, known_routes=known_routes)
    return Policy(
        digest=digest.hexdigest()[:16],
        windows=policy.windows,
        ladders=policy.ladders,
        files=tuple(files),
    )


def compile_policy(
    sources: Iterable[tuple[str, bytes]], *, known_routes: Collection[str] | None = None
) -> Policy:
    """Compile ``(file name, bytes)`` pairs as one policy set (what :func:`load_policy`
    does after reading the folder)."""
    loading = _Loading(known_routes)
    digest = hashlib.sha256()
    for name, raw in sources:
        digest.update(name.encode() + b"\0" + raw + b"\0")
        _file(name, raw, loading)
    if not loading.errors:
        _ambiguities(loading)
    if loading.errors:
        raise PolicyError(loading.errors)
    return Policy(
        digest=digest.hexdigest()[:16],
        windows=tuple(loading.windows),
        ladders=tuple(loading.ladders),
    )


def _file(name: str, raw: bytes, loading: _Loading) -> None:
    try:
        doc = loads(raw.decode("utf-8-sig"), name)
    except UnicodeDecodeError as exc:
        loading.errors.append(f"{name}:1:1: not UTF-8 text (byte {exc.start})")
        return
    except SourceError as exc:
        loading.errors.append(str(exc))
        return
    check = Checker(doc)
    data = doc.data
    found = data.get("schema") if isinstance(data, dict) else None
    if found != POLICY_SCHEMA:
        check.report(("schema",), f"expected `schema: {POLICY_SCHEMA}` at the top")
    else:
        check.attempt(_rules, check, loading)
    loading.errors.extend(check.errors)


def _rules(check: Checker, loading: _Loading) -> None:
    data = check.mapping(check.doc.data, (), "the file")
    check.known_keys(data, (), TOP_KEYS)
    if data.get("description") is not None:
        check.text(data["description"], ("description",), "description")
    builders: tuple[tuple[str, Callable[..., Rule]], ...] = (
        ("windows", _window),
        ("ladders", _ladder),
    )
    for key, build in builders:
        if data.get(key) is None:
            continue
        for i, item in enumerate(check.items(data[key], (key,), key)):
            at: KeyPath = (key, i)
            rule = check.attempt(build, check, item, at, loading)
            if rule is None:
                continue
            if rule.id in loading.ids:
                check.report(
                    (*at, "id"), f"rule id {rule.id!r} is also used at {loading.ids[rule.id]}"
                )
                continue
            loading.ids[rule.id] = check.where((*at, "id"))
            loading.at[rule.id] = (check, at)
            if isinstance(rule, Window):
                loading.windows.append(rule)
            else:
                loading.ladders.append(rule)


def _scope(check: Checker, data: dict[str, Any], at: KeyPath) -> Scope:
    states = check.choices(data["states"], (*at, "states"), "state", STATES)
    filters: dict[str, frozenset[str] | None] = {}
    for key in ("specialty", "priority"):
        value = data.get(key)
        filters[key] = None if value is None else frozenset(check.texts(value, (*at, key), key))
    restart: list[str] = []
    if data.get("restart_on") is not None:
        restart = check.choices(data["restart_on"], (*at, "restart_on"), "event", EVENTS)
    return Scope(
        states=frozenset(State(s) for s in states),
        specialty=filters["specialty"],
        priority=filters["priority"],
        restart_on=frozenset(Event(e) for e in restart),
    )


def _window(check: Checker, value: Any, at: KeyPath, loading: _Loading) -> Window:
    data = check.mapping(value, at, "a window")
    check.known_keys(data, at, WINDOW_KEYS)
    check.required(data, at, ("id", "states", "within"), "a window")
    ident = check.code(data["id"], (*at, "id"), "id")
    if data.get("description") is not None:
        check.text(data["description"], (*at, "description"), "description")
    scope = _scope(check, data, at)
    within = check.duration(data["within"], (*at, "within"), "within")
    if within <= timedelta(0):
        check.fail((*at, "within"), "within must be longer than 0h")
    reason = f"{ident}_missed"
    if data.get("reason") is not None:
        reason = check.code(data["reason"], (*at, "reason"), "reason")
    level = check.level(data["level"], (*at, "level")) if data.get("level") is not None else 1
    owner = DEFAULT_OWNER
    if data.get("owner") is not None:
        owner = check.code(data["owner"], (*at, "owner"), "owner")
    due = timedelta(0)
    if data.get("due") is not None:
        due = check.duration(data["due"], (*at, "due"), "due")
    return Window(ident, scope, within, reason, level, owner, due, check.where(at))


def _ladder(check: Checker, value: Any, at: KeyPath, loading: _Loading) -> Ladder:
    data = check.mapping(value, at, "a ladder")
    check.known_keys(data, at, LADDER_KEYS)
    counted = data.get("before_appointment") is not None
    if counted and data.get("steps") is not None:
        check.fail(
            (*at, "before_appointment"),
            "a ladder has steps (after the state entry) or before_appointment, not both",
        )
    list_key = "before_appointment" if counted else "steps"
    check.required(data, at, ("id", "states", list_key), "a ladder")
    ident = check.code(data["id"], (*at, "id"), "id")
    if data.get("description") is not None:
        check.text(data["description"], (*at, "description"), "description")
    family = ident
    if data.get("ladder") is not None:
        family = check.code(data["ladder"], (*at, "ladder"), "ladder")
    scope = _scope(check, data, at)
    if counted:
        outside = sorted(s.value for s in scope.states if s.value not in APPOINTMENT_STATES)
        if outside:
            check.fail(
                (*at, "states"),
                f"a before_appointment ladder applies while {', '.join(APPOINTMENT_STATES)} "
                f"(an appointment ahead), not {', '.join(outside)}",
            )
    items = check.items(data[list_key], (*at, list_key), list_key)
    if not items:
        check.fail((*at, list_key), "a ladder needs at least one step")
    steps: list[Step] = []
    failed = False
    offset = "before" if counted else "after"
    for i, item in enumerate(items):
        step = check.attempt(_step, check, item, (*at, list_key, i), loading, offset)
        if step is None:
            failed = True
            continue
        if steps and step.after < steps[-1].after:
            if counted:
                message = (
                    f"steps run in order: {format_duration(-step.after)} before comes ahead "
                    f"of the previous step's {format_duration(-steps[-1].after)} before"
                )
            else:
                message = (
                    f"steps run in order: {format_duration(step.after)} comes before the "
                    f"previous step's {format_duration(steps[-1].after)}"
                )
            check.report((*at, list_key, i, offset), message)
            failed = True
        steps.append(step)
    if failed:
        raise Abandon
    anchor = APPOINTMENT if counted else ENTRY
    return Ladder(ident, f"ladder:{family}", scope, tuple(steps), check.where(at), anchor)


def _step(
    check: Checker, value: Any, at: KeyPath, loading: _Loading, offset: str = "after"
) -> Step:
    """One step; ``offset`` is ``after`` (the state entry) or ``before`` (the appointment
    start, stored as a negative offset from it)."""
    data = check.mapping(value, at, "a step")
    check.required(data, at, (offset, "do"), "a step")
    do = check.choice(data["do"], (*at, "do"), "do", ACTIONS)
    needed, optional = ACTION_KEYS[do]
    check.known_keys(data, at, (offset, "do", *needed, *optional))
    check.required(data, at, needed, f"a {do} step")
    after = check.duration(data[offset], (*at, offset), offset)
    if offset == "before":
        after = -after
    fields: dict[str, Any] = {}
    for key in (*needed, *optional):
        if data.get(key) is None:
            continue
        where = (*at, key)
        raw = data[key]
        if key == "prefer":
            fields[key] = tuple(check.choices(raw, where, "contact method", OUTREACH_CHANNELS))
        elif key == "level":
            fields[key] = check.level(raw, where)
        elif key == "due":
            fields[key] = check.duration(raw, where, "due")
        elif key == "to":
            fields[key] = check.choice(raw, where, "to", NOTIFY_TO)
        elif key == "route":
            route = check.code(raw, where, "route")
            known = loading.known_routes
            if known is not None and route not in known:
                check.fail(where, f"no outbound route {route!r}{hint(route, known)}")
            fields[key] = route
        else:
            fields[key] = check.code(raw, where, key)
    if do == "escalate":
        fields.setdefault("level", 1)
    if do == "worklist":
        fields.setdefault("owner", DEFAULT_OWNER)
    return Step(after=after, do=do, where=check.where(at), **fields)


def _ambiguities(loading: _Loading) -> None:
    """Two rules of a family that could win for the same referral: refuse the later."""
    rules: list[Rule] = [*loading.windows, *loading.ladders]
    for i, later in enumerate(rules):
        for earlier in rules[:i]:
            if earlier.family != later.family:
                continue
            if earlier.scope.specificity != later.scope.specificity:
                continue
            if not earlier.scope.overlaps(later.scope):
                continue
            shared = sorted(s.value for s in earlier.scope.states & later.scope.states)
            check, at = loading.at[later.id]
            kind = "window" if isinstance(later, Window) else f"ladder {later.family[7:]!r}"
            loading.errors.append(
                str(
                    check.doc.error(
                        (*at, "id"),
                        f"{later.id!r} and {earlier.id!r} ({loading.ids[earlier.id]}) both apply "
                        f"to {', '.join(shared)} with the same specificity: narrow one by "
                        f"specialty or priority, or give them different states (one {kind} per "
                        "referral)",
                    )
                )
            )
            break
