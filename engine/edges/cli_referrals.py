"""``refloop referrals list|show|rebuild``, the actions by hand on one referral, and
``refloop messages replay|parked``.

Actions by hand (``authorize``, ``deny-auth``, ``close``, ``cancel``) each append one
event with the actor (``--by``) through :func:`engine.services.policy_runtime.record`:
one transaction holding the event log's writer turn, with the referral policy's timers
and worklist items, and routed by the same routes the daemon loads
(:func:`engine.services.mappings.load_outbound_checked`) — so ``authorize`` releases the
packet a held referral waits for, in the same transaction, and ``cancel`` tells the
source. Whether the action fits the referral's state is decided first
(:func:`refusal`), so a mistaken action exits non-zero saying what to do instead rather
than leaving an anomaly on the timeline. The event id is a UUID 5 of the referral, the
action and the referral's sequence as read: a double-click (or a retry after a lost
answer) reads the same sequence and appends nothing twice, or finds the state already
moved and says so.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import Engine

from engine.config import Config
from engine.domain.referral import TERMINAL, Event, State
from engine.edges.cli_common import config_option, load, open_checked, parse_since
from engine.services.pipeline import Report

if TYPE_CHECKING:
    from engine.services.policy_runtime import NewEvent

_STATES = click.Choice([s.value for s in State])


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- referrals -----------------------------------------------------------------------


@click.group()
def referrals() -> None:
    """Referrals: the projection of the event log."""


@referrals.command("list")
@config_option
@click.option("--state", type=_STATES, default=None)
@click.option("--needs-review", is_flag=True, help="Only referrals linked with low confidence.")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def referrals_list(
    config_file: Path | None,
    state: str | None,
    needs_review: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """List referrals, most recently changed first."""
    from engine.store.referrals import list_referrals

    engine = open_checked(load(config_file))
    out = sys.stdout
    try:
        with engine.connect() as conn:
            if not as_json:
                out.write(
                    f"{'ID':36}  {'STATE':21}  {'PLACER ORDER':20}  {'SPECIALTY':16}  "
                    f"{'UPDATED (UTC)':19}  REVIEW\n"
                )
            for row in list_referrals(conn, state=state, needs_review=needs_review, limit=limit):
                if as_json:
                    out.write(json.dumps(_referral_json(row)) + "\n")
                    continue
                placer = row["placer_order_number"] or "-"
                out.write(
                    f"{row['id']:36}  {row['state']:21}  {placer[:20]:20}  "
                    f"{(row['specialty'] or '-')[:16]:16}  "
                    f"{row['updated_at']:%Y-%m-%d %H:%M:%S}  "
                    f"{'yes' if row['needs_review'] else '-'}\n"
                )
    finally:
        engine.dispose()


def _referral_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "state": row["state"],
        "placer_order_number": row["placer_order_number"],
        "placer_assigner": row["placer_assigner"],
        "referral_number": row["referral_number"],
        "specialty": row["specialty"],
        "priority": row["priority"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "events": row["last_sequence"],
        "needs_review": bool(row["needs_review"]),
    }


@referrals.command("show")
@click.argument("ref")
@config_option
@click.option("--json", "as_json", is_flag=True, help="An object with the state and events.")
def referrals_show(ref: str, config_file: Path | None, as_json: bool) -> None:
    """Show one referral (by id or placer order number) and its timeline."""
    from engine.store.referrals import find_referrals, keys_of, timeline

    engine = open_checked(load(config_file))
    try:
        with engine.connect() as conn:
            found = find_referrals(conn, ref)
            if len(found) > 1:
                ids = ", ".join(
                    f"{r['id']} ({r['placer_assigner'] or 'no assigner'})" for r in found
                )
                raise click.ClickException(
                    f"placer order number {ref} belongs to {len(found)} referrals: {ids}; "
                    "show one by its id"
                )
            if not found:
                raise click.ClickException(f"no referral with id or placer order number {ref}")
            referral = found[0]
            events = timeline(conn, referral["id"])
            keys = keys_of(conn, referral["id"])
    finally:
        engine.dispose()
    if as_json:
        data = _referral_json(referral)
        data.update(
            patient_key=referral["patient_key"],
            data=referral["data"],
            keys=keys,
            events=[_event_json(e) for e in events],
        )
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("\n".join(_timeline_text(referral, keys, events)))


def _event_json(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "sequence": e["sequence"],
        "id": e["id"],
        "type": e["type"],
        "occurred_at": _iso(e["occurred_at"]),
        "recorded_at": _iso(e["recorded_at"]),
        "message_id": e["message_id"],
        "message_type": e["message_type"],
        "control_id": e["control_id"],
        "mapping_id": e["mapping_id"],
        "mapping_digest": e["mapping_digest"],
        "rule_id": e["rule_id"],
        "correlation_method": e["correlation_method"],
        "confidence": e["confidence"],
        "state_before": e["state_before"],
        "state_after": e["state_after"],
        "anomaly": e["anomaly"],
        "fields": e["fields"],
    }


def _timeline_text(
    referral: dict[str, Any], keys: Sequence[dict[str, str]], events: Sequence[dict[str, Any]]
) -> list[str]:
    placer = referral["placer_order_number"] or "-"
    if referral["placer_assigner"]:
        placer += f" ({referral['placer_assigner']})"
    review = "   NEEDS REVIEW (linked with low confidence)" if referral["needs_review"] else ""
    lines = [
        f"referral {referral['id']}   {referral['state']}{review}",
        f"  placer order  {placer}   referral number {referral['referral_number'] or '-'}",
        f"  specialty     {referral['specialty'] or '-'}   priority {referral['priority'] or '-'}",
        f"  created       {_iso(referral['created_at'])}   updated {_iso(referral['updated_at'])}",
        "  keys          "
        + (
            ", ".join(
                f"{k['kind']} {k['value']}" + (f"^{k['assigner']}" if k["assigner"] else "")
                for k in keys
            )
            or "-"
        ),
        "events:",
    ]
    for e in events:
        lines.append(
            f"  #{e['sequence']:<3} {e['occurred_at']:%Y-%m-%d %H:%M}  {e['type']:23}  "
            f"{e['state_before'] or '-'} -> {e['state_after'] or '-'}"
        )
        fields = e.get("fields") or {}
        if e["message_id"] is None and "delivery.id" in fields:
            # An outcome the dispatcher recorded: which delivery, over what, and how.
            detail = fields.get("delivery.detail") or fields.get("delivery.error") or ""
            lines.append(
                f"        delivery {fields['delivery.id']} ({fields.get('delivery.kind', '-')} "
                f"{fields.get('delivery.format', '-')} via {fields.get('delivery.channel', '-')}"
                f"), route {fields.get('delivery.route', '-')}" + (f": {detail}" if detail else "")
            )
        else:
            source = f"message {e['message_id']}" if e["message_id"] is not None else "internal"
            if e["message_type"]:
                source += f" {e['message_type']}"
            if e["control_id"]:
                source += f" ({e['control_id']})"
            lines.append(
                f"        from {source}, rule {e['mapping_id'] or '-'}/{e['rule_id'] or '-'}, "
                f"linked by {e['correlation_method']} ({e['confidence']:.2f})"
            )
        if e["anomaly"]:
            lines.append(f"        ANOMALY: {e['anomaly']}")
    return lines


@referrals.command("rebuild")
@config_option
def referrals_rebuild(config_file: Path | None) -> None:
    """Rebuild every referral projection and the key index from the event log."""
    from engine.services.normaliser import Processor

    config = load(config_file)
    engine = open_checked(config)
    processor = Processor(engine, _no_mappings, {})
    try:
        done = processor.rebuild()
    finally:
        processor.close()
        engine.dispose()
    click.echo(
        f"rebuilt {done.referrals} referrals from {done.events} events "
        f"({done.keys} keys indexed); {done.changed} differed from the log and were corrected"
    )


def _no_mappings() -> Any:
    raise AssertionError("rebuilding folds the event log; it never normalises")


# -- actions by hand ---------------------------------------------------------------------

_ACTION_NAMESPACE = uuid.UUID("b2e6f0d4-8a1c-4f37-9e25-6c0d3a7b1f58")
#: Each action: the event it appends, and the states it may be taken from.
ACTIONS: dict[str, tuple[Event, frozenset[State]]] = {
    "authorize": (Event.AUTHORIZATION_APPROVED, frozenset({State.AUTH_PENDING})),
    "deny-auth": (Event.AUTHORIZATION_DENIED, frozenset({State.AUTH_PENDING, State.CREATED})),
    "close": (Event.REFERRAL_CLOSED_BY_HAND, frozenset(s for s in State if s not in TERMINAL)),
    "cancel": (
        Event.REFERRAL_CANCELLED,
        frozenset(s for s in State if s not in TERMINAL and s is not State.NOTE_RECEIVED),
    ),
}


def action_id(referral_id: str, action: str, sequence: int) -> str:
    return str(uuid.uuid5(_ACTION_NAMESPACE, f"{referral_id}/{action}/{sequence}"))


def refusal(action: str, state: State) -> str | None:
    """Why ``action`` does not fit a referral in ``state`` (None: it does)."""
    _, allowed = ACTIONS[action]
    if state in allowed:
        return None
    if state in TERMINAL:
        return f"the referral is already {state}: nothing to {action.replace('-', ' ')}"
    if action == "authorize":
        return (
            f"the referral is {state}, not auth_pending: it is not waiting for an "
            "authorization (nothing to release)"
        )
    if action == "deny-auth":
        return (
            f"the referral is {state}: its packet has gone, a denial no longer holds it; "
            "cancel it (refloop referrals cancel) if the payer will not cover it"
        )
    # cancel once the consult note is back: the loop is done, close it instead
    return f"the referral is {state}: the consult note is back; close it instead"


def hand_event(
    action: str,
    referral_id: str,
    sequence: int,
    actor: str,
    now: datetime,
    *,
    number: str | None = None,
    payer: str | None = None,
    reason: str | None = None,
) -> NewEvent:
    """The event an action appends (pure)."""
    from engine.services.policy_runtime import NewEvent

    kind, _ = ACTIONS[action]
    fields: dict[str, Any] = {"actor": actor}
    if action == "authorize":
        fields["authorization.status"] = "approved"
        if number:
            fields["authorization.identifier"] = {"value": number, "namespace": payer or ""}
        if payer:
            fields["authorization.payer"] = payer
    elif action == "deny-auth":
        fields["authorization.status"] = "denied"
    elif action == "cancel":
        fields["status"] = "cancelled"
    if reason:
        fields["status_reason"] = reason
    return NewEvent(
        id=action_id(referral_id, action, sequence),
        type=kind,
        fields=fields,
        occurred_at=now,
        rule_id=f"hand:{action}",
    )


@dataclass(frozen=True, slots=True)
class Acted:
    referral_id: str
    state_before: State
    state_after: State
    appended: bool  # False: the same action on the same sequence was already recorded
    deliveries: tuple[str, ...]  # route ids of the deliveries it queued


class ActionRefused(click.ClickException):
    """The action does not fit the referral (unknown, wrong state); exit 1."""


def act(
    engine: Engine,
    config: Config,
    ref: str,
    action: str,
    actor: str,
    now: datetime,
    **options: str | None,
) -> Acted:
    """Take ``action`` on the referral ``ref`` (id or placer order number)."""
    from engine.outbound.model import DeliveryRequest, Trigger
    from engine.services.mappings import load_outbound_checked, load_policy_checked, router_of
    from engine.services.policy_runtime import UnknownReferral, record
    from engine.store.eventlog import LogConnection
    from engine.store.referrals import find_referrals

    if not actor.strip():
        raise click.UsageError("say who you are: --by NAME")
    with engine.connect() as conn:
        found = find_referrals(conn, ref)
    if len(found) > 1:
        raise ActionRefused(
            f"placer order number {ref} belongs to {len(found)} referrals: name one by its id "
            "(see `refloop referrals list`)"
        )
    if not found:
        raise ActionRefused(
            f"no referral with id or placer order number {ref} (see `refloop referrals list`)"
        )
    row = found[0]
    state = State(row["state"])
    why = refusal(action, state)
    if why is not None:
        raise ActionRefused(f"cannot {action} referral {row['id']}: {why}")
    route, policy = _routing(config, load_outbound_checked, load_policy_checked, router_of)
    queued: list[DeliveryRequest] = []

    def counted(trigger: Trigger) -> tuple[Sequence[DeliveryRequest], Sequence[str]]:
        assert route is not None
        deliveries, reasons = route(trigger)
        queued.extend(deliveries)
        return deliveries, reasons

    event = hand_event(action, row["id"], int(row["last_sequence"]), actor.strip(), now, **options)
    log = LogConnection(engine)
    try:
        rows = record(
            log,
            row["id"],
            [event],
            now,
            policy=policy,
            route=counted if route is not None else None,
        )
    except UnknownReferral as exc:
        raise ActionRefused(str(exc)) from None
    finally:
        log.close()
    after = rows[-1].state_after if rows else None
    return Acted(
        row["id"],
        state,
        after or state,
        bool(rows),
        tuple(d.route_id for d in queued),
    )


def _routing(config: Config, load_outbound: Any, load_policy: Any, router_of: Any) -> Any:
    """The daemon's router and policy for this config; a set with errors is refused."""
    from engine.outbound.routing import OutboundError
    from engine.policy.language import PolicyError

    channels = list(config.channels)
    try:
        outbound = load_outbound(config.outbound_dir(), channels)
        policy = load_policy(config.mappings_dir(), outbound, enabled=config.policy.enabled)
    except (OutboundError, PolicyError) as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors)
        raise click.ClickException(
            f"the outbound routes or the referral policy did not load, fix them first:\n{lines}"
        ) from None
    return router_of(outbound, channels), policy


