"""The ``refloop`` command line."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from engine import __version__
from engine.config import Config, ConfigError, config_path
from engine.edges.cli_common import (
    PORT,
    config_option,
    load,
    open_checked,
    open_database,
    parse_since,
    setup_logging,
)
from engine.edges.cli_deliveries import deliveries, listen
from engine.edges.cli_mappings import mappings
from engine.edges.cli_referrals import parked, referrals, replay
from engine.edges.cli_simulate import simulate
from engine.edges.cli_worklist import worklist
from engine.protocol.hl7v2 import split_segments


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refloop")
def main() -> None:
    """refloop: an HL7 v2 / FHIR R4 interface engine for closed-loop referrals."""


# -- run ---------------------------------------------------------------------------


@main.command()
@config_option
@click.option("--mllp-port", type=PORT, default=None, help="Override the first listener's port.")
@click.option("--http-port", type=PORT, default=None, help="Override [http] port.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def run(
    config_file: Path | None, mllp_port: int | None, http_port: int | None, log_level: str | None
) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it gracefully)."""
    from engine.edges.daemon import Daemon, StartupError, with_overrides
    from engine.store.database import SchemaError

    config = with_overrides(load(config_file), mllp_port=mllp_port, http_port=http_port)
    problems = config.file_problems()
    if problems:
        raise click.ClickException("\n".join(problems))
    setup_logging(config, level=log_level)
    try:
        asyncio.run(Daemon(config).run())
    except (StartupError, SchemaError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc.strerror or exc}") from None


# -- db ----------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config_file: Path | None) -> None:
    """Migrate the database to the schema this refloop needs."""
    from engine.store.database import describe_failure, upgrade

    config = load(config_file)
    engine, url = open_database(config)
    try:
        before, after = upgrade(engine)
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(
            f"upgrade failed: {describe_failure(url, exc)}; check [database] url or "
            "REFLOOP_DATABASE_URL"
        ) from None
    finally:
        engine.dispose()
    if before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"database upgraded: {before or 'empty'} -> {after}")


@db.command("current")
@config_option
def db_current(config_file: Path | None) -> None:
    """Print the schema revision of the database and the one this refloop needs."""
    from engine.store.database import current_revision, describe_failure, head_revision

    config = load(config_file)
    engine, url = open_database(config)
    try:
        current = current_revision(engine)
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(describe_failure(url, exc)) from None
    finally:
        engine.dispose()
    click.echo(f"current: {current or 'none'}\nneeded:  {head_revision()}")


# -- config ------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@config_option
def config_check(file: Path | None, config_file: Path | None) -> None:
    """Validate a config file (FILE, else --config, else REFLOOP_CONFIG, else ./engine.toml)."""
    from engine.edges.mllp_listener import tls_context

    path = config_path(file or config_file)
    config = load(path)
    problems = config.file_problems() + config.port_problems()
    if not problems:
        # Load every TLS context now, so a wrong PEM file or passphrase shows here
        # and not at 3 a.m. when the daemon restarts.
        for i, listener in enumerate(config.mllp.listeners):
            try:
                tls_context(listener, config.source.parent)
            except ConfigError as exc:
                problems.append(f"{path}: mllp.listeners[{i}].tls: {exc}")
        problems += _check_channels(config)
    digest = None
    if config.normalizer.enabled:
        # The daemon refuses to start on a mapping set that does not load: say so now.
        digest, more = _check_mappings(config)
        problems += more
    if problems:
        raise click.ClickException("\n".join(problems))
    names = ", ".join(f"{x.name}:{x.port}" for x in config.mllp.listeners) or "none"
    sets = f"; mappings: {digest}" if digest else ""
    click.echo(
        f"{path}: ok (listeners: {names}; http: {config.http.host}:{config.http.port}{sets})"
    )


def _check_channels(config: Config) -> list[str]:
    """Build every channel as the daemon would, so files a channel loads at start (an
    MLLP channel's TLS certificates, a CA file) fail here rather than at 3 a.m."""
    import asyncio

    from channels.base import ChannelConfigError, ChannelContext
    from channels.registry import plugin

    problems = []
    context = ChannelContext(base_dir=config.source.parent)
    for name, settings in config.channels.items():
        try:
            channel = plugin(settings.type)(name, settings, context)
        except ChannelConfigError as exc:
            problems += [f"{config.source}: channels.{name}.{p}" for p in exc.problems]
            continue
        asyncio.run(channel.aclose())
    return problems


