"""Shared validation helpers for the YAML languages (mappings, directory, routes, policies).

Theory of operation
-------------------
Each loader walks one :class:`~engine.mapping.source.Document` and reports every problem at
its node as ``file:line:column: what was expected``, with a did-you-mean hint for a
misspelt name. A helper that finds a problem records it and raises :class:`Abandon`, which
:meth:`Checker.attempt` catches: the current unit (a rule, a route, an entry) is given up
and the rest of the file is still checked, so one load reports every problem at once.

:class:`Checker` keeps errors as whatever its subclass makes of a :class:`SourceError`
(the mapping compiler keeps them as they are; :class:`TextChecker` keeps their text). The
messages here are asserted verbatim by tests across the engine: change them only on purpose.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from typing import Any, Generic, NoReturn, TypeVar

from engine.mapping.source import Document, KeyPath, SourceError

__all__ = ["Abandon", "Checker", "TextChecker", "hint"]

T = TypeVar("T")
E = TypeVar("E")


class Abandon(Exception):
    """Stop checking the current unit; its error is already recorded."""


def hint(value: Any, options: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or nothing."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Checker(Generic[E]):
    """Validation helpers over one YAML document; collects every error instead of stopping
    at the first."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.errors: list[E] = []

    def keep(self, error: SourceError) -> E:
        """How an error is kept in :attr:`errors`."""
        raise NotImplementedError

    # ---- recording --------------------------------------------------------------------

    def fail(self, at: KeyPath, message: str) -> NoReturn:
        self.report(at, message)
        raise Abandon

    def fail_at_key(self, at: KeyPath, message: str) -> NoReturn:
        self.errors.append(self.keep(self.doc.key_error(at, message)))
        raise Abandon

    def report(self, at: KeyPath, message: str) -> None:
        """Record an error and carry on with the current unit."""
        self.errors.append(self.keep(self.doc.error(at, message)))

    def where(self, at: KeyPath) -> str:
        err = self.doc.error(at, "")
        return f"{err.file}:{err.line}:{err.column}"

    def attempt(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Check one unit; its error is recorded and the rest of the file goes on."""
        try:
            return fn(*args)
        except Abandon:
            return None

    # ---- values -----------------------------------------------------------------------

    def mapping_of(self, value: Any, at: KeyPath, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(at, f"{what} must be a mapping of keys to values")
        return value

    def list_of(self, value: Any, at: KeyPath, what: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(at, f"{what} must be a list (one `- item` per line)")
        return value

    def text(self, value: Any, at: KeyPath, what: str) -> str:
        if not isinstance(value, str) or value == "":
            self.fail(at, f"{what} must be text")
        return value

    def texts(self, value: Any, at: KeyPath, what: str) -> tuple[str, ...]:
        """One text or a non-empty list of them."""
        if isinstance(value, str) and value:
            return (value,)
        if isinstance(value, list) and value:
            return tuple(self.text(v, (*at, i), what) for i, v in enumerate(value))
        return self.fail(at, f"{what} must be text or a non-empty list of text")

    def flag(self, value: Any, at: KeyPath, what: str) -> bool:
        if value in ("true", "false"):
            return bool(value == "true")
        return self.fail(at, f"{what} must be true or false")

    def choice(self, value: Any, at: KeyPath, what: str, options: tuple[str, ...]) -> str:
        if value not in options:
            self.fail(at, f"{what} must be one of {', '.join(options)}{hint(value, options)}")
        return str(value)

    # ---- keys -------------------------------------------------------------------------

    def known_keys(self, data: dict[str, Any], at: KeyPath, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                self.fail_at_key(
                    (*at, key),
                    f"unknown key {key!r}{hint(key, allowed)}; expected one of "
                    f"{', '.join(allowed)}",
                )

    def required(self, data: dict[str, Any], at: KeyPath, keys: tuple[str, ...], what: str) -> None:
        missing = [k for k in keys if k not in data]
        if missing:
            self.fail(at, f"{what} needs {', '.join(missing)}")


class TextChecker(Checker[str]):
    """A :class:`Checker` whose errors are their ``file:line:column: message`` text."""

    def keep(self, error: SourceError) -> str:
        return str(error)

    def mapping(self, value: Any, at: KeyPath, what: str) -> dict[str, Any]:
        return self.mapping_of(value, at, what)

    def items(self, value: Any, at: KeyPath, what: str) -> list[Any]:
        return self.list_of(value, at, what)
