"""The specialist directory: who takes referrals, for what, and how they want them.

Theory of operation
-------------------
Analysts keep the directory in ``mappings/directory/`` as YAML (``referral-directory/v1``)
or as CSV exported from a spreadsheet (one delivery target per row; rows that repeat an
id add targets to that specialist). Files are read in name order and entries keep their
order: the order is the tie-break when several specialists could take a referral.

Loading is all-or-nothing and collects every problem, each as ``file:line:column:
what was expected`` (for CSV, ``file.csv:row:column``, the column counted from 1 = id).
Checks: known keys only, every value text, a well-formed NPI (see :func:`npi_valid`),
ids unique across all files, at least one target per specialist, and — when the caller
knows them — format and channel names. Channels are checked for *active* specialists
only: a directory may describe a specialist before ``engine.toml`` has the channel to
reach them, as long as the entry is ``active: false``.

The :class:`Directory` itself is pure lookups. Inactive entries are invisible to them
(except :meth:`Directory.get`): ``active: false`` takes a specialist out of routing.

Choosing a specialist (:meth:`Directory.choose`): the referral's named recipient
(``recipient.identifier``: an NPI or a directory id) when the directory has them active
and they take the patient's plan; otherwise, among the active entries offering the
referral's specialty, those **in network** for its ``insurance.plan`` — an entry that
lists ``accepted_plans`` takes those plans only (compared without case), an entry that
lists none takes any plan (the directory does not know its contracts), and a referral
without a plan is not filtered — and of those, the ones whose ``locations`` include the
referral's ``location`` first, then the rest; file order breaks every tie. Location is a
preference, never a filter: a patient is better served far away than not at all.
Entries already tried (a specialist who declined) are left out. A named specialist who
is passed over is said so in the choice's ``note``; no candidate at all is a ``code``
(:data:`NO_SPECIALIST`, :data:`NO_IN_NETWORK`, :data:`DECLINED_NO_ALTERNATIVE`) that the
pipeline turns into a worklist item.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.mapping.checker import TextChecker, hint
from engine.mapping.source import KeyPath, SourceError, loads
from engine.outbound.model import Party, Specialist, Target

DIRECTORY_SCHEMA = "referral-directory/v1"
SPECIALIST_KEYS = (
    "id",
    "name",
    "npi",
    "provider_names",
    "specialties",
    "accepted_plans",
    "locations",
    "targets",
    "receiver",
    "active",
)
TARGET_KEYS = ("channel", "format", "endpoint")
PARTY_KEYS = ("application", "facility")
CSV_COLUMNS = (
    "id",
    "name",
    "npi",
    "specialties",
    "accepted_plans",
    "locations",
    "channel",
    "format",
    "endpoint",
    "receiving_application",
    "receiving_facility",
    "active",
)
CSV_REQUIRED = ("id", "name", "channel", "format")
CSV_TARGET_COLUMNS = frozenset({"channel", "format", "endpoint"})
YAML_SUFFIXES = (".yaml", ".yml")

#: Directory ids: what an HL7 PRD-7 or a spreadsheet is likely to hold, nothing exotic.
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: The prefix the NPI check digit is computed over (ISO 7812: 80 health, 840 USA).
NPI_PREFIX = "80840"

Record = Callable[[Path, bytes], None]


class OutboundError(Exception):
    """The outbound set did not load; ``errors`` holds every problem, each
    ``file:line:column: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors) or "outbound set did not load")


def npi_valid(npi: str) -> bool:
    """Ten digits whose last is the Luhn check digit of ``80840`` + the first nine (the
    CMS NPI rule, e.g. 1234567893)."""
    if len(npi) != 10 or not npi.isascii() or not npi.isdigit():
        return False
    total = 0
    for i, char in enumerate(reversed(NPI_PREFIX + npi)):
        digit = int(char)
        if i % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def unknown_name(kind: str, value: str, known: Collection[str] | None) -> str | None:
    """Why ``value`` is not a usable format/channel name, or None when it is (or when the
    caller does not know the names)."""
    if known is None or value in known:
        return None
    if kind == "channel":
        defined = ", ".join(sorted(known)) if known else "none"
        return f"unknown channel {value!r}{hint(value, known)} (engine.toml defines: {defined})"
    rendered = ", ".join(sorted(known)) if known else "none"
    return f"unknown format {value!r}{hint(value, known)} (the engine renders: {rendered})"


