"""The FHIRPath subset of refloop's FHIR mappings: parsed and type-checked once, then
evaluated over a resource's JSON many times.

Grammar (whitespace is free between tokens)::

    path     := step ("." step)*
    step     := NAME                     member access: status, basedOn, occurrenceDateTime
              | "where(" test ("and" test)* ")"
              | "first()"                the first item (FHIRPath has no [n]: it counts from 0)
              | "exists()"               true when the path so far selects anything
    test     := path "=" STRING          e.g. type.coding.code = 'PLAC'
              | path                     ending in exists()
              | "resolve()" "is" TYPE    the Reference points at a TYPE (see below)
    STRING   := 'text'                   single quotes; \\' \\\\ \\n \\t escapes

A path may start with the resource type (``Task.focus`` = ``focus``). Choice elements are
named with their type, as in JSON: ``occurrenceDateTime``, ``valueReference``.

Semantics are FHIRPath's, on the resource's JSON: a member of a collection is the
members of every item; ``=`` is true when the left side is exactly one item equal to the
text (so ``type.coding.code = 'PLAC'`` is false for an identifier with two codings —
write ``type.coding.where(code = 'PLAC').exists()`` then). ``resolve() is T`` fetches
nothing: it reads the type from the reference text (``ServiceRequest/1``, an absolute
``…/fhir/ServiceRequest/1``, or ``Reference.type``).

Type checking (against the ``fhir.resources`` R4B models, :mod:`engine.mapping.fhirmodel`)
finds misspelt elements, members of primitives, codes a required binding does not have,
``resolve()`` on something that is not a Reference, and — the one thing HL7 paths cannot
know — whether a path may select several items (``identifier.value``): such a path is
accepted only where a list is consumed (``join``, ``count``, ``present``/``absent``);
anywhere else it needs ``first()``.

Absent and present stay apart: a missing element and an empty selection are absent;
JSON ``null`` (which FHIR forbids) is read as absent and flagged, so the caller can warn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.mapping import fhirmodel as fm


class FhirPathError(ValueError):
    """A path outside the grammar or the models; ``column`` is 1-based in the path."""

    def __init__(self, path: str, reason: str, column: int = 1) -> None:
        super().__init__(f"{reason} in path {path!r} (character {column})")
        self.path = path
        self.reason = reason
        self.column = column


# ---- the parsed form -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    column: int


@dataclass(frozen=True, slots=True)
class Where:
    tests: tuple[Test, ...]
    column: int


@dataclass(frozen=True, slots=True)
class First:
    column: int


@dataclass(frozen=True, slots=True)
class Exists:
    column: int


Step = Member | Where | First | Exists


@dataclass(frozen=True, slots=True)
class Equals:
    path: tuple[Step, ...]
    literal: str
    column: int


@dataclass(frozen=True, slots=True)
class Holds:
    path: tuple[Step, ...]  # ends with exists()
    column: int


@dataclass(frozen=True, slots=True)
class IsType:
    type: str
    column: int


Test = Equals | Holds | IsType


@dataclass(frozen=True, slots=True)
class FhirPath:
    """A checked path: what it selects, and what the compiler and readers need to know."""

    text: str
    steps: tuple[Step, ...]
    many: bool  # may select several items
    type: str  # FHIR type of what it selects ("boolean" after exists())
    head: str = ""  # the top-level element it reads (for the unread-elements report)
    codes: tuple[str, ...] = ()  # the leaf's required-binding codes, when known
    resource_id: bool = False  # the resource's own logical id (``id``)
    label: str = ""  # the element it ends on, for messages: Task.status, Identifier.use
    absolute: bool = False  # FHIR paths have no foreach scope: always the whole resource

    @property
    def primitive(self) -> bool:
        return self.type in fm.PRIMITIVES


# ---- parsing -------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>'(?:[^'\\]|\\.)*')
      | (?P<punct>[.()=])
      | (?P<other>\S)
    )""",
    re.VERBOSE,
)
_ESCAPES = {"'": "'", "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r", "f": "\f", '"': '"'}
_FUNCTIONS = ("where", "first", "exists")


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # name string punct other end
    text: str
    column: int


