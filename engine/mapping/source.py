"""Reading analysts' YAML without YAML's surprises, with file:line:column on every error.

YAML 1.1 turns ``NO`` (Norway), ``ON`` (Ontario) and ``YES`` into booleans, ``010`` into
8 and ``1980-01-01`` into a date; in code tables those are codes and must stay text.
So every scalar is read as the string the analyst typed. Types come later, from the
mapping schema, which knows which keys are numbers or flags.

YAML also lets a key appear twice and silently keeps the last one; a mapping where two
rules share a name would then drop one without a word. Duplicate keys are an error here.

The result is plain Python (dict, list, str, None for an empty value) plus a
:class:`Positions` index from each node's key path to where it was written, so later
validation can point at ``orm_o01.map.yaml:42:7``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


class SourceError(Exception):
    """A problem in an analyst's file, located to the character."""

    def __init__(self, file: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{file}:{line}:{column}: {message}")
        self.file, self.line, self.column, self.message = file, line, column, message


@dataclass(frozen=True, slots=True)
class Document:
    data: Any
    positions: dict[KeyPath, Position]  # where each value starts
    file: str
    key_positions: dict[KeyPath, Position] = field(default_factory=dict)  # where each key is

    def error(self, path: KeyPath, message: str) -> SourceError:
        """A :class:`SourceError` at the node ``path`` (or its nearest written parent)."""
        probe = path
        while probe and probe not in self.positions:
            probe = probe[:-1]
        pos = self.positions.get(probe, Position(1, 1))
        return SourceError(self.file, pos.line, pos.column, message)

    def key_error(self, path: KeyPath, message: str) -> SourceError:
        """A :class:`SourceError` at the key of ``path`` (e.g. a misspelt key), not its value."""
        pos = self.key_positions.get(path)
        if pos is None:
            return self.error(path, message)
        return SourceError(self.file, pos.line, pos.column, message)


def load(path: Path) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(str(path), 1, 1, f"not UTF-8 text (byte {exc.start})") from None
    return loads(text, str(path))


def loads(text: str, file: str = "<text>") -> Document:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "YAML syntax error"
        raise SourceError(file, line, column, f"YAML syntax: {problem}") from None
    positions: dict[KeyPath, Position] = {}
    keys: dict[KeyPath, Position] = {}
    data = None if node is None else _convert(node, (), positions, keys, file)
    return Document(data, positions, file, keys)


def _convert(
    node: yaml.Node,
    path: KeyPath,
    positions: dict[KeyPath, Position],
    keys: dict[KeyPath, Position],
    file: str,
) -> Any:
    positions[path] = Position(node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:null" and node.value in ("", "~", "null", "Null", "NULL"):
            return None
        return str(node.value)
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, (*path, i), positions, keys, file) for i, item in enumerate(node.value)
        ]
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _at(file, key_node, "keys must be plain text")
            key = str(key_node.value)
            if key == "<<":
                raise _at(file, key_node, "merge keys (<<) are not supported; repeat the fields")
            if key in out:
                first = positions[(*path, key)]
                raise _at(
                    file,
                    key_node,
                    f"duplicate key {key!r} (first at line {first.line}); YAML would keep only "
                    "the last one",
                )
            keys[(*path, key)] = Position(
                key_node.start_mark.line + 1, key_node.start_mark.column + 1
            )
            out[key] = _convert(value_node, (*path, key), positions, keys, file)
        return out
    raise _at(file, node, "unsupported YAML node")


def _at(file: str, node: yaml.Node, message: str) -> SourceError:
    return SourceError(file, node.start_mark.line + 1, node.start_mark.column + 1, message)
