"""FHIR R4 inbound, the pure part: JSON in, validation issues and OperationOutcomes out.

Theory of operation
-------------------
A body goes through three gates, each answering with :class:`Issue` values that a
developer at the sending EHR can act on, and none quoting what was sent (a FHIR body is
PHI; an issue names *where* and *what was expected*, never the value):

1. :func:`parse_json` — UTF-8 JSON, one top-level object, no repeated member names
   (which copy would a mapping read?), no ``NaN``; a syntax error says line and column.
2. :func:`validate` — the ``fhir.resources`` R4B model of the resource's type. R4B
   reads R4 content for the resources refloop accepts (ServiceRequest, Task,
   Appointment, DocumentReference, DiagnosticReport, Communication; none of them
   changed between 4.0.1 and 4.3.0). pydantic's ``loc`` becomes the element path
   (``Task.note[0].text``; ``Bundle.entry[2].resource.status`` inside a Bundle). Like
   any R4 model, R4B does not check code values against their value sets (a
   ``Task.status`` of ``"bogus"`` passes): the mapping reports unmapped codes, so
   intake accepts them.
3. :func:`bundle_entries` — a ``transaction`` or ``batch`` Bundle becomes one
   :class:`Entry` per ``entry`` (POST or PUT of a resource), each with its own issues,
   so a batch can accept the good entries and a transaction can refuse them all.

An entry is stored on its own, away from its Bundle, so a reference to another entry
(``urn:uuid:…``, or that entry's ``fullUrl``) would name nothing once stored:
:func:`link_entries` rewrites such references the way a FHIR server resolves them — to
``Type/id`` when the target has an id — and makes them logical as well (``type``, and
the target's identifier), which the mappings read when no id was sent.

What identifies a resource version: :func:`dedup_key` (the source, the type and id,
``meta.versionId``; or the source and a conditional create's ``If-None-Exist``),
:func:`control_id` and :func:`location`. A resource created without an id gets
:func:`generated_id`, a uuid derived from the source and the payload digest, so the same
POST always answers the same ``Location``.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import pydantic
from fhir.resources.R4B import get_fhir_model_class

FHIR_JSON = "application/fhir+json"
#: Content types read as FHIR JSON (``application/json+fhir`` is the DSTU2-era spelling).
JSON_MEDIA_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
#: Resource types with a REST endpoint (POST /fhir/r4/<type>, PUT /fhir/r4/<type>/<id>).
WRITABLE = (
    "ServiceRequest",
    "Task",
    "Appointment",
    "DocumentReference",
    "DiagnosticReport",
    "Communication",
)
BUNDLE_TYPES = ("transaction", "batch")
#: The FHIR ``id`` datatype: 1 to 64 of these characters.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: What an element name looks like (``_`` starts a primitive's extension sibling).
_ELEMENT = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")
#: Issues listed in one OperationOutcome; a broken generator can produce thousands.
MAX_ISSUES = 20
_REFLOOP_NS = uuid.UUID("6f1d1c7e-2b1a-5d3e-9a51-8c0f4e1b7a20")

Severity = Literal["fatal", "error", "warning", "information"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One ``OperationOutcome.issue``: a code from the FHIR IssueType value set, what
    was expected, and where (a FHIRPath-like element path)."""

    severity: Severity
    code: str
    diagnostics: str
    expression: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = [self.expression]
        return out


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    shown = [i.as_json() for i in issues[:MAX_ISSUES]]
    if len(issues) > MAX_ISSUES:
        more = len(issues) - MAX_ISSUES
        shown.append(Issue("information", "informational", f"{more} more issues").as_json())
    if not shown:
        shown = [Issue("information", "informational", "no issues").as_json()]
    return {"resourceType": "OperationOutcome", "issue": shown}


def error(code: str, diagnostics: str, expression: str | None = None) -> Issue:
    return Issue("error", code, diagnostics, expression)


# -- 1. JSON ------------------------------------------------------------------------