def _tokens(text: str) -> list[_Tok]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        kind = m.lastgroup or "other"
        out.append(_Tok(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def fail(self, reason: str, column: int) -> FhirPathError:
        return FhirPathError(self.text, reason, column)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def at(self, text: str) -> bool:
        return self.tok.kind in ("punct", "name") and self.tok.text == text

    def expect(self, text: str, what: str) -> _Tok:
        tok = self.tok
        if not self.at(text):
            raise self.fail(f"expected {what}, found {_show(tok)}", tok.column)
        self.i += 1
        return tok

    def path(self) -> tuple[Step, ...]:
        steps = [self.step()]
        while self.at("."):
            self.i += 1
            steps.append(self.step())
        return tuple(steps)

    def step(self) -> Step:
        tok = self.tok
        if tok.kind == "other" and tok.text == "[":
            raise self.fail(
                "no indexers in the subset (FHIRPath counts from 0): use first() or where(...)",
                tok.column,
            )
        if tok.kind != "name":
            raise self.fail(f"expected an element name, found {_show(tok)}", tok.column)
        self.i += 1
        if not self.at("("):
            return Member(tok.text, tok.column)
        self.i += 1
        if tok.text == "where":
            tests = [self.test()]
            while self.at("and"):
                self.i += 1
                tests.append(self.test())
            self.expect(")", "')' or 'and'")
            return Where(tuple(tests), tok.column)
        if tok.text in ("first", "exists"):
            self.expect(")", f"')' ({tok.text}() takes no arguments)")
            return First(tok.column) if tok.text == "first" else Exists(tok.column)
        if tok.text == "resolve":
            raise self.fail(
                "resolve() only goes in `where(resolve() is Type)`: nothing is fetched",
                tok.column,
            )
        raise self.fail(
            f"{tok.text}() is not in refloop's FHIRPath subset ({', '.join(_FUNCTIONS)})",
            tok.column,
        )

    def test(self) -> Test:
        tok = self.tok
        if tok.kind == "name" and tok.text == "resolve":
            self.i += 1
            self.expect("(", "'('")
            self.expect(")", "')'")
            self.expect("is", "'is' (resolve() is Type)")
            kind = self.tok
            if kind.kind != "name":
                raise self.fail(f"expected a resource type, found {_show(kind)}", kind.column)
            self.i += 1
            return IsType(kind.text, tok.column)
        path = self.path()
        if self.at("="):
            self.i += 1
            lit = self.tok
            if lit.kind != "string":
                raise self.fail(
                    f"expected a quoted text ('...') after =, found {_show(lit)}", lit.column
                )
            self.i += 1
            return Equals(path, _unquote(lit.text), tok.column)
        return Holds(path, tok.column)

    def done(self) -> None:
        tok = self.tok
        if tok.kind == "end":
            return
        if tok.kind == "other" and tok.text == "[":
            raise self.fail(
                "no indexers in the subset (FHIRPath counts from 0): use first() or where(...)",
                tok.column,
            )
        if tok.kind == "name" and tok.text in ("or", "and", "xor", "implies", "is", "as"):
            raise self.fail(f"operator {tok.text!r} is not in the subset", tok.column)
        raise self.fail(f"unexpected {_show(tok)}", tok.column)


def _show(tok: _Tok) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text)


def _unquote(text: str) -> str:
    body = text[1:-1]
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def parse_fhirpath(text: str) -> tuple[Step, ...]:
    """The steps of ``text``; raises :class:`FhirPathError` (syntax only, no models)."""
    if not text.strip():
        raise FhirPathError(text, "an empty path", 1)
    parser = _Parser(text)
    steps = parser.path()
    parser.done()
    return steps


# ---- type checking -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Type:
    type: str
    model: Any
    many: bool
    codes: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    label: str = ""  # where this came from, for messages: Task.status


def compile_fhirpath(text: str, resource_type: str) -> FhirPath:
    """Parse and check ``text`` against ``resource_type``; raises :class:`FhirPathError`
    (an unknown resource type is the caller's to refuse first: :func:`fhirmodel.resource_model`)."""
    steps = parse_fhirpath(text)
    first = steps[0]
    if isinstance(first, Member) and first.name == resource_type and len(steps) > 1:
        steps = steps[1:]  # Task.focus: the resource itself
    root = _Type(resource_type, fm.resource_model(resource_type), False, label=resource_type)
    got = _Checker(text).walk(steps, root)
    head = steps[0].name if isinstance(steps[0], Member) else ""
    return FhirPath(
        text=text,
        steps=steps,
        many=got.many,
        type=got.type,
        head=head,
        codes=got.codes,
        resource_id=len(steps) == 1 and head == "id",
        label=got.label,
    )


class _Checker:
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, reason: str, column: int) -> FhirPathError:
        return FhirPathError(self.text, reason, column)

    def walk(self, steps: tuple[Step, ...], cur: _Type) -> _Type:
        for i, step in enumerate(steps):
            if cur.type == "boolean" and i and isinstance(steps[i - 1], Exists):
                raise self.fail("exists() ends a path (it gives true or false)", _col(step))
            if isinstance(step, Member):
                cur = self.member(cur, step)
            elif isinstance(step, Where):
                if cur.model is None:
                    raise self.fail(
                        f"where() filters elements that have members; {cur.label} is a {cur.type}",
                        step.column,
                    )
                item = _Type(cur.type, cur.model, False, cur.codes, cur.targets, cur.label)
                for test in step.tests:
                    self.test(test, item)
            elif isinstance(step, First):
                cur = _Type(cur.type, cur.model, False, cur.codes, cur.targets, cur.label)
            else:
                cur = _Type("boolean", None, False, label=f"{cur.label}.exists()")
        return cur

    def member(self, cur: _Type, step: Member) -> _Type:
        if cur.model is None:
            if cur.type == "Resource":
                raise self.fail(
                    f"{cur.label} holds whole resources, which mappings do not read",
                    step.column,
                )
            raise self.fail(
                f"{cur.label} is a {cur.type}, a primitive: it has no element {step.name!r}",
                step.column,
            )
        known = fm.elements(cur.model)
        el = known.get(step.name)
        if el is None:
            raise self.fail(
                f"{fm.type_name(cur.model)} has no element {step.name!r}"
                f"{_element_hint(step.name, known)}",
                step.column,
            )
        return _Type(
            el.type,
            el.model,
            cur.many or el.many,
            el.codes,
            el.targets,
            f"{fm.type_name(cur.model)}.{step.name}",
        )

    def test(self, test: Test, item: _Type) -> None:
        if isinstance(test, IsType):
            if item.type != "Reference":
                raise self.fail(
                    f"resolve() reads a Reference; {item.label} is a {item.type}", test.column
                )
            try:
                fm.resource_model(test.type)
            except fm.UnknownType as exc:
                hint = f" (did you mean {exc.hint!r}?)" if exc.hint else ""
                raise self.fail(
                    f"{test.type!r} is not a FHIR resource type{hint}", test.column
                ) from None
            allowed = item.targets
            if allowed and "Resource" not in allowed and test.type not in allowed:
                raise self.fail(
                    f"{item.label} cannot point at {test.type} (only {', '.join(allowed)})",
                    test.column,
                )
            return
        got = self.walk(test.path, item)
        if isinstance(test, Holds):
            if not isinstance(test.path[-1], Exists):
                raise self.fail(
                    "a where() test is `path = 'text'`, `path.exists()` or `resolve() is Type`",
                    test.column,
                )
            return
        if got.model is not None or got.type == "Resource":
            raise self.fail(
                f"= compares a primitive value; {got.label} is a {got.type} "
                "(compare one of its elements)",
                test.column,
            )
        if got.codes and test.literal not in got.codes:
            raise self.fail(
                f"{test.literal!r} is not a code of {got.label} ({', '.join(got.codes)})",
                test.column,
            )