class Checker(TextChecker):
    """The shared checks plus the directory's own: receivers, optional text, known
    format/channel names and the ``schema:`` line."""

    def party(self, value: Any, at: KeyPath) -> Party:
        data = self.mapping(value, at, "receiver")
        self.known_keys(data, at, PARTY_KEYS)
        return Party(
            application=self.optional(data, "application", at),
            facility=self.optional(data, "facility", at),
        )

    def optional(self, data: dict[str, Any], key: str, at: KeyPath) -> str:
        value = data.get(key)
        return "" if value is None else self.text(value, (*at, key), key)

    def name(self, kind: str, value: str, at: KeyPath, known: Collection[str] | None) -> None:
        """Report (and carry on) when a format/channel name is not one the caller knows."""
        problem = unknown_name(kind, value, known)
        if problem:
            self.report(at, problem)

    def schema(self, expected: tuple[str, ...]) -> str | None:
        data = self.doc.data
        found = data.get("schema") if isinstance(data, dict) else None
        if found not in expected:
            wanted = " or ".join(f"`schema: {s}`" for s in expected)
            self.report(("schema",), f"expected {wanted} at the top")
            return None
        return str(found)


# ---- the directory -----------------------------------------------------------------------

#: Why no specialist could be chosen (worklist reasons).
NO_SPECIALIST = "no_specialist"
NO_IN_NETWORK = "no_in_network_specialist"
DECLINED_NO_ALTERNATIVE = "declined_no_alternative"


def _same(a: str) -> str:
    return a.strip().casefold()


def accepts(specialist: Specialist, plan: str | None) -> bool:
    """In network for ``plan``: no plan known, no plans listed, or the plan is listed."""
    if not plan or not specialist.accepted_plans:
        return True
    return _same(plan) in {_same(p) for p in specialist.accepted_plans}


def serves(specialist: Specialist, location: str | None) -> bool:
    return bool(location) and _same(location or "") in {_same(x) for x in specialist.locations}


@dataclass(frozen=True)
class Choice:
    """Who :meth:`Directory.choose` picked; ``code`` says why nobody (when nobody), and
    ``note`` why the named recipient was passed over (configuration only, no PHI)."""

    specialist: Specialist | None
    code: str = ""
    note: str = ""