class FhirJsonError(ValueError):
    """The body is not usable JSON; ``issue`` says where it broke."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.diagnostics)
        self.issue = issue


class _Repeated(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Repeated
    return out


def _no_constants(_: str) -> Any:
    raise _Repeated("constant")


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8, a BOM tolerated), or :class:`FhirJsonError`."""
    text_bytes = body.removeprefix(b"\xef\xbb\xbf")
    if not text_bytes.strip():
        raise FhirJsonError(error("structure", "the request body is empty"))
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FhirJsonError(
            error("structure", f"the body is not UTF-8 (first bad byte at offset {exc.start})")
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_no_repeats, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        # exc.msg is json's fixed wording ("Expecting ',' delimiter"); never the text.
        where = f"line {exc.lineno} column {exc.colno}"
        raise FhirJsonError(error("structure", f"malformed JSON at {where}: {exc.msg}")) from None
    except _Repeated as exc:
        what = (
            "NaN and Infinity are not JSON numbers"
            if str(exc) == "constant"
            else "a JSON object repeats a member name (FHIR JSON allows each once)"
        )
        raise FhirJsonError(error("structure", what)) from None
    except RecursionError:
        raise FhirJsonError(error("structure", "the JSON is nested too deeply")) from None
    except ValueError:
        # Python refuses integers of more than 4300 digits.
        raise FhirJsonError(error("structure", "a number in the body is too long")) from None


def parse_resource(body: bytes) -> dict[str, Any]:
    """A JSON object with a ``resourceType`` string, or :class:`FhirJsonError`."""
    value = parse_json(body)
    if not isinstance(value, dict):
        raise FhirJsonError(error("structure", "the body must be one JSON object (a resource)"))
    if not isinstance(value.get("resourceType"), str):
        raise FhirJsonError(error("required", "resourceType is missing", "resourceType"))
    return value


def compact(resource: Mapping[str, Any]) -> bytes:
    """The resource as compact JSON, for a Bundle entry stored on its own."""
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- 2. validation --------------------------------------------------------------------


@cache
def known_type(resource_type: str) -> bool:
    """A resource type the R4B models know."""
    try:
        get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError):
        return False
    return resource_type[:1].isupper()


def validate(resource: Mapping[str, Any], *, base: str | None = None) -> list[Issue]:
    """Problems of ``resource`` against its R4B model; ``[]`` when it is valid.

    ``base`` is the element path of the resource inside a larger body
    (``Bundle.entry[2].resource``); by default paths start with the resource type.
    """
    rtype = resource.get("resourceType")
    head = base or (rtype if isinstance(rtype, str) else "Resource")
    if not isinstance(rtype, str):
        return [error("required", "resourceType is missing", f"{head}.resourceType")]
    if not known_type(rtype):
        return [
            error("not-supported", "resourceType is not a FHIR R4 resource", f"{head}.resourceType")
        ]
    # The models look nested resource types up in a table and raise KeyError on an
    # unknown one: found here first, with its path.
    nested = [
        error("invalid", "resourceType is not a FHIR R4 resource", f"{head}{path}.resourceType")
        for path, value in _nested_types(resource, "")
        if not (isinstance(value, str) and known_type(value))
    ]
    if nested:
        return nested
    issues = _id_lengths(resource, head)
    try:
        get_fhir_model_class(rtype).model_validate(dict(resource))
    except pydantic.ValidationError as exc:
        issues += [_issue(err, head) for err in exc.errors()[: MAX_ISSUES * 2]]
    except RecursionError:
        issues.append(error("structure", "the resource is nested too deeply", head))
    except Exception:  # a model bug must not become a 5xx for the sender
        issues.append(error("invalid", "the resource could not be read by the R4 model", head))
    return _unique(issues)


def _nested_types(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}"
            if isinstance(item, dict) and "resourceType" in item:
                yield sub, item["resourceType"]
            if isinstance(item, list):
                for n, element in enumerate(item):
                    if isinstance(element, dict) and "resourceType" in element:
                        yield f"{sub}[{n}]", element["resourceType"]
                    yield from _nested_types(element, f"{sub}[{n}]")
            else:
                yield from _nested_types(item, sub)


