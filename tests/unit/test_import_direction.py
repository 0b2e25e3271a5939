"""Imports point one way: protocol → … → store → services → edges; channels stay small.

Every import is found with ast (also ones inside functions and ``TYPE_CHECKING`` blocks),
relative imports are resolved, and each module is checked against the rule for its package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Rule:
    package: str  # the rule applies to modules inside this package
    allowed_engine: tuple[str, ...] | None  # if set: the only engine.* imports allowed
    forbidden: tuple[str, ...] = ()
    why: str = ""


RULES = [
    Rule(
        "engine.protocol",
        allowed_engine=("engine.protocol",),
        why="protocol code is the bottom layer: pure, no config, store or runtime",
    ),
    Rule(
        "engine.mapping",
        allowed_engine=("engine.mapping", "engine.protocol", "engine.domain"),
        why="mapping turns protocol data into domain events; it knows nothing of I/O",
    ),
    Rule(
        "engine.domain",
        allowed_engine=("engine.domain",),
        why="the domain core is pure: standard library and itself only",
    ),
    Rule(
        "engine.outbound",
        allowed_engine=("engine.outbound", "engine.domain", "engine.protocol", "engine.mapping"),
        why="outbound routing and packets are pure: they know events and referrals, not I/O",
    ),
    Rule(
        "engine.policy",
        allowed_engine=("engine.policy", "engine.domain", "engine.mapping", "engine.protocol"),
        why="referral policy (windows, ladders, timer decisions) is pure: no store, no clock",
    ),
    Rule(
        "engine.services",
        allowed_engine=None,
        forbidden=("engine.edges",),
        why="services are called by the edges, never the other way round",
    ),
    Rule(
        "engine.store",
        allowed_engine=None,
        forbidden=("engine.services", "engine.edges"),
        why="the store knows rows, not the services or listeners that use it",
    ),
    Rule(
        "channels",
        allowed_engine=("engine.protocol",),
        why="channels import only the channel protocol and protocol code (never the store, "
        "the mapping engine or the runtime)",
    ),
]


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, *, is_package: bool = False) -> Iterator[str]:
    """Every module (or module.attribute) an import statement in ``source`` names."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    found = []
    for rule in RULES:
        if not under(module, rule.package):
            continue
        for name in imported_names(source, module, is_package=is_package):
            if not under(name, "engine") or name == "engine":
                continue
            if rule.allowed_engine is not None and not any(
                under(name, ok) for ok in rule.allowed_engine
            ):
                found.append(f"{module} imports {name}: {rule.why}")
            if any(under(name, bad) for bad in rule.forbidden):
                found.append(f"{module} imports {name}: {rule.why}")
    return found


def python_files() -> list[Path]:
    return sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "channels").rglob("*.py")])


def test_the_walk_sees_the_layers() -> None:
    names = {module_name(p) for p in python_files()}
    assert {"engine.protocol.mllp", "engine.services.intake", "engine.store.schema"} <= names
    assert "channels" in names


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, module_name(path), is_package=path.name == "__init__.py") == []


# -- the checker itself catches what it must ------------------------------------------------


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("engine.protocol.ack", "from engine.config import Config"),
        ("engine.protocol.ack", "import engine.store.schema"),
        ("engine.protocol.ack", "from engine import metrics"),
        ("engine.protocol.ack", "from .. import config"),
        ("engine.protocol.ack", "def f():\n    from engine.services import intake\n"),
        ("engine.services.intake", "from engine.edges.mllp_listener import policy_from"),
        ("engine.services.intake", "from ..edges import cli"),
        ("engine.store.messages", "from engine.services.intake import Intake"),
        ("engine.store.messages", "import engine.edges.daemon as d"),
        ("channels.fax", "from engine.store.messages import insert_messages"),
        ("channels.fax", "from engine.services import writer"),
        ("channels", "from engine.edges import http_app"),
        ("channels.mllp", "from engine.mapping.mapset import MappingSet"),
        ("channels.mllp", "from engine.config import Config"),
        ("engine.outbound.routing", "from engine.store.outbox import Outbox"),
        ("engine.outbound.packets.hl7v2", "from engine.services import dispatcher"),
        (
            "engine.store.schema",
            "if TYPE_CHECKING:\n    from engine.services import x\n",
        ),
    ],
)
def test_checker_flags_upward_imports(module: str, source: str) -> None:
    assert violations(source, module, is_package=module == "channels")


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("engine.protocol.ack", "from engine.protocol.hl7v2 import Header"),
        ("engine.protocol.ack", "from .hl7v2 import Header"),
        ("engine.protocol.ack", "import hashlib\nfrom datetime import datetime"),
        ("engine.services.intake", "from engine.protocol.ack import build_ack"),
        ("engine.services.writer", "from engine.store.messages import insert_messages"),
        ("engine.store.messages", "from engine.store.schema import messages"),
        ("channels.fax", "from engine.protocol.mllp import encode"),
        ("engine.edges.cli", "from engine.services.intake import assess"),
    ],
)
def test_checker_allows_downward_imports(module: str, source: str) -> None:
    assert violations(source, module) == []


def test_relative_imports_resolve_against_the_package() -> None:
    names = set(imported_names("from ..store import schema", "engine.services.writer"))
    assert "engine.store.schema" in names
    names = set(imported_names("from . import mllp", "engine.protocol", is_package=True))
    assert "engine.protocol.mllp" in names