@dataclass(frozen=True)
class Directory:
    specialists: tuple[Specialist, ...] = ()
    _by_id: Mapping[str, Specialist] = field(init=False, repr=False, compare=False)
    _by_npi: Mapping[str, Specialist] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {s.id: s for s in self.specialists}
        by_npi: dict[str, Specialist] = {}
        for s in self.specialists:
            if s.active and s.npi:
                by_npi.setdefault(s.npi, s)  # a shared (group) NPI: the first entry
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_npi", by_npi)

    def __iter__(self) -> Iterator[Specialist]:
        return iter(self.specialists)

    def __len__(self) -> int:
        return len(self.specialists)

    def get(self, id: str) -> Specialist | None:
        """The entry with this id, active or not."""
        return self._by_id.get(id)

    def find(self, identifier: str) -> Specialist | None:
        """The active specialist whose NPI or directory id is ``identifier``."""
        found = self._by_npi.get(identifier)
        if found is not None:
            return found
        found = self._by_id.get(identifier)
        return found if found is not None and found.active else None

    def for_specialty(self, specialty: str) -> Specialist | None:
        """The first active specialist (in file order) offering ``specialty``."""
        for s in self.specialists:
            if s.active and specialty in s.specialties:
                return s
        return None

    def select(self, identifier: str | None, specialty: str | None) -> Specialist | None:
        """Who a referral goes to: the named recipient if the directory knows them, else
        the first active specialist for its specialty."""
        if identifier:
            found = self.find(identifier)
            if found is not None:
                return found
        return self.for_specialty(specialty) if specialty else None

    def choose(
        self,
        identifier: str | None,
        specialty: str | None,
        *,
        plan: str | None = None,
        location: str | None = None,
        exclude: Collection[str] = (),
    ) -> Choice:
        """Who a referral goes to, by name, specialty, network and location (see the
        module docstring); ``exclude``: directory ids already tried."""
        note = ""
        if identifier:
            named = self.find(identifier)
            if named is not None:
                if named.id in exclude:
                    note = f"the named recipient {named.id} was already tried"
                elif not accepts(named, plan):
                    note = f"the named recipient {named.id} does not accept the referral's plan"
                else:
                    return Choice(named)
        if not specialty:
            return Choice(None, DECLINED_NO_ALTERNATIVE if exclude else NO_SPECIALIST, note)
        offering = [s for s in self.specialists if s.active and specialty in s.specialties]
        untried = [s for s in offering if s.id not in exclude]
        in_network = [s for s in untried if accepts(s, plan)]
        if not in_network:
            # After a decline, whoever is left being out of network is still "no
            # alternative": the coordinator's question is the same.
            if exclude:
                code = DECLINED_NO_ALTERNATIVE
            else:
                code = NO_IN_NETWORK if untried else NO_SPECIALIST
            return Choice(None, code, note)
        near = [s for s in in_network if serves(s, location)]
        chosen = (near or in_network)[0]
        if note:
            note += f": sent to {chosen.id}, the next in-network candidate"
        return Choice(chosen, "", note)

    def channels(self) -> frozenset[str]:
        return frozenset(t.channel for s in self.specialists if s.active for t in s.targets)

    def formats(self) -> frozenset[str]:
        return frozenset(t.format for s in self.specialists if s.active for t in s.targets)


@dataclass
class _Reading:
    """State shared by every file of one directory load."""

    known_formats: Collection[str] | None
    known_channels: Collection[str] | None
    entries: list[Specialist] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # id → where it was first defined
    errors: list[str] = field(default_factory=list)


def directory_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in (*YAML_SUFFIXES, ".csv")
    )


def read_directory(
    folder: Path,
    *,
    known_formats: Collection[str] | None = None,
    known_channels: Collection[str] | None = None,
    record: Record | None = None,
) -> tuple[Directory, list[str]]:
    """Every ``*.yaml`` and ``*.csv`` of ``folder`` (missing: an empty directory), and
    every error found. ``record`` sees each file's bytes (for the set's digest)."""
    reading = _Reading(known_formats, known_channels)
    for path in directory_files(folder):
        raw = path.read_bytes()
        if record is not None:
            record(path, raw)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            reading.errors.append(f"{path}:1:1: not UTF-8 text (byte {exc.start})")
            continue
        if path.suffix == ".csv":
            _Csv(str(path), reading).read(text)
        else:
            _read_yaml(text, str(path), reading)
    return Directory(tuple(reading.entries)), reading.errors


def load_directory(
    folder: Path,
    *,
    known_formats: Collection[str] | None = None,
    known_channels: Collection[str] | None = None,
) -> Directory:
    """:func:`read_directory`, raising :class:`OutboundError` on any error."""
    directory, errors = read_directory(
        folder, known_formats=known_formats, known_channels=known_channels
    )
    if errors:
        raise OutboundError(errors)
    return directory


# ---- YAML ----------------------------------------------------------------------------


def _read_yaml(text: str, file: str, reading: _Reading) -> None:
    try:
        doc = loads(text, file)
    except SourceError as exc:
        reading.errors.append(str(exc))
        return
    check = Checker(doc)
    if check.schema((DIRECTORY_SCHEMA,)) is not None:
        check.attempt(_yaml_entries, check, reading)
    reading.errors.extend(check.errors)


