"""``refloop mappings check|test|schema``: the analyst's loop, without a running daemon."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.mapping.fixtures import case_files, run_cases
from engine.mapping.mapset import MappingSet, MappingSetError, load_mapping_set
from engine.mapping.schema import SCHEMAS, render
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import Outbound, OutboundError, load_outbound
from engine.outbound.schema import SCHEMAS as OUTBOUND_SCHEMAS
from engine.outbound.schema import render as render_outbound
from engine.policy.authorization import AuthorizationError, load_authorization
from engine.policy.cases import policy_case_files, run_policy_cases
from engine.policy.language import Policy, PolicyError, load_policy
from engine.policy.schema import SCHEMAS as POLICY_SCHEMAS
from engine.policy.schema import render as render_policy

_DIR = click.Path(file_okay=False, path_type=Path)


def _load(directory: Path) -> MappingSet:
    try:
        return load_mapping_set(directory)
    except MappingSetError as exc:
        for err in exc.errors:
            click.echo(f"{err.file}:{err.line}:{err.column}: error: {err.message}", err=True)
        n = len(exc.errors)
        raise click.ClickException(
            f"{n} error{'s' if n != 1 else ''} in {directory}; nothing was loaded"
        ) from None


def _load_outbound(directory: Path) -> Outbound:
    """The outbound set (routes, write-back, directory); formats are checked here,
    channel names by ``refloop config check`` (they live in the config)."""
    try:
        return load_outbound(directory, known_formats=FORMATS)
    except OutboundError as exc:
        for line in exc.errors:
            file, _, rest = line.partition(": ")
            click.echo(f"{file}: error: {rest}" if rest else line, err=True)
        n = len(exc.errors)
        raise click.ClickException(
            f"{n} error{'s' if n != 1 else ''} in {directory} (outbound); nothing was loaded"
        ) from None


def _load_policy(directory: Path, outbound: Outbound) -> Policy:
    """The referral policy (policies/*.yaml, its notify steps naming known routes) and
    the pre-authorization table (policies/authorization.yaml)."""
    try:
        policy = load_policy(directory, known_routes=[r.id for r in outbound.routes])
        load_authorization(directory)
        return policy
    except (PolicyError, AuthorizationError) as exc:
        for line in exc.errors:
            file, _, rest = line.partition(": ")
            click.echo(f"{file}: error: {rest}" if rest else line, err=True)
        n = len(exc.errors)
        raise click.ClickException(
            f"{n} error{'s' if n != 1 else ''} in {directory} (policies); nothing was loaded"
        ) from None


@click.group("mappings")
def mappings() -> None:
    """Validate and test the YAML mappings (no database needed)."""


@mappings.command("check")
@click.argument("directory", type=_DIR, default=Path("mappings"))
def check(directory: Path) -> None:
    """Validate every mapping and value set under DIRECTORY (default ./mappings).

    Errors are printed as file:line:column; the exit status is 1 if there is any.
    """
    mapset = _load(directory)
    outbound = _load_outbound(directory)
    policy = _load_policy(directory, outbound)
    overlays = ", ".join(sorted(mapset.overlays)) or "none"
    tables = sum(len(v) for v in mapset.valuesets.values())
    click.echo(
        f"ok: {len(mapset.mappings)} mappings, {tables} value sets, overlays: {overlays} "
        f"(digest {mapset.digest}); outbound: {len(outbound.routes)} routes, "
        f"{len(outbound.directory.specialists)} specialists, {len(outbound.writeback)} write-back "
        f"sources (digest {outbound.digest}); policy: {len(policy.windows)} windows, "
        f"{len(policy.ladders)} ladders (digest {policy.digest})"
    )


@mappings.command("test")
@click.argument("directory", type=_DIR, default=Path("mappings"))
@click.option("-k", "name_filter", default="", help="Only cases whose name contains this text.")
@click.option("-v", "--verbose", is_flag=True, help="List passing cases too.")
@click.option("--coverage", is_flag=True, help="List rules no case exercises.")
def test(directory: Path, name_filter: str, verbose: bool, coverage: bool) -> None:
    """Run the fixtures (*.cases.yaml) under DIRECTORY against its mappings, and the
    policy's (policies/tests/*.cases.yaml) against its policy."""
    mapset = _load(directory)
    run = run_cases(mapset, case_files(directory), name_filter=name_filter)
    for result in run.results:
        if verbose or not result.ok:
            click.echo(result.report())
    policy_results = []
    policy_files = policy_case_files(directory)
    if policy_files:
        policy = _load_policy(directory, _load_outbound(directory))
        for path in policy_files:
            for case in run_policy_cases(path, policy):
                if name_filter and name_filter not in case.name:
                    continue
                policy_results.append(case)
                if verbose or not case.ok:
                    click.echo(case.report())
    if coverage:
        for mapping in mapset.mappings:
            unfired = [r.id for r in mapping.rules if r.id not in run.fired.get(mapping.id, set())]
            if unfired:
                click.echo(f"coverage: {mapping.id}: no case exercises {', '.join(unfired)}")
    failed = len(run.failed) + sum(1 for c in policy_results if not c.ok)
    total = len(run.results) + len(policy_results)
    click.echo(f"{total - failed} passed, {failed} failed")
    if failed or not total:
        sys.exit(1)


@mappings.command("schema")
@click.argument("directory", type=_DIR, default=Path("mappings"))
def schema(directory: Path) -> None:
    """Write the JSON Schemas for editor completion to DIRECTORY/_schema/."""
    out = directory / "_schema"
    out.mkdir(parents=True, exist_ok=True)
    for name in SCHEMAS:
        (out / name).write_text(render(name), encoding="utf-8")
        click.echo(f"wrote {out / name}")
    for name in OUTBOUND_SCHEMAS:
        (out / name).write_text(render_outbound(name), encoding="utf-8")
        click.echo(f"wrote {out / name}")
    for name in POLICY_SCHEMAS:
        (out / name).write_text(render_policy(name), encoding="utf-8")
        click.echo(f"wrote {out / name}")
