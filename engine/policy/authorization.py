"""Which referrals need a payer's authorization before the packet leaves (pure).

Theory of operation
-------------------
Analysts keep one table, ``mappings/policies/authorization.yaml`` with ``schema:
referral-authorization/v1``: rules of *specialty* by *payer* (``payer`` compares the
referral's ``insurance.payer``, ``payer_id`` the value of ``insurance.payer_id``, ``plan``
its ``insurance.plan``), optionally narrowed by *diagnosis* (ICD-10 codes; ``M17.*`` is a
prefix, ``M17.11`` one code; dots and case do not matter), each saying ``required: true``
or ``false``. Every condition a rule gives must hold; one it leaves out matches anything.

For a referral, of the rules that match, the **most specific** wins: the one with the
most conditions; at an equal count, diagnosis outranks plan, plan outranks payer_id,
payer_id outranks payer and payer outranks specialty. So ``EXAMPLE-HMO + orthopedics:
required`` and ``EXAMPLE-HMO + orthopedics + M17.*: not required`` read as "the HMO wants
an authorization for orthopedics, except knee arthrosis". Two rules with the same
conditions that could both match one referral are a load error (``file:line:column``
naming both), so the outcome never depends on file order. No rule matches: no
authorization needed.

A referral that already carries an authorization needs none, whatever the table says:
its order's AUT segment gave an identifier (``authorization.identifier``) or an
``authorization.approved`` set ``authorization.status: approved``.

Loading collects every problem as ``file:line:column: what was expected`` and refuses
the table on any of them, like the policy. No file: the empty table (nothing is held).
:func:`requires` is the pure decision the normaliser's pipeline asks for each new
referral (:func:`engine.services.pipeline.plan`, ``needs_auth``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.domain.projection import Referral
from engine.mapping.checker import TextChecker
from engine.mapping.schema import closed, one_or_many
from engine.mapping.source import KeyPath, SourceError, loads

__all__ = [
    "AUTHORIZATION_FILE",
    "AUTHORIZATION_SCHEMA",
    "EMPTY",
    "SCHEMA_NAME",
    "AuthorizationError",
    "AuthorizationRule",
    "AuthorizationTable",
    "authorized",
    "compile_table",
    "load_authorization",
    "render",
    "requires",
]

AUTHORIZATION_SCHEMA = "referral-authorization/v1"
#: Relative to the mappings root.
AUTHORIZATION_FILE = Path("policies") / "authorization.yaml"
SCHEMA_NAME = "referral-authorization.v1.json"

TOP_KEYS = ("schema", "description", "rules")
#: The conditions, most significant first (the tie-break at an equal count).
CONDITIONS = ("diagnosis", "plan", "payer_id", "payer", "specialty")
RULE_KEYS = ("id", "description", *reversed(CONDITIONS), "required")
CODE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
#: An ICD-10(-CM) code, or its prefix before ``*``: letter, digit, alphanumerics.
_ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z]{0,5}$")


class AuthorizationError(Exception):
    """The table did not load; ``errors`` holds every problem, ``file:line:column: …``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors) or "authorization table did not load")


def _fold(text: str) -> str:
    return text.strip().casefold()


def _icd(text: str) -> str:
    return text.strip().upper().replace(".", "")


@dataclass(frozen=True)
class Diagnoses:
    """ICD-10 codes (normalised: upper case, no dots) and prefixes (``M17.*`` → ``M17``)."""

    codes: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()

    def admits(self, code: str) -> bool:
        return code in self.codes or any(code.startswith(p) for p in self.prefixes)

    def overlaps(self, other: Diagnoses) -> bool:
        """Could one code match both?"""
        if self.codes & other.codes:
            return True
        return (
            any(other.admits(c) for c in self.codes)
            or any(self.admits(c) for c in other.codes)
            or any(
                a.startswith(b) or b.startswith(a) for a in self.prefixes for b in other.prefixes
            )
        )


@dataclass(frozen=True)
class AuthorizationRule:
    id: str
    required: bool
    specialty: frozenset[str] | None = None  # None: any; values case-folded
    payer: frozenset[str] | None = None
    payer_id: frozenset[str] | None = None
    plan: frozenset[str] | None = None
    diagnosis: Diagnoses | None = None
    where: str = ""  # file:line:column of the rule

    def given(self) -> tuple[bool, ...]:
        return tuple(getattr(self, name) is not None for name in CONDITIONS)

    @property
    def specificity(self) -> tuple[int, tuple[bool, ...]]:
        given = self.given()
        return (sum(given), given)

    def matches(self, facts: _Facts) -> bool:
        for name in ("specialty", "payer", "payer_id", "plan"):
            allowed: frozenset[str] | None = getattr(self, name)
            if allowed is not None and getattr(facts, name) not in allowed:
                return False
        if self.diagnosis is not None:
            return any(self.diagnosis.admits(c) for c in facts.diagnoses)
        return True

    def overlaps(self, other: AuthorizationRule) -> bool:
        for name in ("specialty", "payer", "payer_id", "plan"):
            a: frozenset[str] | None = getattr(self, name)
            b: frozenset[str] | None = getattr(other, name)
            if a is not None and b is not None and not a & b:
                return False
        if self.diagnosis is not None and other.diagnosis is not None:
            return self.diagnosis.overlaps(other.diagnosis)
        return True


