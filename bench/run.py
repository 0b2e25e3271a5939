#!/usr/bin/env python3
"""``make bench``: refloop on PostgreSQL and on SQLite beside the shared HL7 peers.

Runs ../shared/bench/run_peers.sh once (it is only invoked, never copied or changed)
with ``PEERS="hl7-pg simple-hl7 custom custom"``: every ``custom`` start goes through
bench/refloop_peer.py, which alternates the database variant (refloop-pg on the
throw-away PostgreSQL run_peers.sh starts, refloop-sqlite on a temp file) and records
which port each variant got, so the rows can be relabelled afterwards. Everything is
measured by the same load generator (mllp_load), with the same messages, in the same
interleaved repetitions as the peers.

Prints a table (peer, message, connections, msgs/s, ACK latency p50/p99), the
refloop-pg / hl7-pg ratio, and PASS/MISS against the issue's targets. Then (unless
``--no-normalise``) it measures normalisation with bench/normalise.py on SQLite and on
PostgreSQL (the local server, ``--pg``): the normaliser's drain rate, a full-rate run
(backlog, drain time after the last ACK, received -> committed p50/p99) and paced runs
at fixed offered rates (does the backlog stay bounded?). Then (unless ``--no-deliver``)
the outbound side with bench/deliver.py, on the same two databases: referral packets
through the ``mllp`` channel to a local MLLP sink (deliveries/s, ACK -> delivery
p50/p95/p99/max at paced rates and in a burst, where the time went, /metrics).
Results go to bench/results/ as JSON lines + markdown. Exit status is 0 whatever the
figures are; it is non-zero only when the harness itself failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# shared/ sits beside the repository (as on every machine and in CI).
SHARED = Path(
    os.environ.get("HL7BENCH_DIR", Path(__file__).resolve().parents[2] / "shared" / "bench")
)
# run_peers.sh's own default work dir (peers installed once, reused by every run).
WORK = Path(os.environ.get("HL7BENCH_TMP", "/tmp/hl7bench"))  # noqa: S108

DEFAULT_PEERS = "hl7-pg simple-hl7"
DEFAULT_VARIANTS = "pg sqlite"
DEFAULT_CONNS = "1 4 16"
DEFAULT_REPS = 3
MSGS = ("orm_o01_referral", "oru_r01_consult_note")
MSG_NAMES = {"orm_o01_referral.hl7": "ORM^O01", "oru_r01_consult_note.hl7": "ORU^R01"}
# The normaliser measurements (bench/normalise.py): full and --quick sizes.
NORM_N, NORM_N_QUICK = 20000, 4000  # drain and full-rate messages
NORM_SECONDS, NORM_SECONDS_QUICK = 15.0, 6.0  # each paced run
# Default paced rates: these fractions of the normaliser's own drain rate (per database;
# --quick: PostgreSQL only), and on PostgreSQL also refloop-pg's ORM^O01 c=16 rate.
PACED_FACTORS = (0.4, 0.8)
# run_peers.sh --quick, spelled out for when --quick is combined with --reps.
QUICK_ENV = {"N": "2000", "RAW_N": "10000", "DUR": "3", "PGBENCH_T": "3"}

# The targets (refloop on PostgreSQL).
TARGET_RATIO = 5.0  # ORM^O01, 16 connections: >= 5x hl7-pg
TARGET_P99_MS = 20.0  # ORM^O01, 16 connections: ACK p99 <= 20 ms
TARGET_ORU = 1000.0  # ORU^R01, 16 connections: >= 1000 msgs/s
TARGET_CONNS = 16


class HarnessError(Exception):
    """The benchmark could not be run or read; figures are missing, not bad."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- arguments ---------------------------------------------------------------------


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="refloop (PostgreSQL, SQLite) vs the shared HL7 MLLP peers.",
        epilog="Environment defaults: BENCH_QUICK=1, BENCH_REPS, BENCH_CONNS, BENCH_PEERS, "
        "BENCH_VARIANTS, BENCH_NO_NORMALISE=1, BENCH_NO_DELIVER=1, BENCH_PG, BENCH_PACED_RATE; "
        "run_peers.sh "
        "knobs (N, DUR, WARM, TIMEOUT_MS, HL7BENCH_TMP, ...) "
        "pass through, except that --quick sets N/DUR itself.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        default=env_flag("BENCH_QUICK"),
        help="smoke run: run_peers.sh --quick (1 repetition, 2,000 msgs / 3 s per run)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=int(os.environ["BENCH_REPS"]) if os.environ.get("BENCH_REPS") else None,
        help=f"repetitions (default {DEFAULT_REPS}; 1 with --quick)",
    )
    ap.add_argument(
        "--conns",
        default=os.environ.get("BENCH_CONNS", DEFAULT_CONNS),
        help=f'connection counts (default "{DEFAULT_CONNS}")',
    )
    ap.add_argument(
        "--peers",
        default=os.environ.get("BENCH_PEERS", DEFAULT_PEERS),
        help=f'run_peers.sh peers beside refloop (default "{DEFAULT_PEERS}")',
    )
    ap.add_argument(
        "--variants",
        default=os.environ.get("BENCH_VARIANTS", DEFAULT_VARIANTS),
        help=f'refloop database variants (default "{DEFAULT_VARIANTS}")',
    )
    ap.add_argument("--pgbench", action="store_true", help="also run run_peers' pgbench step")
    ap.add_argument("--parse", action="store_true", help="also run the parse micro-benchmarks")
    ap.add_argument(
        "--out", type=Path, default=BENCH / "results", help="results directory (bench/results)"
    )
    ap.add_argument("--keep-state", action="store_true", help="keep refloop's temp dir")
    ap.add_argument(
        "--no-normalise",
        action="store_true",
        default=env_flag("BENCH_NO_NORMALISE"),
        help="skip the normaliser measurements after the peer table",
    )
    ap.add_argument(
        "--normalise-only",
        action="store_true",
        help="only the normaliser measurements (no run_peers.sh; no foundation-rate run "
        "unless --paced-rate names it)",
    )
    ap.add_argument(
        "--no-deliver",
        action="store_true",
        default=env_flag("BENCH_NO_DELIVER"),
        help="skip the outbound measurements (bench/deliver.py)",
    )
    ap.add_argument(
        "--deliver-only",
        action="store_true",
        help="only the outbound measurements (no run_peers.sh, no normaliser part)",
    )
    ap.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG"),
        help="PostgreSQL for the normaliser and outbound measurements (a schema is made and "
        "dropped; "
        "default the local server postgresql://postgres@127.0.0.1:5432/test, skipped with "
        "a note if it does not answer)",
    )
    ap.add_argument(
        "--paced-rate",
        default=os.environ.get("BENCH_PACED_RATE", ""),
        help='offered msgs/s of the paced runs, e.g. "1000 1500" (default: '
        f"{' and '.join(f'{f:g}' for f in PACED_FACTORS)} x each database's drain rate, "
        "and on PostgreSQL also refloop-pg's ORM^O01 c=16 rate from the table)",
    )
    ap.add_argument(
        "--foundation-rate",
        type=float,
        default=None,
        help="PostgreSQL ingest rate for the extra paced run (default: refloop-pg's "
        "ORM^O01 c=16 msgs/s from the table; with --normalise-only, none unless given)",
    )
    ap.add_argument(
        "--paced-seconds",
        type=float,
        default=None,
        help=f"each paced run (default {NORM_SECONDS:g} s; {NORM_SECONDS_QUICK:g} with --quick)",
    )
    ap.add_argument(
        "--normalise-n",
        type=int,
        default=None,
        help=f"drain / full-rate messages (default {NORM_N}; {NORM_N_QUICK} with --quick)",
    )
    ap.add_argument(
        "--summarize",
        type=Path,
        metavar="JSONL",
        help="only summarize an existing bench/results/*.jsonl file (no run)",
    )
    args = ap.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    try:
        conns = [int(c) for c in args.conns.split()]
    except ValueError:
        ap.error(f"--conns: not a list of integers: {args.conns!r}")
    if not conns or min(conns) < 1:
        ap.error("--conns needs at least one count >= 1")
    bad = sorted(set(args.variants.split()) - {"pg", "sqlite"})
    if bad or not args.variants.split():
        ap.error(f"--variants: choose from pg, sqlite (got {args.variants!r})")
    if "custom" in args.peers.split():
        ap.error("--peers: refloop is added as 'custom' by this script; do not list it")
    try:
        args.paced_rates = [float(r) for r in args.paced_rate.split()]
    except ValueError:
        ap.error(f"--paced-rate: not a list of numbers: {args.paced_rate!r}")
    if any(r <= 0 for r in args.paced_rates):
        ap.error("--paced-rate: rates must be > 0")
    if args.foundation_rate is not None and args.foundation_rate <= 0:
        ap.error("--foundation-rate must be > 0")
    if args.no_normalise and args.normalise_only:
        ap.error("--no-normalise and --normalise-only exclude each other")
    if args.no_deliver and args.deliver_only:
        ap.error("--no-deliver and --deliver-only exclude each other")
    if args.normalise_only and args.deliver_only:
        ap.error("--normalise-only and --deliver-only exclude each other")
    # What runs: the peer table unless an --*-only names one part; each part unless
    # skipped or another part was named alone.
    args.run_peers = not (args.normalise_only or args.deliver_only)
    args.run_normalise = not (args.no_normalise or args.deliver_only)
    args.run_deliver = not (args.no_deliver or args.normalise_only)
    return args


