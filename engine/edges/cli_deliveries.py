"""``refloop deliveries list|show|retry|cancel`` (the outbox) and ``refloop listen`` (a
throwaway MLLP sink for trying the outbound side)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import click

from engine.edges.cli_common import config_option, load, open_checked
from engine.store.outbox import Delivery, Outbox
from engine.store.schema import DELIVERY_STATUSES


@contextlib.contextmanager
def _outbox(config_file: Path | None) -> Iterator[Outbox]:
    """The outbox of the configured database, on one connection for the command."""
    config = load(config_file)
    engine = open_checked(config)
    raw = engine.raw_connection()
    try:
        yield Outbox(raw.driver_connection, engine.dialect.name)
    finally:
        with contextlib.suppress(Exception):
            raw.close()
        engine.dispose()


def _line(d: Delivery) -> str:
    when = d.finished_at or d.next_attempt_at
    tail = d.last_error or (d.receipt or {}).get("detail") or ""
    return (
        f"{d.id:>7}  {d.status:<9} {d.channel:<16} {d.kind:<9} {d.format:<20} "
        f"try {d.attempts:<3} {when.isoformat(timespec='seconds')}  {d.referral_id[:8]}  {tail}"
    ).rstrip()


@click.group("deliveries")
def deliveries() -> None:
    """The outbox: packets and write-backs on their way out, retries, dead letters."""


@deliveries.command("list")
@config_option
@click.option("--status", type=click.Choice(DELIVERY_STATUSES), default=None)
@click.option("--channel", default=None)
@click.option("--referral", "referral_id", default=None, help="A referral id.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_deliveries(
    config_file: Path | None,
    status: str | None,
    channel: str | None,
    referral_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Deliveries, newest first (never their payload: it holds PHI)."""
    with _outbox(config_file) as outbox:
        rows = outbox.search(status=status, channel=channel, referral_id=referral_id, limit=limit)
    for d in rows:
        click.echo(json.dumps(d.summary()) if as_json else _line(d))
    if not rows and not as_json:
        click.echo("no deliveries", err=True)


@deliveries.command("show")
@config_option
@click.argument("delivery_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def show_delivery(config_file: Path | None, delivery_id: int, as_json: bool) -> None:
    """One delivery: its status, attempts, receipt or last error."""
    with _outbox(config_file) as outbox:
        rows = outbox.get([delivery_id])
    if not rows:
        raise click.ClickException(f"no delivery with id {delivery_id}")
    summary = rows[0].summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if value is not None:
            click.echo(f"{key + ':':<17} {value}")


@deliveries.command("retry")
@config_option
@click.argument("delivery_ids", nargs=-1, type=int)
@click.option("--dead", "all_dead", is_flag=True, help="Every dead-lettered delivery.")
def retry(config_file: Path | None, delivery_ids: Sequence[int], all_dead: bool) -> None:
    """Send dead-lettered (or cancelled, or waiting) deliveries again now, with a fresh
    retry budget. The same payload and idempotency key go out: a peer that already has
    it drops the repeat."""
    if bool(delivery_ids) == all_dead:
        raise click.UsageError("name delivery ids or --dead (not both)")
    with _outbox(config_file) as outbox:
        done = outbox.retry(None if all_dead else list(delivery_ids), datetime.now(UTC))
    missing = sorted(set(delivery_ids) - set(done))
    for i in done:
        click.echo(f"{i}: pending (due now)")
    if missing:
        raise click.ClickException(
            f"not retried (unknown, in flight or already delivered): {', '.join(map(str, missing))}"
        )
    if all_dead and not done:
        click.echo("no dead deliveries")


@deliveries.command("cancel")
@config_option
@click.argument("delivery_id", type=int)
def cancel(config_file: Path | None, delivery_id: int) -> None:
    """Stop a pending or dead delivery from going out (kept, marked cancelled)."""
    with _outbox(config_file) as outbox:
        ok = outbox.cancel(delivery_id, datetime.now(UTC))
        rows = [] if ok else outbox.get([delivery_id])
    if not ok:
        if not rows:
            raise click.ClickException(f"no delivery with id {delivery_id}")
        raise click.ClickException(
            f"delivery {delivery_id} is {rows[0].status}: only pending or dead deliveries "
            "can be cancelled"
        )
    click.echo(f"{delivery_id}: cancelled")


# -- listen ------------------------------------------------------------------------------


@click.command("listen")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=12576, show_default=True)
@click.option("--code", type=click.Choice(["AA", "AE", "AR"]), default="AA", show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N messages.")
def listen(host: str, port: int, code: str, count: int | None) -> None:
    """A throwaway MLLP sink: print every message that arrives and answer it.

    For trying refloop's outbound side (a pretend specialist or EHR). It stores
    nothing; it prints what it receives to the terminal — synthetic data only."""
    from engine.protocol.ack import build_ack, next_control_id
    from engine.protocol.hl7v2 import HeaderError, parse_header
    from engine.protocol.mllp import Frame, FrameDecoder, encode

    seen = 0
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for item in decoder.feed(data):
                    if not isinstance(item, Frame):
                        continue
                    text = item.payload.decode("utf-8", errors="replace")
                    click.echo(text.replace("\r", "\n").rstrip("\n") + "\n")
                    try:
                        header = parse_header(item.payload)
                    except HeaderError:
                        header = None
                    ack = build_ack(
                        header, code, control_id=next_control_id(), now=datetime.now(UTC)
                    )
                    writer.write(encode(ack))
                    await writer.drain()
                    seen += 1
                    if count is not None and seen >= count:
                        done.set()
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, host, port)
        bound = server.sockets[0].getsockname()[1]
        click.echo(f"listening on {host}:{bound} (answering {code}); Ctrl-C stops", err=True)
        async with server:
            await done.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