def _col(step: Step) -> int:
    return step.column


def _element_hint(name: str, known: Mapping[str, fm.Element]) -> str:
    choices = sorted(
        k for k in known if k.startswith(name) and k[len(name) : len(name) + 1].isupper()
    )
    if choices:
        return (
            f"; {name}[x] is a choice: name its type, e.g. {choices[0]} "
            f"(one of {', '.join(choices)})"
        )
    import difflib

    close = difflib.get_close_matches(name, tuple(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: ``meta.lastUpdated``: when the source's server stored this version (the fallback
#: ``occurred_at``, as MSH-7 is for HL7). Every resource has it, so it is built, not checked.
META_LAST_UPDATED = FhirPath(
    text="meta.lastUpdated",
    steps=(Member("meta", 1), Member("lastUpdated", 6)),
    many=False,
    type="instant",
    head="meta",
)


# ---- evaluation ----------------------------------------------------------------------


def select(path: FhirPath, resource: Mapping[str, Any]) -> tuple[list[Any], bool]:
    """The items ``path`` selects, and whether a JSON null was met on the way."""
    nulls = [False]
    items = _walk(path.steps, [resource], nulls)
    return items, nulls[0]


def _walk(steps: tuple[Step, ...], items: list[Any], nulls: list[bool]) -> list[Any]:
    for step in steps:
        if type(step) is Member:
            name = step.name
            out: list[Any] = []
            for item in items:
                if not isinstance(item, Mapping):
                    continue
                value = item.get(name)
                if value is None:
                    if name in item:
                        nulls[0] = True
                elif type(value) is list:
                    for x in value:
                        if x is None:
                            nulls[0] = True
                        else:
                            out.append(x)
                else:
                    out.append(value)
            items = out
        elif type(step) is Where:
            tests = step.tests
            items = [item for item in items if all(_holds(t, item, nulls) for t in tests)]
        elif type(step) is First:
            items = items[:1]
        else:
            items = [bool(items)]
    return items


def _holds(test: Test, item: Any, nulls: list[bool]) -> bool:
    if isinstance(test, IsType):
        return isinstance(item, Mapping) and reference_type(item) == test.type
    got = _walk(test.path, [item], nulls)
    if isinstance(test, Holds):
        return got == [True]
    return len(got) == 1 and type(got[0]) is str and got[0] == test.literal


# ---- references ------------------------------------------------------------------------

# R4 §2.3.0.1 (references.html): [base URL/]Type/id[/_history/version]
_REFERENCE = re.compile(
    r"^(?:https?://[^\s]*?/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def parse_reference(text: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference, relative or absolute; None for a contained
    (``#x``), ``urn:uuid:`` / ``urn:oid:`` (Bundle-local) or untyped reference."""
    m = _REFERENCE.match(text)
    return (m.group("type"), m.group("id")) if m else None


def reference_type(reference: Mapping[str, Any]) -> str | None:
    """The resource type a Reference points at: from its text, else from ``type``."""
    text = reference.get("reference")
    if isinstance(text, str):
        parsed = parse_reference(text)
        if parsed is not None:
            return parsed[0]
    kind = reference.get("type")
    if isinstance(kind, str) and kind:
        # "Patient", or http://hl7.org/fhir/StructureDefinition/Patient
        return kind.rstrip("/").rsplit("/", 1)[-1]
    return None