# -- running run_peers.sh ------------------------------------------------------------


@dataclass
class RunOutput:
    results: Path
    ports: dict[int, str]  # MLLP port -> variant
    seconds: float


def run_peers(args: argparse.Namespace, state: Path) -> RunOutput:
    script = SHARED / "run_peers.sh"
    if not script.is_file():
        raise HarnessError(f"{script} not found (set HL7BENCH_DIR)")
    variants = args.variants.split()
    (state / "variants").write_text(" ".join(variants) + "\n")
    peer_script = BENCH / "refloop_peer.py"
    for part in (sys.executable, str(peer_script), str(state)):
        if any(ch.isspace() for ch in part):
            raise HarnessError(f"path with whitespace breaks CUSTOM_CMD word-splitting: {part}")

    env = dict(os.environ)
    env.update(
        PEERS=" ".join([*args.peers.split(), *(["custom"] * len(variants))]),
        CUSTOM_CMD=f"{sys.executable} {peer_script} --state {state} --port {{port}}",
        CONNS=args.conns,
        MSGS=" ".join(MSGS),
    )
    env.pop("CUSTOM_LOAD_OPTS", None)
    for key, wanted in (("SKIP_PGBENCH", args.pgbench), ("SKIP_PARSE", args.parse)):
        if wanted:
            env.pop(key, None)
        else:
            env[key] = "1"
    cmd = ["bash", str(script)]
    if args.quick and args.reps is None:
        cmd.append("--quick")
    elif args.quick:
        env.update(QUICK_ENV, REPS=str(args.reps))
    else:
        env["REPS"] = str(args.reps or DEFAULT_REPS)

    log(f"PEERS={env['PEERS']!r} CONNS={args.conns!r} variants={variants} {' '.join(cmd[2:])}")
    log(f"CUSTOM_CMD={env['CUSTOM_CMD']}")
    started = time.monotonic()
    results: Path | None = None
    with (state / "run_peers.stdout.md").open("w") as summary_out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=summary_out, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                m = re.search(r"results -> (\S+\.jsonl)", line)
                if m:
                    results = Path(m.group(1))
                print(_relabel_progress(line.rstrip("\n"), state), file=sys.stderr, flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
    seconds = time.monotonic() - started
    if rc != 0:
        raise HarnessError(f"run_peers.sh exited with status {rc}")
    if results is None or not results.is_file():
        raise HarnessError("could not find run_peers.sh's results file in its output")
    return RunOutput(results, read_ports(state), seconds)


def read_ports(state: Path) -> dict[int, str]:
    ports: dict[int, str] = {}
    path = state / "ports.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            ports[int(rec["port"])] = str(rec["variant"])
    return ports


def _relabel_progress(line: str, state: Path) -> str:
    """run_peers prints 'custom' for every refloop start; name the variant running now."""
    m = re.match(r"(\s+)custom\s+(.*)$", line)
    if m is None:
        return line
    try:
        last = (state / "ports.jsonl").read_text().splitlines()[-1]
        variant = json.loads(last)["variant"]
    except (OSError, IndexError, ValueError, KeyError):
        return line
    return f"{m.group(1)}{'refloop-' + variant:<19} {m.group(2)}"


# -- results ---------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def relabel(rows: Iterable[dict[str, Any]], ports: dict[int, str]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row.get("label") == "custom":
            variant = ports.get(int(row.get("port", -1)))
            if variant is None:
                raise HarnessError(f"no refloop variant recorded for port {row.get('port')}")
            row = {**row, "label": f"refloop-{variant}", "refloop_variant": variant}
        out.append(row)
    return out


@dataclass(frozen=True)
class Cell:
    peer: str
    msg: str  # message file name
    conns: int
    reps: int
    tput: float  # medians over repetitions
    p50: float
    p99: float
    errors: int  # summed over repetitions
    cpu: float | None


def summarize(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], Cell]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "throughput_msg_s" in r:
            groups[(r["label"], r["msg_file"], int(r["conns"]))].append(r)
    med = statistics.median
    cells = {}
    for key, rs in groups.items():
        cpu = [float(r["server_cpu_pct"]) for r in rs if r.get("server_cpu_pct") is not None]
        cells[key] = Cell(
            peer=key[0],
            msg=key[1],
            conns=key[2],
            reps=len(rs),
            tput=med(float(r["throughput_msg_s"]) for r in rs),
            p50=med(float(r["lat_ms"]["p50"]) for r in rs),
            p99=med(float(r["lat_ms"]["p99"]) for r in rs),
            errors=sum(
                int(r["acked_err"]) + int(r["timeouts"]) + int(r["conn_errors"]) for r in rs
            ),
            cpu=med(cpu) if cpu else None,
        )
    return cells


