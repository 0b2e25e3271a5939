"""What every ``refloop`` subcommand shares: the config option, loading the config,
opening the database (with errors that say what to fix), parsing times."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from engine.config import Config, ConfigError, config_path, load_config
from engine.logs import Tokenizer, configure, load_token_key

F = TypeVar("F", bound=Callable[..., Any])

PORT = click.IntRange(0, 65535)


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="REFLOOP_CONFIG",
        default=None,
        show_envvar=True,
        help="Config file (default ./engine.toml).",
    )(fn)


def load(config_file: Path | None) -> Config:
    try:
        return load_config(config_path(config_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def setup_logging(config: Config, *, level: str | None = None) -> None:
    key_ref = config.logging.token_key
    key_file = config.resolve(key_ref.file) if key_ref.file else None
    try:
        key = load_token_key(key_ref.env, key_file)
    except OSError as exc:
        raise click.ClickException(
            f"cannot create the log token key {key_file}: {exc.strerror}; create it "
            f"or set env {key_ref.env or 'REFLOOP_LOG_TOKEN_KEY'}"
        ) from None
    configure(
        level=level or config.logging.level,
        fmt=config.logging.format,
        tokenizer=Tokenizer(key),
    )


def open_database(config: Config) -> tuple[Engine, str]:
    """The configured database, or a ClickException that says what to fix."""
    from engine.store.database import describe_failure, open_engine

    try:
        url = config.database_url()
        return open_engine(url, sqlite_synchronous=config.database.sqlite_synchronous), url
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(
            describe_failure(config.database.url, exc) + "; check [database] url or "
            "REFLOOP_DATABASE_URL"
        ) from None


def open_checked(config: Config) -> Engine:
    from engine.store.database import SchemaError, check_schema, describe_failure, ping

    engine, url = open_database(config)
    try:
        ping(engine)
        check_schema(engine)
    except SchemaError as exc:
        engine.dispose()
        raise click.ClickException(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        engine.dispose()
        raise click.ClickException(
            f"{describe_failure(url, exc)}; check [database] url or REFLOOP_DATABASE_URL"
        ) from None
    return engine


_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2026-11-23T10:00``, ``2026-11-23`` (UTC unless an offset is given) or ``2h``."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(value.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use an ISO time like 2026-11-23T10:00 or a span like 30m, 2h, 7d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
