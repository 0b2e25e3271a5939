"""``refloop worklist``: the exceptions that need a person, and the four actions on them.

Listing reads :mod:`engine.store.worklist` against the wall clock (a snoozed item is back
once its time has passed). An action — acknowledge, assign, snooze, resolve — is one
transaction holding the event log's writer turn (:func:`perform`): the item's update and
its history row and, when the item is about a referral, the ``worklist.*`` event on that
referral's timeline with who did it, passed through the referral policy like every other
event. Either all of it is written or none of it. Output shows ids, reason codes and the
item's ``detail`` (safe text by construction), never patient data.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from engine.config import Config
from engine.edges.cli_common import config_option, load, open_checked
from engine.store.eventlog import EventRow, LogConnection
from engine.store.worklist import (
    EVENT_TYPES,
    VIEWS,
    Action,
    Item,
    UnknownItem,
    WorklistError,
    WorklistQueries,
    decide,
    event_fields,
    event_id,
)

if TYPE_CHECKING:
    from engine.policy.language import Policy


@dataclass(frozen=True, slots=True)
class Done:
    """What one action wrote."""

    item: Item  # after the action
    action: Action
    events: tuple[EventRow, ...]  # on the referral's timeline (none without a referral)


def perform(
    log: LogConnection,
    policy: Policy,
    item_id: int,
    action: str,
    actor: str,
    now: datetime,
    *,
    to: str | None = None,
    until: datetime | None = None,
    note: str | None = None,
) -> Done:
    """Take ``action`` (:data:`engine.store.worklist.ACTIONS`) on item ``item_id`` in one
    transaction: the item, its history row and (for a referral's item) the timeline event.
    Raises :class:`UnknownItem` or :class:`RefusedAction` with nothing written."""
    from engine.services.policy_runtime import NewEvent, append, with_policy

    el = log.eventlog
    el.begin(wait=True)
    try:
        item = el.worklist.get(item_id, lock=True)
        if item is None:
            raise UnknownItem(item_id)
        step = decide(item, action, actor, now, to=to, until=until, note=note)
        cur = el.conn.cursor()
        try:
            after, row = el.worklist.apply(cur, item, step)
        finally:
            cur.close()
        events: tuple[EventRow, ...] = ()
        found = el.referrals([item.referral_id]) if item.referral_id else []
        if found:
            event = NewEvent(
                id=event_id(item.id, action, row.id),
                type=EVENT_TYPES[action],
                fields=event_fields(item, step),
                occurred_at=now,
            )
            changes, _ = append(el, found[0], [event], now)
            changes = with_policy(el, policy, changes, now)
            el.write(changes, now)
            events = tuple(changes.events)
        el.commit()
    except BaseException:
        el.end()
        raise
    return Done(after, row, events)


def policy_of(config: Config) -> Policy:
    """The configured policy set; no mappings folder at all is the empty policy."""
    from engine.policy.language import Policy, PolicyError, load_policy

    root = config.mappings_dir()
    if not root.is_dir():
        return Policy(digest="")
    try:
        return load_policy(root)
    except PolicyError as exc:
        raise click.ClickException(
            "the referral policy did not load, fix it first:\n"
            + "\n".join(f"  {e}" for e in exc.errors)
        ) from None


def parse_until(value: str, now: datetime) -> datetime:
    """``2026-12-03T09:00`` (UTC unless an offset is given), or a span from now: ``4h``,
    ``2d``, ``1d12h``, ``30m``."""
    from engine.policy.language import parse_duration

    text = value.strip()
    if text.endswith("m") and text[:-1].isdigit():
        return now + timedelta(minutes=int(text[:-1]))
    span = parse_duration(text)
    if span is not None:
        return now + span
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use an ISO time like 2026-12-03T09:00 (UTC unless an offset is "
            "given) or a span from now like 30m, 4h, 2d, 1d12h",
            param_hint="'--until'",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _config_file(given: Path | None) -> Path | None:
    """A subcommand's --config, else the one given before it (``worklist --config F ack``)."""
    if given is not None:
        return given
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(dict) if ctx is not None else None
    value = found.get("config_file") if found is not None else None
    return value if isinstance(value, Path) else None


@contextlib.contextmanager
def _engine(config_file: Path | None) -> Iterator[tuple[Config, Engine]]:
    config = load(_config_file(config_file))
    engine = open_checked(config)
    try:
        yield config, engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def _queries(config_file: Path | None) -> Iterator[WorklistQueries]:
    with _engine(config_file) as (_, engine):
        raw = engine.raw_connection()
        try:
            yield WorklistQueries(raw.driver_connection, engine.dialect.name)
        finally:
            with contextlib.suppress(Exception):
                raw.rollback()
                raw.close()


def _age(span: timedelta) -> str:
    seconds = max(0, int(span.total_seconds()))
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _status(item: Item, now: datetime) -> str:
    if item.awake(now):
        return "snooze over"
    return item.status


def _who(item: Item) -> str:
    return f"{item.owner}/{item.assignee}" if item.assignee else item.owner


_HEADER = (
    f"{'ID':>6}  {'REASON':28}  {'REFERRAL':8}  {'OWNER/ASSIGNEE':20}  "
    f"{'DUE (UTC)':24}  {'AGE':>4}  {'STATUS':12}  DETAIL"
)


def _line(item: Item, now: datetime) -> str:
    due = _when(item.due_at) + (" overdue" if item.overdue(now) else "")
    referral = item.referral_id[:8] if item.referral_id else "-"
    return (
        f"{item.id:>6}  {item.reason[:28]:28}  {referral:8}  {_who(item)[:20]:20}  "
        f"{due:24}  {_age(now - item.created_at):>4}  {_status(item, now):12}  "
        f"{item.detail[:60]}"
    ).rstrip()


@click.group("worklist", invoke_without_command=True)
@config_option
@click.option(
    "--status",
    "view",
    type=click.Choice(VIEWS),
    default="open",
    show_default=True,
    help="open: what needs a person now (open, acknowledged, snoozed whose time has come).",
)
@click.option("--reason", default=None, help="A reason code, e.g. not_scheduled_in_14d.")
@click.option("--owner", default=None, help="Items owned by or assigned to this name.")
@click.option("--referral", default=None, help="A referral id (or its first characters).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def worklist(
    ctx: click.Context,
    config_file: Path | None,
    view: str,
    reason: str | None,
    owner: str | None,
    referral: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The exception worklist: what needs a person, due first (overdue at the top).

    Without a subcommand, lists items; `show`, `ack`, `assign`, `snooze` and `resolve`
    work one item."""
    ctx.ensure_object(dict)["config_file"] = config_file
    if ctx.invoked_subcommand is not None:
        return
    now = datetime.now(UTC)
    with _queries(config_file) as queries:
        items = queries.search(
            now, view=view, reason=reason, owner=owner, referral=referral, limit=limit
        )
    if as_json:
        for item in items:
            click.echo(json.dumps(item.summary(now)))
        return
    if not items:
        click.echo(f"no {'items needing attention' if view == 'open' else view + ' items'}")
        return
    click.echo(_HEADER)
    for item in items:
        click.echo(_line(item, now))


@worklist.command("show")
@config_option
@click.argument("item_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The item with its history.")
def show(config_file: Path | None, item_id: int, as_json: bool) -> None:
    """One item and its history (who did what, when)."""
    now = datetime.now(UTC)
    with _queries(config_file) as queries:
        item = queries.get(item_id)
        history = queries.history(item_id) if item else []
    if item is None:
        raise click.ClickException(str(UnknownItem(item_id)))
    data = item.summary(now)
    if as_json:
        click.echo(json.dumps({**data, "history": [a.summary() for a in history]}, indent=2))
        return
    click.echo(f"worklist item {item.id}: {item.reason} ({_status(item, now)})")
    for key in (
        "referral_id",
        "message_id",
        "detail",
        "owner",
        "assignee",
        "due_at",
        "snoozed_until",
        "state",
        "created_at",
        "updated_at",
        "resolved_at",
        "resolved_by",
    ):
        value = data[key]
        if value is not None:
            tail = " (overdue)" if key == "due_at" and data["overdue"] else ""
            click.echo(f"  {key + ':':15} {value}{tail}")
    click.echo("history:" if history else "history: none yet")
    for a in history:
        note = f"  {a.note}" if a.note else ""
        click.echo(f"  {a.at.isoformat(timespec='seconds')}  {a.action:12} by {a.actor}{note}")


def _by_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--by",
        "actor",
        default=lambda: os.environ.get("USER", ""),
        show_default="$USER",
        help="Who is acting (recorded on the item and the referral's timeline).",
    )(fn)


def _act(
    config_file: Path | None,
    item_id: int,
    action: str,
    actor: str,
    *,
    to: str | None = None,
    until: str | None = None,
    note: str | None = None,
) -> None:
    if not actor.strip():
        raise click.UsageError("say who you are: --by NAME (or set $USER)")
    now = datetime.now(UTC)
    moment = parse_until(until, now) if until is not None else None
    with _engine(config_file) as (config, engine):
        policy = policy_of(config)
        log = LogConnection(engine)
        try:
            done = perform(log, policy, item_id, action, actor, now, to=to, until=moment, note=note)
        except WorklistError as exc:
            raise click.ClickException(str(exc)) from None
        except SQLAlchemyError as exc:
            raise click.ClickException(
                f"the database refused the action ({exc.__class__.__name__}); nothing was "
                "written, try again"
            ) from None
        finally:
            log.close()
    item = done.item
    what = {
        "acknowledged": "acknowledged",
        "assigned": f"assigned to {item.assignee}",
        "snoozed": f"snoozed until {_when(item.snoozed_until)} UTC",
        "resolved": "resolved",
    }[action]
    on = ""
    if done.events:
        on = f" (on referral {item.referral_id} as {done.events[0].type.value})"
    click.echo(f"item {item.id}: {what} by {done.action.actor}{on}")


@worklist.command("ack")
@config_option
@click.argument("item_id", type=int)
@_by_option
@click.option("--note", default=None)
def ack(config_file: Path | None, item_id: int, actor: str, note: str | None) -> None:
    """Acknowledge an item: someone has seen it (wakes a snoozed one)."""
    _act(config_file, item_id, "acknowledged", actor, note=note)


@worklist.command("assign")
@config_option
@click.argument("item_id", type=int)
@click.argument("to")
@_by_option
@click.option("--note", default=None)
def assign(config_file: Path | None, item_id: int, to: str, actor: str, note: str | None) -> None:
    """Assign an item to TO (a user name or a team)."""
    _act(config_file, item_id, "assigned", actor, to=to, note=note)


@worklist.command("snooze")
@config_option
@click.argument("item_id", type=int)
@click.option(
    "--until",
    required=True,
    help="An ISO time (UTC unless an offset is given) or a span from now: 4h, 2d, 1d12h.",
)
@_by_option
@click.option("--note", default=None)
def snooze(
    config_file: Path | None, item_id: int, until: str, actor: str, note: str | None
) -> None:
    """Hide an item until a time; it is back on the list once that time has passed."""
    _act(config_file, item_id, "snoozed", actor, until=until, note=note)


@worklist.command("resolve")
@config_option
@click.argument("item_id", type=int)
@_by_option
@click.option("--note", default=None, help="What was done (kept in the history).")
def resolve(config_file: Path | None, item_id: int, actor: str, note: str | None) -> None:
    """Resolve an item: the exception is dealt with."""
    _act(config_file, item_id, "resolved", actor, note=note)