def paired_ratio(
    rows: Sequence[dict[str, Any]], num: str, den: str, msg: str, conns: int
) -> float | None:
    """Median over repetitions of num/den throughput measured in the same repetition."""
    by: dict[tuple[str, int], float] = {}
    for r in rows:
        if "throughput_msg_s" in r and r["msg_file"] == msg and int(r["conns"]) == conns:
            by[(r["label"], int(r.get("rep", 1)))] = float(r["throughput_msg_s"])
    ratios = [
        by[(num, rep)] / by[(den, rep)]
        for (label, rep) in by
        if label == num and by.get((den, rep))
    ]
    return statistics.median(ratios) if ratios else None


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def peer_order(cells: Iterable[Cell]) -> list[str]:
    first = ["refloop-pg", "refloop-sqlite", "hl7-pg", "simple-hl7"]
    seen = {c.peer for c in cells}
    return [p for p in first if p in seen] + sorted(seen - set(first))


def figures_table(
    rows: Sequence[dict[str, Any]], cells: dict[tuple[str, str, int], Cell]
) -> list[str]:
    lines = [
        "| peer | message | connections | msgs/s | p50 ms | p99 ms | x hl7-pg | server CPU % "
        "| reps | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    msgs = [m for m in (f"{x}.hl7" for x in MSGS) if any(c.msg == m for c in cells.values())]
    msgs += sorted({c.msg for c in cells.values()} - set(msgs))
    for peer in peer_order(cells.values()):
        for msg in msgs:
            for conns in sorted({k[2] for k in cells if k[0] == peer and k[1] == msg}):
                c = cells[(peer, msg, conns)]
                r = paired_ratio(rows, peer, "hl7-pg", msg, conns)
                ratio = "-" if r is None else f"{r:.1f}"
                lines.append(
                    f"| {peer} | {MSG_NAMES.get(msg, msg)} | {conns} | {fmt_num(c.tput)} "
                    f"| {fmt_ms(c.p50)} | {fmt_ms(c.p99)} | {ratio} | {fmt_num(c.cpu)} "
                    f"| {c.reps} | {c.errors} |"
                )
    return lines


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def targets(
    rows: Sequence[dict[str, Any]], cells: dict[tuple[str, str, int], Cell]
) -> tuple[list[str], float | None]:
    orm, oru, c = "orm_o01_referral.hl7", "oru_r01_consult_note.hl7", TARGET_CONNS
    ratio = paired_ratio(rows, "refloop-pg", "hl7-pg", orm, c)
    lines = [
        f"refloop-pg ORM^O01 c={c} / hl7-pg ORM^O01 c={c} = "
        + (f"{ratio:.2f}x" if ratio is not None else "n/a (a row is missing)")
        + " (median of per-repetition ratios)",
        "",
        "Targets (the issue's; refloop on PostgreSQL):",
    ]
    for variant in ("pg", "sqlite"):
        peer = f"refloop-{variant}"
        if not any(k[0] == peer for k in cells):
            continue
        r = ratio if variant == "pg" else paired_ratio(rows, peer, "hl7-pg", orm, c)
        om, ou = cells.get((peer, orm, c)), cells.get((peer, oru, c))
        checks = [
            (
                f"ORM^O01 c={c} >= {TARGET_RATIO:g}x hl7-pg",
                None if r is None else r >= TARGET_RATIO,
                "-" if r is None else f"{r:.2f}x",
            ),
            (
                f"ORM^O01 c={c} ACK p99 <= {TARGET_P99_MS:g} ms",
                None if om is None else om.p99 <= TARGET_P99_MS,
                "-" if om is None else f"{fmt_ms(om.p99)} ms",
            ),
            (
                f"ORU^R01 c={c} >= {TARGET_ORU:,.0f} msgs/s",
                None if ou is None else ou.tput >= TARGET_ORU,
                "-" if ou is None else f"{fmt_num(ou.tput)} msgs/s",
            ),
        ]
        if variant == "sqlite":
            lines += ["", "Same checks on SQLite (information, not the issue's targets):"]
        for name, ok, value in checks:
            lines.append(f"  {verdict(ok)}  {peer}: {name}  (measured {value})")
        errs = sum(x.errors for x in cells.values() if x.peer == peer)
        if errs:
            lines.append(f"  WARNING: {peer} had {errs} errors/timeouts; see the errors column")
    return lines, ratio


def git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def shared_summary(path: Path) -> str:
    """run_peers' own summarize.py over the relabelled rows (p90, max, CPU, pgbench...)."""
    tool = SHARED / "peers" / "summarize.py"
    if not tool.is_file():
        return ""
    proc = subprocess.run(
        [sys.executable, str(tool), str(path)], capture_output=True, text=True, check=False
    )
    return proc.stdout if proc.returncode == 0 else ""


def normalise_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The normaliser section, when the rows hold one (``{"kind": "normalise"}``)."""
    norm = next((r for r in rows if r.get("kind") == "normalise"), None)
    if norm is None:
        return []
    if norm.get("skipped"):
        return ["## Normalisation", "", f"Not measured: {norm['skipped']}", ""]
    return [*_normalise_module().report_lines(norm), ""]


def deliver_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The outbound section, when the rows hold one (``{"kind": "deliver"}``)."""
    res = next((r for r in rows if r.get("kind") == "deliver"), None)
    if res is None:
        return []
    if res.get("skipped"):
        return ["## Outbound", "", f"Not measured: {res['skipped']}", ""]
    return [*_bench_module("deliver").report_lines(res), ""]


def _normalise_module() -> Any:
    """bench/normalise.py, imported only when needed (it imports the engine)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import normalise

    return normalise


def _bench_module(name: str) -> Any:
    """bench/<name>.py, imported only when needed (it imports the engine)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import importlib

    return importlib.import_module(name)


def report(rows: list[dict[str, Any]], jsonl: Path, bench_meta: dict[str, Any]) -> str:
    cells = summarize(rows)
    norm = normalise_lines(rows) + deliver_lines(rows)
    if not any(k[0].startswith("refloop-") for k in cells):
        if norm:  # --normalise-only / --deliver-only
            head = [
                f"# refloop bench {bench_meta.get('date', '')}",
                "",
                f"refloop {bench_meta.get('git', '?')}; {os.cpu_count()} CPUs; "
                f"args: {bench_meta.get('args', '')}",
                "",
            ]
            return "\n".join([*head, *norm])
        raise HarnessError(f"{jsonl}: no refloop rows (did the custom peer start?)")
    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    table = figures_table(rows, cells)
    target_lines, _ratio = targets(rows, cells)
    head = [
        f"# refloop bench {bench_meta.get('date', '')}",
        "",
        f"refloop {bench_meta.get('git', '?')}; {meta.get('cpu', '?')} x{meta.get('nproc', '?')}, "
        f"PostgreSQL {meta.get('pg_version', '?')}, Python {meta.get('python', '?')}, "
        f"Node {meta.get('node', '?')}; reps={meta.get('reps', '?')}, N={meta.get('n', '?')} "
        f"msgs / {meta.get('dur', '?')} s cap per run, warm-up {meta.get('warm', '?')}/conn; "
        f"args: {bench_meta.get('args', '')}; wall {bench_meta.get('wall_s', 0):.0f} s",
        "",
        "Medians over repetitions. msgs/s = ACKed messages / elapsed; p50/p99 = ACK latency "
        "(first byte sent -> whole ACK received) per mllp_load. x hl7-pg = msgs/s over "
        "hl7-pg's at the same message and connections in the same repetition (median).",
        "",
    ]
    body = [*head, *table, "", "```", *target_lines, "```", "", *norm]
    extra = shared_summary(jsonl)
    if extra:
        body += ["## run_peers summarize.py on the same rows", "", extra]
    return "\n".join(body)


# -- the normaliser ------------------------------------------------------------------------


def measure_normaliser(args: argparse.Namespace, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """bench/normalise.py's measure() on SQLite and on PostgreSQL (the local server unless
    --pg / BENCH_PG names another; the default is skipped with a note if it does not
    answer, an explicit one that does not answer is a harness failure)."""
    normalise = _normalise_module()
    pg: str | None = args.pg or normalise.DEFAULT_PG
    why = normalise.pg_reachable(pg)
    note = None
    if why is not None:
        if args.pg:
            raise HarnessError(f"--pg {args.pg}: {why}")
        note = f"PostgreSQL {pg} does not answer ({why}): SQLite only"
        log(f"normaliser: {note}")
        pg = None
    cells = summarize(rows)
    orm = cells.get(("refloop-pg", "orm_o01_referral.hl7", TARGET_CONNS))
    ingest = args.foundation_rate or (orm.tput if orm and not args.paced_rates else None)
    plan = normalise.Plan(
        n=args.normalise_n or (NORM_N_QUICK if args.quick else NORM_N),
        seconds=args.paced_seconds or (NORM_SECONDS_QUICK if args.quick else NORM_SECONDS),
        paced_factors=PACED_FACTORS,
        paced_databases=("postgresql",) if args.quick and pg else ("sqlite", "postgresql"),
        paced_rates=args.paced_rates,
        ingest_rates={"postgresql": ingest} if ingest else None,
    )
    try:
        out = normalise.measure(pg, plan, progress=lambda m: log(f"normaliser: {m}"))
    except Exception as exc:
        raise HarnessError(f"normaliser measurements failed: {type(exc).__name__}: {exc}") from exc
    if note:
        out["note"] = note
    if ingest:
        out["foundation_rate"] = ingest
    return out


# -- outbound ---------------------------------------------------------------------------


def measure_deliver(args: argparse.Namespace) -> dict[str, Any]:
    """bench/deliver.py's measure() on SQLite and on PostgreSQL (as for the normaliser:
    the local server unless --pg / BENCH_PG names another; the default is skipped with a
    note if it does not answer, an explicit one that does not answer is a failure)."""
    deliver = _bench_module("deliver")
    normalise = _normalise_module()
    pg: str | None = args.pg or normalise.DEFAULT_PG
    why = normalise.pg_reachable(pg)
    note = None
    if why is not None:
        if args.pg:
            raise HarnessError(f"--pg {args.pg}: {why}")
        note = f"PostgreSQL {pg} does not answer ({why}): SQLite only"
        log(f"outbound: {note}")
        pg = None
    plan = deliver.QUICK if args.quick else deliver.Plan()
    try:
        out = deliver.measure(pg, plan, progress=lambda m: log(f"outbound: {m}"))
    except Exception as exc:
        raise HarnessError(f"outbound measurements failed: {type(exc).__name__}: {exc}") from exc
    if note:
        out["note"] = note
    return out


# -- main --------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.summarize:
        rows = read_jsonl(args.summarize)
        bench_meta = next((r for r in rows if r.get("kind") == "bench"), {})
        print(report(rows, args.summarize, bench_meta))
        return 0

    stamp = time.strftime("%Y%m%d-%H%M%S")
    state = Path(tempfile.mkdtemp(prefix="refloop-bench-"))
    started = time.monotonic()
    try:
        rows: list[dict[str, Any]] = []
        run_peers_results = None
        if args.run_peers:
            out = run_peers(args, state)
            rows = relabel(read_jsonl(out.results), out.ports)
            run_peers_results = str(out.results)
        args.out.mkdir(parents=True, exist_ok=True)
        jsonl = args.out / f"bench-{stamp}.jsonl"
        md = jsonl.with_suffix(".md")
        bench_meta = {
            "kind": "bench",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "git": git_describe(),
            "args": " ".join(argv) or "(defaults)",
            "peers": args.peers,
            "variants": args.variants,
            "conns": args.conns,
            "run_peers_results": run_peers_results,
            "wall_s": round(time.monotonic() - started, 1),
        }

        def write(all_rows: list[dict[str, Any]]) -> str:
            with jsonl.open("w") as fh:
                for row in [bench_meta, *all_rows]:
                    fh.write(json.dumps(row) + "\n")
            text = report(all_rows, jsonl, bench_meta)
            md.write_text(text)
            return text

        if rows:
            text = write(rows)
            # stdout: the figures and targets (the markdown file also has run_peers' table).
            print(text.split("## run_peers summarize.py")[0].rstrip(), flush=True)
        if args.run_normalise:
            norm = measure_normaliser(args, rows)
            rows.append(norm)
            bench_meta["wall_s"] = round(time.monotonic() - started, 1)
            write(rows)
            print("\n" + "\n".join(normalise_lines([norm])).rstrip())
        if args.run_deliver:
            outbound = measure_deliver(args)
            rows.append(outbound)
            bench_meta["wall_s"] = round(time.monotonic() - started, 1)
            write(rows)
            print("\n" + "\n".join(deliver_lines([outbound])).rstrip(), flush=True)
        print(f"\nresults: {jsonl}\n         {md}")
        log(f"done in {time.monotonic() - started:.0f} s")
        return 0
    except HarnessError as exc:
        log(f"HARNESS FAILED: {exc}")
        log(f"refloop logs: {WORK / 'logs' / 'peer-custom.log'}; state kept in {state}")
        args.keep_state = True
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep_state:
            log(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
