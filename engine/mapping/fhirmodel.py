"""What FHIR R4 elements exist, read from the ``fhir.resources`` R4B models (compile time only).

The mapping compiler type-checks every FHIRPath against this table, so ``ServiceRequest.
stauts`` is a load error at its file:line:column, not a path that never matches. Each
element knows its JSON name, its FHIR type, whether it repeats (``0..*``) and, when the
models carry them, the codes of its required binding (``Task.status``) and the resource
types a Reference may point at.

The R4B models read R4 content for the resources refloop maps (STANDARDS §4); where the
two differ the R4B element table is what a mapping is checked against. Nothing here
runs while a resource is normalised: the compiled paths carry what they need.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

#: FHIR primitive types (their values are JSON strings, booleans or numbers).
PRIMITIVES = frozenset(
    {
        "base64Binary",
        "boolean",
        "canonical",
        "code",
        "date",
        "dateTime",
        "decimal",
        "id",
        "instant",
        "integer",
        "integer64",
        "markdown",
        "oid",
        "positiveInt",
        "string",
        "time",
        "unsignedInt",
        "uri",
        "url",
        "uuid",
        "xhtml",
    }
)
_PRIMITIVE_NAMES = {"EncodedBytes": "base64Binary", "UuidVersion": "uuid"}

#: Elements every resource has (Resource), besides those its model lists.
RESOURCE_TYPE = "resourceType"
#: Elements that say nothing about a referral: never reported as unread.
ALWAYS_KNOWN = frozenset({RESOURCE_TYPE, "id", "meta", "text", "implicitRules", "language"})


@dataclass(frozen=True, slots=True)
class Element:
    name: str  # the JSON name (``for``, not the model's ``for_fhir``)
    type: str  # FHIR type: code, dateTime, Reference, CodeableConcept, TaskOutput …
    many: bool  # 0..* / 1..*
    model: Any = None  # the model class of a complex type (None: primitive or Resource)
    codes: tuple[str, ...] = ()  # a required binding's codes, when the model lists all
    targets: tuple[str, ...] = ()  # what a Reference may point at

    @property
    def primitive(self) -> bool:
        return self.type in PRIMITIVES


class UnknownType(LookupError):
    """Not a FHIR R4 resource type (``hint`` names a close one, if any)."""

    def __init__(self, name: str, hint: str) -> None:
        super().__init__(name)
        self.name, self.hint = name, hint


def resource_model(name: str) -> Any:
    """The model class of resource type ``name``; raises :class:`UnknownType`."""
    model = _resource_model(name)
    if model is None:
        close = difflib.get_close_matches(name, _resource_names(), n=3)
        hint = next((c for c in close if _resource_model(c) is not None), "")
        raise UnknownType(name, hint)
    return model


def elements(model: Any) -> Mapping[str, Element]:
    """The elements of a resource, datatype or backbone element model, by JSON name."""
    return _elements(model)


def type_name(model: Any) -> str:
    return str(model.__name__)


@cache
def _resource_model(name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    if not name[:1].isupper():
        return None  # datatypes are capitalised too, but no resource starts lower-case
    try:
        model = get_fhir_model_class(name)
    except (ValueError, ImportError):
        return None
    return model if _is_resource(model) and name not in ("Resource", "DomainResource") else None


@cache
def _resource_names() -> tuple[str, ...]:
    """Names that may be resource types, for a did-you-mean hint only: each resource has
    its own module, so no model is imported (asking all 150 would take seconds)."""
    import pkgutil

    import fhir.resources.R4B as package
    from fhir.resources.R4B import fhirtypes

    modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    return tuple(
        attr[:-4]
        for attr in dir(fhirtypes)
        if attr.endswith("Type") and attr[:-4].lower() in modules and attr[:1].isupper()
    )


@cache
def _elements(model: Any) -> dict[str, Element]:
    out: dict[str, Element] = {}
    for field in model.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue  # fhir_comments, the _primitive extension twins
        kind, many, sub = _describe(field.annotation)
        codes = tuple(str(c) for c in extra.get("enum_values") or ())
        if "+" in codes:  # the models abbreviate long bindings: not the whole list
            codes = ()
        targets = tuple(str(t) for t in extra.get("enum_reference_types") or ())
        name = str(field.alias or "")
        out[name] = Element(name, kind, many, sub, codes, targets)
    if "id" in out and _is_resource(model):
        out[RESOURCE_TYPE] = Element(RESOURCE_TYPE, "code", False)
    return out


def _is_resource(model: Any) -> bool:
    from fhir.resources.R4B.resource import Resource

    return isinstance(model, type) and issubclass(model, Resource)


def _describe(annotation: Any) -> tuple[str, bool, Any]:
    """(FHIR type, repeats, complex model) of one model field's annotation."""
    many = False
    tp = _strip_optional(annotation)
    if typing.get_origin(tp) is list:
        many = True
        tp = _strip_optional(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Annotated:
        meta = tp.__metadata__[0]
        name = type(meta).__name__
        return _PRIMITIVE_NAMES.get(name, name[:1].lower() + name[1:]), many, None
    if tp is bool:
        return "boolean", many, None
    klass = getattr(tp, "_model_klass", None)
    if isinstance(klass, str):
        module, _, attr = klass.rpartition(".")
        sub = getattr(__import__(module, fromlist=[attr]), attr)
        if _is_resource(sub) and type_name(sub) in ("Resource", "DomainResource"):
            return "Resource", many, None  # contained, Bundle.entry.resource: any resource
        return type_name(sub), many, sub
    return "string", many, None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