@dataclass(frozen=True)
class _Facts:
    """What the rules read from a referral (normalised the way the rules are)."""

    specialty: str | None
    payer: str | None
    payer_id: str | None
    plan: str | None
    diagnoses: tuple[str, ...]

    @classmethod
    def of(cls, referral: Referral) -> _Facts:
        def text(name: str) -> str | None:
            value = referral.value(name)
            if isinstance(value, Mapping):
                value = value.get("value") or value.get("code")
            return _fold(value) if isinstance(value, str) and value.strip() else None

        codes: list[str] = []
        for name in ("diagnosis", "reason_code"):
            value = referral.value(name)
            if isinstance(value, Mapping) and isinstance(value.get("code"), str):
                codes.append(_icd(value["code"]))
        return cls(
            specialty=text("specialty"),
            payer=text("insurance.payer"),
            payer_id=text("insurance.payer_id"),
            plan=text("insurance.plan"),
            diagnoses=tuple(codes),
        )


@dataclass(frozen=True)
class AuthorizationTable:
    digest: str = ""
    rules: tuple[AuthorizationRule, ...] = ()
    files: tuple[Path, ...] = ()

    def rule(self, referral: Referral) -> AuthorizationRule | None:
        """The rule that decides for ``referral`` (the most specific that matches)."""
        facts = _Facts.of(referral)
        best: AuthorizationRule | None = None
        for r in self.rules:
            if r.matches(facts) and (best is None or r.specificity > best.specificity):
                best = r
        return best

    def requires(self, referral: Referral) -> str | None:
        return requires(self, referral)


EMPTY = AuthorizationTable(digest=hashlib.sha256().hexdigest()[:16])


def authorized(referral: Referral) -> bool:
    """The referral already carries an authorization (an AUT identifier, or an approval)."""
    status = referral.data.get("authorization", {}).get("authorization.status")
    if status == "approved":
        return True
    ident = referral.value("authorization.identifier")
    return isinstance(ident, Mapping) and bool(ident.get("value"))


def requires(table: AuthorizationTable, referral: Referral) -> str | None:
    """The id of the rule that demands an authorization for ``referral``, or None."""
    if not table.rules or authorized(referral):
        return None
    found = table.rule(referral)
    return found.id if found is not None and found.required else None


# ---- loading -----------------------------------------------------------------------------


class _Checker(TextChecker):
    def values(self, value: Any, at: KeyPath, what: str) -> frozenset[str]:
        return frozenset(_fold(v) for v in self.texts(value, at, what))

    def diagnoses(self, value: Any, at: KeyPath) -> Diagnoses:
        codes: set[str] = set()
        prefixes: set[str] = set()
        items = self.texts(value, at, "diagnosis")
        for i, raw in enumerate(items):
            where = (*at, i) if isinstance(value, list) else at
            prefix = raw.strip().endswith("*")
            code = _icd(raw.strip().rstrip("*"))
            if not _ICD10.match(code):
                self.fail(
                    where,
                    f"diagnosis {raw!r} is not an ICD-10 code: a letter, a digit, then up to "
                    "5 letters or digits (M17.11), or a prefix ending in * (M17.*)",
                )
            (prefixes if prefix else codes).add(code)
        return Diagnoses(frozenset(codes), frozenset(prefixes))


def load_authorization(root: Path) -> AuthorizationTable:
    """The table in ``root/policies/authorization.yaml`` (none: :data:`EMPTY`); raises
    :class:`AuthorizationError` listing every problem as file:line:column."""
    if not root.is_dir():
        raise AuthorizationError([f"{root}:1:1: no such mappings directory"])
    path = root / AUTHORIZATION_FILE
    if not path.is_file():
        return EMPTY
    raw = path.read_bytes()
    table = compile_table(str(path), raw)
    return AuthorizationTable(digest=table.digest, rules=table.rules, files=(path,))