def _check_mappings(config: Config) -> tuple[str | None, list[str]]:
    from engine.mapping.mapset import MappingSetError
    from engine.outbound.packets.outreach import TemplateError
    from engine.outbound.routing import OutboundError
    from engine.policy.authorization import AuthorizationError, load_authorization
    from engine.policy.language import PolicyError
    from engine.services.mappings import (
        OverlayError,
        load_checked,
        load_outbound_checked,
        load_policy_checked,
    )
    from engine.services.outreach_runtime import planner_for

    root = config.mappings_dir()
    try:
        digest = load_checked(root, config.overlays()).digest
        outbound = load_outbound_checked(config.outbound_dir(), config.channels.keys())
        policy = load_policy_checked(root, outbound, enabled=config.policy.enabled)
        if config.policy.enabled:
            load_authorization(root)
            planner_for(config, policy)
        return digest, []
    except TemplateError as exc:
        return None, [f"{config.source}: outreach templates:"] + [f"  {e}" for e in exc.errors]
    except (PolicyError, AuthorizationError) as exc:
        return None, [
            f"{config.source}: mappings.dir: {root}: the referral policy did not load:"
        ] + [f"  {e}" for e in exc.errors]
    except OutboundError as exc:
        return None, [f"{config.source}: mappings.dir: {root}: the outbound set did not load:"] + [
            f"  {e}" for e in exc.errors
        ]
    except MappingSetError as exc:
        return None, [f"{config.source}: mappings.dir: {root} did not load:"] + [
            f"  {e}" for e in exc.errors
        ]
    except OverlayError as exc:
        return None, [f"{config.source}: {line}" for line in str(exc).splitlines()]


# -- messages ------------------------------------------------------------------------


@main.group()
def messages() -> None:
    """Browse stored inbound messages."""


#: Every status a stored message can have (ingest's, then the normaliser's).
STATUSES = (
    "received",
    "duplicate",
    "rejected",
    "error",
    "processed",
    "ignored",
    "mapping_error",
    "parked",
    "unmatched",
)