def _action_command(action: str, summary: str) -> Any:
    def command(
        ref: str,
        config_file: Path | None,
        actor: str,
        reason: str | None = None,
        number: str | None = None,
        payer: str | None = None,
    ) -> None:
        options: dict[str, str | None] = (
            {"number": number, "payer": payer} if action == "authorize" else {"reason": reason}
        )
        config = load(config_file)
        engine = open_checked(config)
        try:
            done = act(engine, config, ref, action, actor, datetime.now(UTC), **options)
        finally:
            engine.dispose()
        if not done.appended:
            click.echo(f"referral {done.referral_id}: already recorded, nothing appended")
            return
        line = f"referral {done.referral_id}: {done.state_before} -> {done.state_after}"
        if done.deliveries:
            line += f"; queued {len(done.deliveries)} delivery(ies): {', '.join(done.deliveries)}"
        click.echo(line)

    command.__doc__ = summary
    cmd: Any = command
    if action == "authorize":
        cmd = click.option("--payer", default=None, help="The payer that authorized it.")(cmd)
        cmd = click.option("--number", default=None, help="The authorization number.")(cmd)
    else:
        cmd = click.option("--reason", default=None, help="Why (kept on the timeline).")(cmd)
    cmd = click.option(
        "--by", "actor", required=True, help="Who is acting (recorded on the timeline)."
    )(cmd)
    cmd = config_option(cmd)
    cmd = click.argument("ref")(cmd)
    return referrals.command(action)(cmd)