def _id_lengths(resource: Mapping[str, Any], head: str) -> list[Issue]:
    # The models check the id characters but not the FHIR limit of 64.
    out = []
    rid = resource.get("id")
    if isinstance(rid, str) and len(rid) > 64:
        out.append(error("value", "an id is at most 64 characters", f"{head}.id"))
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if isinstance(version, str) and len(version) > 64:
        out.append(error("value", "an id is at most 64 characters", f"{head}.meta.versionId"))
    return out


_CODES = {
    "missing": "required",
    "model_field_validation.missing": "required",
    "extra_forbidden": "structure",
    "model_validation_format": "structure",
    "fhir-validation-wrong-resource-type": "invalid",
}


def _issue(err: Any, head: str) -> Issue:
    kind = str(err.get("type", ""))
    path = head + _loc_path(err.get("loc", ()))
    if kind in ("missing", "model_field_validation.missing"):
        text = "a required element is missing"
    elif kind == "extra_forbidden":
        text = "not an element of this resource or datatype in FHIR R4"
    elif kind == "fhir-validation-wrong-resource-type":
        text = "resourceType does not match the type expected here"
    else:
        text = _safe_message(str(err.get("msg", "")), err.get("input"))
    typed = kind.endswith(("_type", "_parsing", "_error", "_mismatch", "_short", "_long"))
    return error(_CODES.get(kind, "value" if typed else "invalid"), text, path)


def _loc_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "root":
            continue  # the validator's name for "this value itself"
        elif part == "resource_type":
            out += ".resourceType"
        elif _ELEMENT.fullmatch(str(part)):
            out += f".{part}"
        else:
            # A member name no FHIR element has; it came from the body, so not echoed.
            out += ".(unknown member)"
    return out


def _safe_message(msg: str, value: Any) -> str:
    """pydantic's wording of what was expected, unless it could echo the value."""
    text = msg.removeprefix("Value error, ").strip()
    choice = re.match(r"(Expect any of|Any of one) field value .*?\[([^\]]*)\]", text)
    if choice:
        names = re.findall(r"'([A-Za-z_]+)'", choice.group(2))
        stem = _common_prefix(names) if names else "value"
        many = text.startswith("Any of one")
        return f"{'only one' if many else 'one'} of {stem}[x] must be present"
    if any(leaf in text for leaf in _strings(value)):
        return "this value is not valid here"
    if "spec regex" in text:
        # fhir.resources: "DateTime value string does not match spec regex."
        kind = text.split(" value ", 1)[0]
        return f"not a valid FHIR {kind[:1].lower()}{kind[1:]}"
    return text[:300]


def _common_prefix(names: list[str]) -> str:
    stem = names[0]
    for name in names[1:]:
        while not name.startswith(stem):
            stem = stem[:-1]
    return stem or "value"


def _strings(value: Any, limit: int = 200) -> list[str]:
    out: list[str] = []
    stack = [value]
    while stack and len(out) < limit:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) >= 3:
                out.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, int | float) and not isinstance(item, bool) and len(str(item)) >= 3:
            out.append(str(item))
    return out


def _unique(issues: list[Issue]) -> list[Issue]:
    seen: set[tuple[str, str | None]] = set()
    out = []
    for issue in issues:
        key = (issue.diagnostics, issue.expression)
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


# -- identity -------------------------------------------------------------------------


def is_id(value: str) -> bool:
    """A valid FHIR ``id``: 1 to 64 letters, digits, ``-`` and ``.``."""
    return bool(_ID.fullmatch(value))


def resource_id(resource: Mapping[str, Any]) -> str | None:
    rid = resource.get("id")
    return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None


def version_id(resource: Mapping[str, Any]) -> str | None:
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, Mapping) else None
    return version if isinstance(version, str) and _ID.fullmatch(version) else None


def generated_id(source: str, resource_type: str, payload_sha256: str) -> str:
    """The id refloop answers for a resource created without one: the same source
    posting the same bytes gets the same id."""
    return str(uuid.uuid5(_REFLOOP_NS, f"{source}\x1f{resource_type}\x1f{payload_sha256}"))