def _yaml_entries(check: Checker, reading: _Reading) -> None:
    data = check.mapping(check.doc.data, (), "the file")
    check.known_keys(data, (), ("schema", "specialists"))
    specialists = check.items(data.get("specialists", []), ("specialists",), "specialists")
    for i, entry in enumerate(specialists):
        specialist = check.attempt(_yaml_specialist, check, entry, ("specialists", i), reading)
        if specialist is None:
            continue
        at = check.where(("specialists", i, "id"))
        if specialist.id in reading.seen:
            check.report(
                ("specialists", i, "id"),
                f"specialist id {specialist.id!r} is also defined at {reading.seen[specialist.id]}",
            )
            continue
        reading.seen[specialist.id] = at
        reading.entries.append(specialist)


def _yaml_specialist(check: Checker, value: Any, at: KeyPath, reading: _Reading) -> Specialist:
    data = check.mapping(value, at, "a specialist")
    check.known_keys(data, at, SPECIALIST_KEYS)
    check.required(data, at, ("id", "name", "targets"), "a specialist")
    ident = check.text(data["id"], (*at, "id"), "id")
    if not ID.match(ident):
        check.fail((*at, "id"), "an id is letters, digits, '_', '.' and '-'")
    name = check.text(data["name"], (*at, "name"), "name")
    npi = ""
    if data.get("npi") is not None:
        npi = check.text(data["npi"], (*at, "npi"), "npi")
        if not npi_valid(npi):
            check.fail((*at, "npi"), _NPI_RULE)
    lists = {
        key: check.texts(data[key], (*at, key), key) if data.get(key) is not None else ()
        for key in ("provider_names", "specialties", "accepted_plans", "locations")
    }
    active = check.flag(data["active"], (*at, "active"), "active") if "active" in data else True
    receiver = (
        check.party(data["receiver"], (*at, "receiver"))
        if data.get("receiver") is not None
        else Party(application="", facility="")
    )
    items = check.items(data["targets"], (*at, "targets"), "targets")
    if not items:
        check.fail((*at, "targets"), "a specialist needs at least one target")
    targets: list[Target] = []
    for j, item in enumerate(items):
        where = (*at, "targets", j)
        target = check.mapping(item, where, "a target")
        check.known_keys(target, where, TARGET_KEYS)
        check.required(target, where, ("channel", "format"), "a target")
        channel = check.text(target["channel"], (*where, "channel"), "channel")
        fmt = check.text(target["format"], (*where, "format"), "format")
        check.name("format", fmt, (*where, "format"), reading.known_formats)
        if active:
            check.name("channel", channel, (*where, "channel"), reading.known_channels)
        targets.append(Target(channel, fmt, check.optional(target, "endpoint", where)))
    return Specialist(
        id=ident,
        name=name,
        targets=tuple(targets),
        npi=npi,
        provider_names=lists["provider_names"],
        specialties=lists["specialties"],
        accepted_plans=lists["accepted_plans"],
        locations=lists["locations"],
        receiver=receiver,
        active=active,
    )


_NPI_RULE = (
    "an NPI is 10 digits, the last the Luhn check digit of 80840 + the first nine (e.g. 1234567893)"
)


# ---- CSV ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    line: int  # the row that first named this id
    raw: dict[str, str]  # that row's cells, by column
    targets: list[tuple[int, Target]]  # (row, target)
    ok: bool = True