_action_command(
    "authorize",
    "Record the payer's approval of a held referral (auth_pending): its packet goes out.",
)
_action_command("deny-auth", "Record the payer's denial: the referral stays held, on the worklist.")
_action_command("close", "Close an open referral by hand (referral.closed_by_hand).")
_action_command("cancel", "Cancel an open referral by hand; the source is told.")


# -- messages replay / parked ----------------------------------------------------------


@click.command("replay")
@click.argument("message_ids", nargs=-1, type=int)
@config_option
@click.option("--status", default=None, help="Every message with this status (mapping_error …).")
@click.option("--since", default=None, help="Messages received since: ISO time or a span (2h).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
def replay(
    message_ids: tuple[int, ...],
    config_file: Path | None,
    status: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Normalise stored messages again with the current mappings (idempotent: events
    already in the log are not appended twice)."""
    from engine.services.normaliser import REPLAYABLE

    if not (message_ids or status or since):
        raise click.UsageError("name message ids, --status or --since")
    if status is not None and status not in REPLAYABLE:
        raise click.BadParameter(
            f"{status!r}: replay takes {', '.join(sorted(REPLAYABLE))}", param_hint="--status"
        )
    config = load(config_file)
    mapping_set = _mapping_set(config)
    engine = open_checked(config)
    try:
        reports, types = _replay(
            config,
            engine,
            mapping_set,
            message_ids,
            status,
            parse_since(since) if since else None,
        )
    finally:
        engine.dispose()
    if not reports:
        click.echo("no messages to replay", err=True)
    for r in reports:
        if as_json:
            click.echo(json.dumps(_report_json(r)))
        else:
            click.echo(_report_text(r, types.get(r.message_id)))


def _mapping_set(config: Config) -> Any:
    """The mapping set and the router replay uses (the daemon's, loaded the same way)."""
    from engine.mapping.mapset import MappingSetError
    from engine.outbound.routing import OutboundError
    from engine.services.mappings import (
        OverlayError,
        load_checked,
        load_outbound_checked,
        router_of,
    )

    root = config.mappings_dir()
    try:
        mapping_set = load_checked(root, config.overlays())
        outbound = load_outbound_checked(config.outbound_dir(), config.channels.keys())
        return mapping_set, router_of(outbound, config.channels.keys())
    except OutboundError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        raise click.ClickException(
            f"the outbound set in {root} did not load ({len(exc.errors)} errors); nothing replayed"
        ) from None
    except MappingSetError as exc:
        for err in exc.errors:
            click.echo(str(err), err=True)
        raise click.ClickException(
            f"the mapping set in {root} did not load ({len(exc.errors)} errors); nothing replayed"
        ) from None
    except OverlayError as exc:
        raise click.ClickException(f"{config.source}: {exc}") from None


def _replay(
    config: Config,
    engine: Engine,
    mapping_set: Any,
    ids: Sequence[int],
    status: str | None,
    since: datetime | None,
) -> tuple[list[Report], dict[int, str | None]]:
    from engine.services.normaliser import REPLAYABLE, Processor, sources_from
    from engine.store.referrals import select_for_replay

    with engine.connect() as conn:
        chosen = select_for_replay(
            conn, ids=ids, status=status, since=since, statuses=sorted(REPLAYABLE)
        )
    missing = sorted(set(ids) - {i for i, _ in chosen})
    if missing:
        raise click.ClickException(f"no message with id {', '.join(map(str, missing))}")
    reports = [Report(i, s) for i, s in chosen if s not in REPLAYABLE]  # never normalised
    wanted = [i for i, s in chosen if s in REPLAYABLE]
    loaded, route = mapping_set
    processor = Processor(
        engine,
        lambda: loaded,
        sources_from(config.mllp.listeners, config.fhir.sources),
        router=lambda: route,
    )
    types: dict[int, str | None] = {}
    batch = config.normalizer.batch_size
    try:
        while wanted:
            stored = processor.eventlog.messages(wanted[:batch])
            processor.eventlog.end()
            types.update((m.id, m.message_type) for m in stored)
            done = processor.process(stored, statuses=REPLAYABLE, wait=True)
            if not done:
                break
            reports += done
            finished = {r.message_id for r in done}
            wanted = [i for i in wanted if i not in finished]
    finally:
        processor.close()
    reports.sort(key=lambda r: r.message_id)
    return reports, types


def _report_json(r: Report) -> dict[str, Any]:
    return {
        "id": r.message_id,
        "status": r.status,
        "new_events": list(r.new_events),
        "known_events": r.known_events,
        "referrals": list(r.referrals),
        "created": list(r.created),
        "anomalies": list(r.anomalies),
        "unparked": list(r.unparked),
        "mapping_id": r.mapping_id or None,
        "diagnostics": [d.as_dict() for d in r.diagnostics],
    }


def _report_text(r: Report, message_type: str | None) -> str:
    head = f"message {r.message_id}" + (f" ({message_type})" if message_type else "")
    if r.status not in ("processed", "ignored", "mapping_error", "parked", "received"):
        return f"{head}: skipped: status {r.status} is never normalised"
    parts: list[str] = []
    if r.new_events:
        parts.append(f"{len(r.new_events)} new event(s): {', '.join(r.new_events)}")
    if r.known_events:
        parts.append(f"{r.known_events} already in the log")
    if r.created:
        parts.append(f"created referral {', '.join(r.created)}")
    elif r.referrals:
        parts.append(f"referral {', '.join(r.referrals)}")
    if r.unparked:
        parts.append(f"released parked message(s) {', '.join(map(str, r.unparked))}")
    parts += [f"anomaly: {a}" for a in r.anomalies]
    if r.status == "received":
        parts.append("re-queued: a referral it waits for has just appeared")
    parts += [
        f"{d.code}: {d.message}"
        for d in r.diagnostics
        if d.severity != "info" or r.status != "processed"
    ]
    if r.status == "processed" and not r.new_events and not r.known_events:
        parts.append("no events")
    return f"{head}: {r.status}" + (" - " + "; ".join(parts) if parts else "")


@click.command("parked")
@config_option
@click.option(
    "--status",
    type=click.Choice(["parked", "unmatched"]),
    default=None,
    help="Only parked (still retried) or unmatched (past the TTL: exceptions).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def parked(config_file: Path | None, status: str | None, as_json: bool) -> None:
    """Messages waiting for a referral (parked) and exceptions (unmatched)."""
    from engine.store.referrals import parked_messages

    engine = open_checked(load(config_file))
    try:
        with engine.connect() as conn:
            rows = parked_messages(conn, [status] if status else ["parked", "unmatched"])
    finally:
        engine.dispose()
    out = sys.stdout
    if not as_json:
        out.write(
            f"{'ID':>8}  {'STATUS':9}  {'TYPE':12}  {'PARKED SINCE (UTC)':19}  "
            f"{'TRIES':>5}  WAITS FOR\n"
        )
    for row in rows:
        if as_json:
            out.write(
                json.dumps(
                    {
                        "id": row["id"],
                        "status": row["status"],
                        "message_type": row["message_type"],
                        "control_id": row["control_id"],
                        "listener": row["listener"],
                        "received_at": _iso(row["received_at"]),
                        "parked_at": _iso(row["parked_at"]),
                        "attempts": row["attempts"],
                        "waits_for": row["waits_for"],
                        "diagnostics": row["diagnostics"],
                    }
                )
                + "\n"
            )
            continue
        since_text = f"{row['parked_at']:%Y-%m-%d %H:%M:%S}" if row["parked_at"] else "-"
        out.write(
            f"{row['id']:>8}  {row['status']:9}  {(row['message_type'] or '-')[:12]:12}  "
            f"{since_text:19}  {row['attempts']:>5}  "
            f"{', '.join(row['waits_for']) or '(no keys: patient + specialty only)'}\n"
        )