def compile_table(name: str, raw: bytes) -> AuthorizationTable:
    """Compile one file's bytes (what :func:`load_authorization` does after reading it)."""
    errors: list[str] = []
    rules: list[AuthorizationRule] = []
    try:
        doc = loads(raw.decode("utf-8-sig"), name)
    except UnicodeDecodeError as exc:
        raise AuthorizationError([f"{name}:1:1: not UTF-8 text (byte {exc.start})"]) from None
    except SourceError as exc:
        raise AuthorizationError([str(exc)]) from None
    check = _Checker(doc)
    data = doc.data
    found = data.get("schema") if isinstance(data, dict) else None
    if found != AUTHORIZATION_SCHEMA:
        check.report(("schema",), f"expected `schema: {AUTHORIZATION_SCHEMA}` at the top")
    else:
        check.attempt(_rules, check, rules)
    errors.extend(check.errors)
    if not errors:
        errors.extend(_ambiguities(check, rules))
    if errors:
        raise AuthorizationError(errors)
    digest = hashlib.sha256(name.encode() + b"\0" + raw).hexdigest()[:16]
    return AuthorizationTable(digest=digest, rules=tuple(rules))


def _rules(check: _Checker, out: list[AuthorizationRule]) -> None:
    data = check.mapping(check.doc.data, (), "the file")
    check.known_keys(data, (), TOP_KEYS)
    if data.get("description") is not None:
        check.text(data["description"], ("description",), "description")
    seen: dict[str, str] = {}
    for i, item in enumerate(check.items(data.get("rules") or [], ("rules",), "rules")):
        rule = check.attempt(_rule, check, item, ("rules", i))
        if rule is None:
            continue
        if rule.id in seen:
            check.report(("rules", i, "id"), f"rule id {rule.id!r} is also used at {seen[rule.id]}")
            continue
        seen[rule.id] = rule.where
        out.append(rule)


def _rule(check: _Checker, value: Any, at: KeyPath) -> AuthorizationRule:
    data = check.mapping(value, at, "a rule")
    check.known_keys(data, at, RULE_KEYS)
    missing = [k for k in ("id", "required") if data.get(k) is None]
    if missing:
        check.fail(at, f"a rule needs {', '.join(missing)}")
    ident = check.text(data["id"], (*at, "id"), "id")
    if not CODE.match(ident):
        check.fail((*at, "id"), "a rule id is lower-case letters, digits, '_', '.' and '-'")
    if data.get("description") is not None:
        check.text(data["description"], (*at, "description"), "description")
    required = check.flag(data["required"], (*at, "required"), "required")
    sets = {
        name: check.values(data[name], (*at, name), name)
        for name in ("specialty", "payer", "payer_id", "plan")
        if data.get(name) is not None
    }
    diagnosis = (
        check.diagnoses(data["diagnosis"], (*at, "diagnosis"))
        if data.get("diagnosis") is not None
        else None
    )
    return AuthorizationRule(
        id=ident,
        required=required,
        diagnosis=diagnosis,
        where=check.where((*at, "id")),
        **sets,
    )


def _ambiguities(check: _Checker, rules: list[AuthorizationRule]) -> list[str]:
    """Two rules with the same conditions that could both match one referral."""
    out: list[str] = []
    for i, later in enumerate(rules):
        for earlier in rules[:i]:
            if later.given() == earlier.given() and later.overlaps(earlier):
                given = [n for n, g in zip(CONDITIONS, later.given(), strict=True) if g]
                conditions = ", ".join(reversed(given)) or "no conditions"
                out.append(
                    f"{later.where}: rules {later.id!r} and {earlier.id!r} ({earlier.where}) "
                    f"can both match one referral with the same conditions ({conditions}): "
                    "make their values disjoint, or add a condition to the narrower one"
                )
                break
    return out


# ---- the JSON Schema (editor completion; the loader stays the authority) -----------------


def schema() -> dict[str, Any]:
    text = {"type": "string"}
    rule = closed(
        {
            "id": {"type": "string", "pattern": CODE.pattern},
            "description": text,
            "specialty": one_or_many(text),
            "payer": one_or_many(text),
            "payer_id": one_or_many(text),
            "plan": one_or_many(text),
            "diagnosis": one_or_many(
                {"type": "string", "description": "an ICD-10 code (M17.11) or prefix (M17.*)"}
            ),
            "required": {"enum": ["true", "false", True, False]},
        },
        ("id", "required"),
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://refloop.dev/schema/{SCHEMA_NAME}",
        "title": f"refloop pre-authorization table ({AUTHORIZATION_SCHEMA})",
        **closed(
            {
                "schema": {"const": AUTHORIZATION_SCHEMA},
                "description": text,
                "rules": {"type": "array", "items": rule},
            },
            ("schema",),
        ),
    }


def render() -> str:
    """The committed ``mappings/_schema/referral-authorization.v1.json``."""
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"