def location(resource_type: str, rid: str, version: str | None) -> str:
    """``Type/id/_history/v`` (``Type/id`` without a version): a relative FHIR location."""
    return f"{resource_type}/{rid}" + (f"/_history/{version}" if version else "")


def dedup_key(
    source: str, resource_type: str, rid: str | None, version: str | None, if_none_exist: str | None
) -> str | None:
    """What a resend of the same resource version collides on (``messages.dedup_key``).

    The same id and ``meta.versionId`` from the same source is the same version; so is
    a second conditional create with the same ``If-None-Exist`` (FHIR: create it only
    if nothing matches). Anything else has no key and is never a duplicate.
    """
    if rid and version:
        basis = ("version", source, f"{resource_type}/{rid}", version)
    elif if_none_exist:
        basis = ("if-none-exist", source, resource_type, if_none_exist.strip())
    else:
        return None
    return hashlib.sha256("\x1f".join(basis).encode("utf-8", "surrogateescape")).hexdigest()


def same_resource(a: bytes, b: bytes) -> bool:
    """The same content, however serialised: key order, whitespace and
    ``meta.lastUpdated`` (a server restamps it when it sends a version again) aside."""
    try:
        left, right = json.loads(a), json.loads(b)
    except (ValueError, RecursionError):
        return a == b
    return bool(_without_last_updated(left) == _without_last_updated(right))


def _without_last_updated(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("meta"), dict):
        meta = {k: v for k, v in value["meta"].items() if k != "lastUpdated"}
        value = {**value, "meta": meta}
    return value


def fhir_conflict(
    row: dict[str, Any], original_raw: bytes, original_id: int
) -> dict[str, Any] | None:
    """Row updates when a FHIR resend is not a duplicate (the writer's conflict check).

    Same source, id and ``meta.versionId`` but other content is a conflict: stored as
    ``rejected`` and answered 409, so the sender's team hears that a changed resource
    needs a new version id. A repeated conditional create (If-None-Exist) is a
    duplicate whatever its content: FHIR creates nothing when the condition matches.
    """
    try:
        resource = json.loads(row["raw"])
    except (ValueError, RecursionError):
        resource = None
    versioned = isinstance(resource, dict) and resource_id(resource) and version_id(resource)
    if not versioned or same_resource(row["raw"], original_raw):
        return None
    return {
        "status": "rejected",
        "ack": None,
        "ack_code": None,
        "error_code": 409,
        "error": (
            f"{row['control_id']} was already received from this source as message "
            f"{original_id} with different content; a changed resource needs a new "
            "meta.versionId"
        ),
    }


# -- 3. Bundles -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``Bundle.entry`` of a transaction or batch, checked on its own."""

    index: int
    method: str  # POST or PUT
    resource: Mapping[str, Any] | None
    if_none_exist: str | None
    issues: tuple[Issue, ...] = ()
    status: int = 201  # the HTTP status this entry earns when it is refused: 400 or 422
    url_id: str | None = None  # PUT Type/<id>

    @property
    def ok(self) -> bool:
        return not self.issues


@dataclass(frozen=True, slots=True)
class BundleCheck:
    kind: str  # transaction | batch
    entries: tuple[Entry, ...]
    issues: tuple[Issue, ...] = field(default=())  # about the Bundle itself
    status: int = 200