class _Csv:
    """One CSV file: a header row naming columns, then one target per row."""

    def __init__(self, file: str, reading: _Reading) -> None:
        self.file, self.reading = file, reading
        self.column: dict[str, int] = {}
        self.entries: dict[str, _Entry] = {}  # by id, in order of first appearance

    def error(self, row: int, column: int, message: str) -> None:
        self.reading.errors.append(f"{self.file}:{row}:{column}: {message}")

    def at(self, row: int, name: str, message: str) -> None:
        self.error(row, self.column[name], message)

    def read(self, text: str) -> None:
        rows = csv.reader(io.StringIO(text, newline=""))
        try:
            if not self.header(next(rows, [])):
                return
            for cells in rows:
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(self.column):
                    self.error(
                        rows.line_num,
                        min(len(cells), len(self.column)) + 1,
                        f"expected {len(self.column)} columns (as the header), found {len(cells)}",
                    )
                    continue
                self.row(
                    rows.line_num, {n: c.strip() for n, c in zip(self.column, cells, strict=True)}
                )
        except csv.Error as exc:
            self.error(rows.line_num, 1, f"CSV syntax: {exc}")
            return
        for entry in self.entries.values():
            specialist = self.specialist(entry)
            if specialist is not None:
                self.reading.entries.append(specialist)

    def header(self, cells: list[str]) -> bool:
        if not any(c.strip() for c in cells):
            self.error(1, 1, f"the first row names the columns: {', '.join(CSV_COLUMNS)}")
            return False
        ok = True
        for col, cell in enumerate(cells, 1):
            name = cell.strip()
            if name not in CSV_COLUMNS:
                self.error(
                    1,
                    col,
                    f"unknown column {name!r}{hint(name, CSV_COLUMNS)}; expected "
                    f"{', '.join(CSV_COLUMNS)}",
                )
                ok = False
            elif name in self.column:
                self.error(1, col, f"column {name!r} appears twice")
                ok = False
            else:
                self.column[name] = col
        missing = [c for c in CSV_REQUIRED if c not in self.column]
        if ok and missing:
            self.error(1, 1, f"the header needs the columns {', '.join(missing)}")
            ok = False
        return ok

    def row(self, line: int, raw: dict[str, str]) -> None:
        ident = raw["id"]
        if not ident or not ID.match(ident):
            self.at(line, "id", "an id is text: letters, digits, '_', '.' and '-'")
            return
        entry = self.entries.get(ident)
        if entry is None and ident in self.reading.seen:
            self.at(
                line, "id", f"specialist id {ident!r} is also defined at {self.reading.seen[ident]}"
            )
            return
        if entry is None:
            entry = _Entry(line, raw, [])
            self.entries[ident] = entry
            self.reading.seen[ident] = f"{self.file}:{line}:{self.column['id']}"
        else:
            for name, value in raw.items():
                if name not in CSV_TARGET_COLUMNS and value and value != entry.raw[name]:
                    self.at(
                        line,
                        name,
                        f"{name} differs from row {entry.line}: a row repeating an id only adds "
                        "a target (leave the other columns empty)",
                    )
                    entry.ok = False
        for name in ("channel", "format"):
            if not raw[name]:
                self.at(line, name, f"{name} must be text")
                entry.ok = False
        problem = unknown_name("format", raw["format"], self.reading.known_formats)
        if raw["format"] and problem:
            self.at(line, "format", problem)
            entry.ok = False
        entry.targets.append((line, Target(raw["channel"], raw["format"], raw.get("endpoint", ""))))

    def specialist(self, entry: _Entry) -> Specialist | None:
        raw, line = entry.raw, entry.line
        ok = entry.ok
        if not raw["name"]:
            self.at(line, "name", "name must be text")
            ok = False
        npi = raw.get("npi", "")
        if npi and not npi_valid(npi):
            self.at(line, "npi", _NPI_RULE)
            ok = False
        flag = raw.get("active", "").lower() or "true"
        if flag not in ("true", "false"):
            self.at(line, "active", "active must be true or false (empty: true)")
            ok = False
        active = flag != "false"
        if active:
            for row, target in entry.targets:
                problem = unknown_name("channel", target.channel, self.reading.known_channels)
                if target.channel and problem:
                    self.at(row, "channel", problem)
                    ok = False
        if not ok:
            return None

        def split(name: str) -> tuple[str, ...]:
            return tuple(p.strip() for p in raw.get(name, "").split(";") if p.strip())

        return Specialist(
            id=raw["id"],
            name=raw["name"],
            targets=tuple(t for _, t in entry.targets),
            npi=npi,
            specialties=split("specialties"),
            accepted_plans=split("accepted_plans"),
            locations=split("locations"),
            receiver=Party(
                application=raw.get("receiving_application", ""),
                facility=raw.get("receiving_facility", ""),
            ),
            active=active,
        )