@messages.command("list")
@config_option
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--type", "message_type", default=None, help="ORM or ORM^O01")
@click.option("--since", default=None, help="ISO time or a span like 2h")
@click.option("--listener", default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def messages_list(
    config_file: Path | None,
    status: str | None,
    message_type: str | None,
    since: str | None,
    listener: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List stored messages, oldest first."""
    from engine.store.messages import MessageFilter, list_messages

    config = load(config_file)
    engine = open_checked(config)
    flt = MessageFilter(
        status=status,
        message_type=message_type,
        since=parse_since(since) if since else None,
        listener=listener,
        limit=limit,
    )
    out = sys.stdout
    try:
        with engine.connect() as conn:
            if not as_json:
                out.write(
                    f"{'ID':>8}  {'RECEIVED (UTC)':19}  {'LISTENER':12}  {'TYPE':16}  "
                    f"{'CONTROL ID':20}  {'STATUS':13}  ACK\n"
                )
            for row in list_messages(conn, flt):
                if as_json:
                    out.write(json.dumps(_summary_json(row)) + "\n")
                else:
                    out.write(
                        f"{row['id']:>8}  {row['received_at']:%Y-%m-%d %H:%M:%S}  "
                        f"{row['listener'][:12]:12}  {(row['message_type'] or '-')[:16]:16}  "
                        f"{(row['control_id'] or '-')[:20]:20}  {row['status']:13}  "
                        f"{row['ack_code'] or '-'}\n"
                    )
    finally:
        engine.dispose()


def _summary_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "received_at": row["received_at"].isoformat(),
        "listener": row["listener"],
        "peer": row["peer"],
        "control_id": row["control_id"],
        "message_type": row["message_type"],
        "sending_application": row["sending_application"],
        "sending_facility": row["sending_facility"],
        "status": row["status"],
        "ack_code": row["ack_code"],
        "error_code": row["error_code"],
        "error": row["error"],
        "size": row["size"],
        "normalised_at": row["normalised_at"].isoformat() if row["normalised_at"] else None,
        "mapping_id": row["mapping_id"],
        "rule_id": row["rule_id"],
    }


@messages.command("show")
@click.argument("message_id", type=int)
@config_option
@click.option("--json", "as_json", is_flag=True)
def messages_show(message_id: int, config_file: Path | None, as_json: bool) -> None:
    """Show one message: metadata, the raw message by segment, its ACK and errors."""
    from engine.store.messages import get_message
    from engine.store.referrals import events_of_message

    config = load(config_file)
    engine = open_checked(config)
    try:
        with engine.connect() as conn:
            row = get_message(conn, message_id)
            events = events_of_message(conn, message_id) if row else []
    finally:
        engine.dispose()
    if row is None:
        raise click.ClickException(f"no message with id {message_id}")
    diagnostics = json.loads(row["diagnostics"]) if row["diagnostics"] else []
    codec = _codec_for_display(row.get("charset"))
    text = row["raw"].decode(codec, "replace")
    ack = row["ack"].decode("latin-1") if row["ack"] else None
    if as_json:
        data = _summary_json(row)
        data.update(
            raw=text,
            segments=split_segments(text),
            ack=ack,
            duplicate_of=row["duplicate_of"],
            raw_truncated=row["raw_truncated"],
            payload_sha256=row["payload_sha256"],
            diagnostics=diagnostics,
            parked_at=row["parked_at"].isoformat() if row["parked_at"] else None,
            attempts=row["attempts"],
            events=events,
        )
        click.echo(json.dumps(data, indent=2))
        return
    lines = [
        f"message {row['id']}",
        f"  received     {row['received_at'].isoformat()} on {row['listener']} from {row['peer']}",
        f"  type         {row['message_type'] or '-'}   control id {row['control_id'] or '-'}",
        f"  sender       {row['sending_application'] or '-'} / {row['sending_facility'] or '-'}",
        f"  version      {row['version'] or '-'}   "
        f"charset {row['charset'] or '(listener default)'}",
        f"  status       {row['status']}   ack {row['ack_code'] or '-'}",
        f"  size         {row['size']} bytes"
        + (" (only a prefix was kept)" if row["raw_truncated"] else ""),
        f"  sha256       {row['payload_sha256']}",
    ]
    if row["duplicate_of"]:
        lines.append(f"  duplicate of {row['duplicate_of']}")
    if row["error"]:
        code = f"{row['error_code']}: " if row["error_code"] is not None else ""
        lines.append(f"  error        {code}{row['error']}")
    if row["normalised_at"] is not None:
        lines.append(
            f"  normalised   {row['normalised_at'].isoformat()} by "
            f"{row['mapping_id'] or '-'}/{row['rule_id'] or '-'} (attempts {row['attempts']})"
        )
    if row["parked_at"] is not None:
        lines.append(f"  parked since {row['parked_at'].isoformat()}")
    lines += [f"  {d['severity']:12} {d['code']}: {d['message']}" for d in diagnostics]
    if events:
        lines.append("events:")
        lines += [
            f"  {e['type']:23} referral {e['referral_id']} #{e['sequence']}"
            + (f"  ANOMALY: {e['anomaly']}" if e["anomaly"] else "")
            for e in events
        ]
    lines.append("segments:")
    lines += [f"  {seg}" for seg in split_segments(text)]
    if ack:
        lines.append("ack:")
        lines += [f"  {seg}" for seg in split_segments(ack)]
    click.echo("\n".join(lines))


def _codec_for_display(charset: str | None) -> str:
    from engine.protocol.hl7v2 import HeaderError, codec_for

    try:
        return codec_for(charset or "", "utf-8")
    except HeaderError:
        return "latin-1"


# -- send ----------------------------------------------------------------------------


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=2575, show_default=True)
@click.option(
    "--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None
)
@click.option("--tls", "use_tls", is_flag=True, help="Use TLS with the system CAs.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@config_option
def send(
    files: tuple[Path, ...],
    host: str,
    port: int,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    use_tls: bool,
    timeout: float,
    config_file: Path | None,
) -> None:
    """Send HL7 v2 message files over MLLP and print each ACK.

    A file may hold several messages (a blank line or a new MSH starts the next).
    Exits non-zero unless every message was answered AA or CA.
    """
    from engine.edges.mllp_client import MllpClient, client_tls, read_messages

    del config_file  # accepted for uniformity; sending needs no config
    if tls_key and not tls_cert:
        raise click.UsageError("--tls-key needs --tls-cert (the certificate it belongs to)")
    tls = None
    if tls_ca or tls_cert or use_tls:
        try:
            tls = client_tls(tls_ca, tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise click.ClickException(
                f"cannot use the TLS files given ({getattr(exc, 'reason', None) or exc}); "
                "--tls-ca must be a PEM CA certificate, --tls-cert/--tls-key a PEM pair"
            ) from None
    batch = [(path, msg) for path in files for msg in read_messages(path)]
    if not batch:
        raise click.ClickException("no HL7 messages found in the given files")

    async def go() -> int:
        failures = 0
        async with MllpClient(host, port, tls=tls, timeout=timeout) as client:
            for path, msg in batch:
                receipt = await client.send(msg)
                status = receipt.code or "??"
                detail = f" {receipt.text}" if receipt.text else ""
                click.echo(f"{path.name}: {receipt.control_id or '-'} {status}{detail}")
                if not receipt.ok:
                    failures += 1
        return failures

    try:
        failures = asyncio.run(go())
    except (OSError, TimeoutError) as exc:
        hint = " (check the client certificate: --tls-cert/--tls-key)" if tls else ""
        raise click.ClickException(
            f"could not talk to {host}:{port}: {exc.__class__.__name__} {exc}".strip() + hint
        ) from None
    if failures:
        click.echo(f"{failures} of {len(batch)} messages were not accepted", err=True)
        sys.exit(1)


# -- command groups in their own modules ----------------------------------------------

main.add_command(referrals)
main.add_command(deliveries)
main.add_command(listen)
main.add_command(mappings)
main.add_command(simulate)
main.add_command(worklist)
messages.add_command(replay)
messages.add_command(parked)