def bundle_entries(bundle: Mapping[str, Any]) -> BundleCheck:
    """Check a Bundle posted to the base URL: its type and each entry (see the module
    docstring). Issues about the Bundle as a whole go in ``BundleCheck.issues``."""
    kind = bundle.get("type")
    if kind not in BUNDLE_TYPES:
        issue = error(
            "not-supported",
            "a Bundle posted here is a transaction or a batch (a subscription "
            "notification goes to /fhir/r4/_notify/<source>)",
            "Bundle.type",
        )
        return BundleCheck(str(kind or ""), (), (issue,), 422)
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        return BundleCheck(kind, (), (error("structure", "must be a list", "Bundle.entry"),), 400)
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    shell["entry"] = [
        {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
        for e in raw_entries
    ]
    shell_issues = validate(shell, base="Bundle")
    whole = [i for i in shell_issues if not (i.expression or "").startswith("Bundle.entry[")]
    if whole:
        return BundleCheck(kind, (), tuple(whole), 422)
    entries = []
    for n, raw in enumerate(raw_entries):
        prefix = f"Bundle.entry[{n}]"
        own = [i for i in shell_issues if _under(i.expression, prefix)]
        entries.append(_entry(n, raw, own))
    return BundleCheck(kind, tuple(entries))


def _under(expression: str | None, prefix: str) -> bool:
    return bool(expression) and (
        expression == prefix or str(expression).startswith((prefix + ".", prefix + "["))
    )


def _entry(n: int, raw: Any, shell_issues: list[Issue]) -> Entry:
    at = f"Bundle.entry[{n}]"
    if not isinstance(raw, dict):
        return Entry(n, "", None, None, (error("structure", "must be an object", at),), 400)
    found = raw.get("request")
    request: dict[str, Any] = found if isinstance(found, dict) else {}
    method = str(request.get("method") or "").upper()
    url = str(request.get("url") or "")
    held = raw.get("resource")
    resource: dict[str, Any] | None = held if isinstance(held, dict) else None
    ine = request.get("ifNoneExist") if isinstance(request.get("ifNoneExist"), str) else None
    if shell_issues:
        return Entry(n, method, resource, ine, tuple(shell_issues), 400)
    if not request:
        issue = error("required", "a transaction or batch entry needs a request", f"{at}.request")
        return Entry(n, method, resource, ine, (issue,), 400)
    if method not in ("POST", "PUT"):
        issue = error(
            "not-supported",
            "refloop accepts POST and PUT entries (it stores what it is sent; it is not a "
            "FHIR server to read from or delete in)",
            f"{at}.request.method",
        )
        return Entry(n, method, resource, ine, (issue,), 400)
    if resource is None:
        issue = error("required", "a POST or PUT entry carries a resource", f"{at}.resource")
        return Entry(n, method, resource, ine, (issue,), 400)
    rtype = resource.get("resourceType")
    path, conditional, _ = url.partition("?")
    url_type, _, url_id = path.partition("/")
    where = f"{at}.request.url"
    problem: Issue | None = None
    if not isinstance(rtype, str) or url_type != rtype:
        problem = error("invalid", "request.url must start with the entry's resourceType", where)
    elif method == "POST" and (url_id or conditional):
        problem = error("invalid", "a POST url is the resource type only", where)
    elif method == "PUT" and not conditional and not is_id(url_id):
        problem = error("invalid", "a PUT url is Type/id or a conditional Type?search", where)
    elif method == "PUT" and not conditional and resource.get("id") != url_id:
        problem = error("invalid", "must equal the id in request.url", f"{at}.resource.id")
    if problem is not None:
        return Entry(n, method, resource, ine, (problem,), 400, url_id or None)
    issues = validate(resource, base=f"{at}.resource")
    return Entry(n, method, resource, ine, tuple(issues), 422 if issues else 201, url_id or None)


# -- Bundle-local references --------------------------------------------------------

#: A relative literal reference, ``Type/id``.
_RELATIVE = re.compile(r"(?P<type>[A-Z][A-Za-z]{0,63})/(?P<id>[A-Za-z0-9\-.]{1,64})")
#: A RESTful absolute URL, ``<base>/Type/id``: the base relative references resolve on.
_RESTFUL = re.compile(r"(?P<base>.+)/[A-Z][A-Za-z]{0,63}/[A-Za-z0-9\-.]{1,64}")
#: What of a target's identifier a reference carries (``assigner`` is a reference of
#: its own, perhaps Bundle-local too, and matches nothing).
_IDENTIFIER_PARTS = ("use", "type", "system", "value", "period")


@dataclass(frozen=True, slots=True)
class _Target:
    resource_type: str
    id: str | None
    identifier: dict[str, Any] | None


def link_entries(
    bundle: Mapping[str, Any], *, targets: Collection[int] | None = None
) -> list[dict[str, Any] | None]:
    """Each entry's resource with its references to other entries made self-standing.

    A ``Reference`` anywhere in an entry's resource (extensions included; contained and
    other nested resources aside: their references resolve in their own context) whose
    ``reference`` is the ``fullUrl`` of an entry — a ``urn:uuid:``, or a relative
    ``Type/id`` that the referencing entry's RESTful ``fullUrl`` resolves to one
    (FHIR's Bundle resolution rules) — gets

    * ``reference = "Type/id"`` when the target resource has an id (else it stays);
    * ``type`` = the target's resourceType;
    * ``identifier`` = the target's (a Patient's typed ``MR`` first, else its first),

    never overwriting a ``type`` or ``identifier`` the sender wrote. Only entries whose
    index is in ``targets`` are targets (default: all); a ``fullUrl`` two entries share
    names neither. Returns one item per ``Bundle.entry`` (None where an entry carries no
    resource object); the Bundle itself is not modified. Pure, and it never raises.
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    found: dict[str, _Target | None] = {}
    for n, raw in enumerate(entries):
        resource = _resource_of(raw)
        url = raw.get("fullUrl") if isinstance(raw, dict) else None
        if resource is None or not isinstance(url, str) or not url.strip():
            continue
        if targets is not None and n not in targets:
            continue
        key = url.strip()
        found[key] = None if key in found else _target(resource)
    known = {url: t for url, t in found.items() if t is not None}
    out: list[dict[str, Any] | None] = []
    for raw in entries:
        resource = _resource_of(raw)
        if resource is None:
            out.append(None)
            continue
        url = raw.get("fullUrl")
        restful = _RESTFUL.fullmatch(url.strip()) if isinstance(url, str) else None
        base = restful.group("base") if restful else None
        try:
            linked = _linked(resource, known, base, top=True)
        except RecursionError:  # too deep to walk: validation refuses such a resource
            linked = resource
        out.append(dict(linked))
    return out


def _resource_of(entry: Any) -> dict[str, Any] | None:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
        return resource
    return None


def _target(resource: Mapping[str, Any]) -> _Target:
    rtype = str(resource["resourceType"])
    return _Target(rtype, resource_id(resource), _identifier_of(rtype, resource.get("identifier")))


def _identifier_of(resource_type: str, value: Any) -> dict[str, Any] | None:
    items = value if isinstance(value, list) else [value]
    usable = [
        i for i in items if isinstance(i, dict) and isinstance(i.get("value"), str) and i["value"]
    ]
    if not usable:
        return None
    chosen = usable[0]
    if resource_type == "Patient":
        chosen = next((i for i in usable if _typed(i, "MR")), chosen)
    return {k: chosen[k] for k in _IDENTIFIER_PARTS if k in chosen}


def _typed(ident: Mapping[str, Any], code: str) -> bool:
    kind = ident.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    return isinstance(codings, list) and any(
        isinstance(c, dict) and c.get("code") == code for c in codings
    )


def _linked(value: Any, known: Mapping[str, _Target], base: str | None, *, top: bool) -> Any:
    """``value`` with its Bundle-local references rewritten; the same object when
    nothing under it changed."""
    if isinstance(value, list):
        items = [_linked(v, known, base, top=False) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if not isinstance(value, dict) or (not top and "resourceType" in value):
        return value
    out = {k: _linked(v, known, base, top=False) for k, v in value.items()}
    text = value.get("reference")
    target = _resolve(text, known, base) if isinstance(text, str) else None
    if target is not None:
        if target.id is not None:
            out["reference"] = f"{target.resource_type}/{target.id}"
        out.setdefault("type", target.resource_type)
        if target.identifier is not None:
            out.setdefault("identifier", target.identifier)
    same = target is None and all(out[k] is value[k] for k in value)
    return value if same else out


def _resolve(text: str, known: Mapping[str, _Target], base: str | None) -> _Target | None:
    ref = text.strip()
    if ref in known:
        return known[ref]
    if base is not None and _RELATIVE.fullmatch(ref):
        return known.get(f"{base}/{ref}")
    return None
