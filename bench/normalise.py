#!/usr/bin/env python3
"""How fast the normaliser turns stored messages into referral events, and whether it
keeps up with ingest.

Three measurements, on SQLite (a fresh file, WAL, synchronous=FULL) and on PostgreSQL
(``--pg URL``, a fresh schema made and dropped on that server), all with whole referral
loops (ORM → SIU S12 → SIU S14 Complete → ORU final, a new placer number per loop).
Every connection sends its own referrals, in order, staggered (:func:`streams`): a
referral's next message comes about a second after the previous one at 1,000 msgs/s, so
most messages find their referral already in the store — the common case in production,
where a referral's messages are days apart. No message is sent twice.

* **drain**: N messages are committed as ingest would, in the order the paced runs'
  connections deliver them, then the real normaliser drains them in batches of 256, in
  this process; msgs/s, and the share of the time spent mapping (CPU). The normaliser's
  own ceiling, with nothing else running. ``--order loops`` stores each loop's four
  messages back to back instead (they then correlate within one batch: faster).
* **live** (``--live``): ``refloop run`` (the normaliser in its own process, the
  default) as a subprocess driven at full rate by the shared C load generator
  (``mllp_load``, built under /tmp/hl7bench if missing), one process of one connection
  per stream; ACKed msgs/s, normalised msgs/s while sending, the highest backlog of
  unnormalised messages (sampled every 0.15 s), how long after the last ACK the last one
  was normalised, and p50/p99 of received → committed (``refloop_normalize_lag_seconds``
  and, exactly, ``messages.normalised_at - received_at``).
* **paced** (``--paced RATE``): the same daemon, but an asyncio MLLP sender offers a
  fixed rate for ``--seconds`` over 32 connections; the backlog is sampled every 0.15 s
  and the run says whether it stayed bounded (its trend while sending), how long the
  rest took to drain, and the received → committed p50/p99.

Each live and paced run starts a fresh daemon on a fresh database and waits for the
normaliser process to report before sending; CPU per process comes from /proc.

Usage: .venv/bin/python bench/normalise.py [--n 4000] [--pg postgresql://...] [--live]
       [--paced 1200 --paced 2000 --seconds 15] [--only postgresql] [--json out.json]
bench/run.py (``make bench``) calls :func:`measure` after the peer table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy import Engine, create_engine, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from engine.protocol.mllp import Frame, FrameDecoder, encode  # noqa: E402
from engine.store.database import open_engine, upgrade  # noqa: E402
from engine.store.schema import messages as messages_table  # noqa: E402
from tests.helpers import MAPPINGS, free_port  # noqa: E402
from tests.loop_messages import loop  # noqa: E402
from tests.normalising import processor, shipped, store  # noqa: E402

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
SAMPLE_EVERY = 0.15  # seconds between backlog samples
BATCH = 256  # the normaliser's default batch_size
# Statuses the normaliser leaves a message in once its events are committed.
DONE = ("processed", "ignored", "mapping_error")
BACKLOG_SQL = "SELECT COUNT(*) FROM messages WHERE status = 'received'"
HANDLED_SQL = "SELECT COUNT(*) FROM messages WHERE status <> 'received'"


def messages(n: int, tag: str) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        out += loop(f"{tag}{i:06d}", mrn=f"{100000 + i}")
        i += 1
    return out[:n]


def streams(n: int, conns: int, tag: str, gap: int = 8) -> list[list[bytes]]:
    """``n`` messages as ``conns`` per-connection streams. Each connection sends its own
    referrals' loops, in order (a loop's SIU only after its ORM was ACKed), staggered:
    round r sends loop r's ORM, loop r-gap's SIU S12, loop r-2*gap's S14 and loop
    r-3*gap's ORU, so a referral's next message comes 4 * gap messages later on its
    connection (about a second at 1,000 msgs/s over 32 connections). No message is sent
    twice and no placer number is shared between connections."""
    out: list[list[bytes]] = []
    for c in range(conns):
        want = n // conns + (1 if c < n % conns else 0)
        cache: dict[int, list[bytes]] = {}
        stream: list[bytes] = []
        r = 0
        while len(stream) < want:
            for k in range(4):
                j = r - k * gap
                if j < 0 or len(stream) >= want:
                    continue
                if j not in cache:
                    cache[j] = loop(f"{tag}{c:02d}{j:05d}", mrn=f"{c:02d}{j:05d}")
                stream.append(cache[j][k])
                if k == 3:
                    del cache[j]
            r += 1
        out.append(stream)
    return out


# -- drain: the normaliser alone ------------------------------------------------------


def arrival_order(n: int, conns: int, tag: str) -> list[bytes]:
    """The order in which :func:`streams` messages reach the store when the connections
    send at the same pace: round-robin over the connections."""
    per = streams(n, conns, tag)
    return [m for group in itertools.zip_longest(*per) for m in group if m is not None]


def drain(url: str, n: int, batch: int = BATCH, *, order: str = "mix") -> dict[str, Any]:
    """``order`` "mix": the paced runs' arrival order (32 connections' staggered streams:
    most messages find their referral in the store, committed by an earlier batch);
    "loops": each loop's four messages back to back (mostly found in the same batch)."""
    engine = open_engine(url)
    upgrade(engine)
    payloads = arrival_order(n, 32, "B") if order == "mix" else messages(n, "B")
    for chunk in range(0, n, 1000):
        store(engine, payloads[chunk : chunk + 1000])
    shipped()  # load the mapping set before the clock starts
    proc = processor(engine)
    mapping_time = 0.0
    original = proc._normalise

    def timed(mapping_set, m):  # type: ignore[no-untyped-def]
        nonlocal mapping_time
        t = time.perf_counter()
        out = original(mapping_set, m)
        mapping_time += time.perf_counter() - t
        return out

    proc._normalise = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    done = 0
    while batch_ := proc.next_batch(batch):
        done += len(proc.process(batch_))
    elapsed = time.perf_counter() - started
    proc.close()
    with engine.connect() as conn:
        events = conn.execute(text("SELECT COUNT(*) FROM referral_events")).scalar_one()
        closed = conn.execute(
            text("SELECT COUNT(*) FROM referrals WHERE state = 'note_received'")
        ).scalar_one()
    engine.dispose()
    assert done == n, (done, n)
    return {
        "msgs": n,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "mapping_share": mapping_time / elapsed,
        "events": events,
        "note_received": closed,
        "order": order,
    }


# -- the daemon under test ----------------------------------------------------------------


@dataclass
class Daemon:
    port: int
    http: int
    proc: subprocess.Popen[bytes]

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http}/metrics", timeout=5).text


@contextlib.contextmanager
def daemon(url: str, workdir: Path, *, off: bool = False) -> Iterator[Daemon]:
    """``refloop run`` on ``url`` (migrated first), MLLP and HTTP on free ports, log level
    warning, the shipped mappings, the normaliser as configured by default (its own
    process) unless ``off``. Stopped with SIGTERM on exit."""
    engine = open_engine(url)
    upgrade(engine)
    engine.dispose()
    port, http = free_port(), free_port()
    config = workdir / f"daemon-{port}.toml"
    config.write_text(
        f'[database]\nurl = {json.dumps(url)}\nsqlite_synchronous = "FULL"\n'
        f'[http]\nhost = "127.0.0.1"\nport = {http}\n'
        f'[[mllp.listeners]]\nname = "bench"\nhost = "127.0.0.1"\nport = {port}\n'
        f'[logging]\nlevel = "warning"\nformat = "json"\n'
        f"[mappings]\ndir = {json.dumps(str(MAPPINGS))}\n"
        f"[normalizer]\nenabled = {'false' if off else 'true'}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    refloop = str(REPO / ".venv" / "bin" / "refloop")
    log = (workdir / f"daemon-{port}.log").open("wb")
    proc = subprocess.Popen(
        [refloop, "run", "--config", str(config)], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"daemon did not start; see {log.name}")
            time.sleep(0.1)
        d = Daemon(port, http, proc)
        if not off:
            # /readyz covers the listeners; the normaliser process starts beside them and
            # takes about a second more (a fresh interpreter, the mapping set). Its first
            # metrics report is the sign it runs: measure from there, not its start-up.
            while "refloop_mapping_reloads_total" not in d.metrics():
                if time.monotonic() > deadline + 15 or proc.poll() is not None:
                    raise RuntimeError(f"the normaliser did not start; see {log.name}")
                time.sleep(0.1)
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class BacklogSampler(threading.Thread):
    """Counts ``received`` (not yet normalised) messages every ``every`` seconds."""

    def __init__(self, url: str, every: float = SAMPLE_EVERY) -> None:
        super().__init__(name="backlog-sampler", daemon=True)
        self.engine = open_engine(url)
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (perf_counter, backlog)
        self._halt = threading.Event()

    def count(self, sql: str = BACKLOG_SQL) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.perf_counter()
            self.samples.append((t, self.count()))
            self._halt.wait(max(0.0, self.every - (time.perf_counter() - t)))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def wait_drained(self, timeout: float = 300.0) -> float:
        """Poll until nothing is ``received``; returns when (perf_counter)."""
        deadline = time.perf_counter() + timeout
        while (left := self.count()) > 0:
            self.samples.append((time.perf_counter(), left))
            if time.perf_counter() > deadline:
                raise RuntimeError(f"backlog still {left} after {timeout:.0f} s")
            time.sleep(0.05)
        return time.perf_counter()

    def close(self) -> None:
        self.engine.dispose()


class CpuMeter:
    """CPU seconds by role, from /proc: the daemon, its normaliser child, every
    ``postgres`` process, this process (sender + sampler), the load generators (reaped
    children), and the whole machine (busy jiffies of /proc/stat), so a run can show
    where both vCPUs went and whether something else was running."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.t0 = time.perf_counter()
        self.start = self.snapshot()

    @classmethod
    def _proc(cls, pid: int | str) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / cls.TICK

    def _children(self) -> list[str]:
        try:
            path = Path(f"/proc/{self.daemon_pid}/task/{self.daemon_pid}/children")
            return path.read_text().split()
        except OSError:
            return []

    def snapshot(self) -> dict[str, float]:
        normaliser = 0.0
        for pid in self._children():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                    normaliser += self._proc(pid)
        postgres = 0.0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == "postgres":
                        postgres += self._proc(entry.name)
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(cpu) if i not in (3, 4)) / self.TICK
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "daemon": self._proc(self.daemon_pid),
            "normaliser": normaliser,
            "postgres": postgres,
            "bench": self._proc(os.getpid()),
            "load": kids.ru_utime + kids.ru_stime,
            "machine": busy,
        }

    def percent(self) -> dict[str, float]:
        """Percent of one CPU per role since construction (the machine: of all CPUs x 100)."""
        end, dt = self.snapshot(), time.perf_counter() - self.t0
        out = {k: round(100 * (end[k] - self.start[k]) / dt, 1) for k in end}
        out["other"] = round(
            out["machine"] - sum(v for k, v in out.items() if k not in ("machine", "other")), 1
        )
        out["cpus"] = os.cpu_count() or 1
        return out


# -- received → committed ------------------------------------------------------------------


def lag_buckets(metrics: str) -> list[tuple[float, float]]:
    out = []
    for line in metrics.splitlines():
        if line.startswith("refloop_normalize_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out.append((float(le), float(line.split()[-1])))
    return sorted(out)


def bucket_bound(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper edge of the bucket holding quantile ``q`` (None without observations)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return math.inf


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation within the bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def wait_lag_metric(d: Daemon, expected: int, timeout: float = 6.0) -> str:
    """The normaliser process reports its metrics to the daemon once a second: wait until
    ``/metrics`` has every committed message in the lag histogram."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = d.metrics()
        buckets = lag_buckets(metrics)
        if (buckets and buckets[-1][1] >= expected) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.25)


def db_lags(engine: Engine, since: datetime | None = None) -> list[float]:
    """Exact received → normalised seconds per message, from the store (sorted); only
    messages received at or after ``since`` when given."""
    m = messages_table.c
    q = select(m.received_at, m.normalised_at).where(
        m.normalised_at.is_not(None), m.status.in_(DONE)
    )
    if since is not None:
        q = q.where(m.received_at >= since)
    with engine.connect() as conn:
        return sorted((n - r).total_seconds() for r, n in conn.execute(q))


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def lag_summary(d: Daemon, engine: Engine) -> dict[str, Any]:
    exact = db_lags(engine)
    buckets = lag_buckets(wait_lag_metric(d, len(exact)))
    return {
        "lag_count": len(exact),
        "lag_metric_count": buckets[-1][1] if buckets else 0,
        "lag_p50_s": histogram_quantile(buckets, 0.5),
        "lag_p99_s": histogram_quantile(buckets, 0.99),
        "lag_p50_le_s": bucket_bound(buckets, 0.5),
        "lag_p99_le_s": bucket_bound(buckets, 0.99),
        "lag_exact_p50_s": pct(exact, 0.5),
        "lag_exact_p99_s": pct(exact, 0.99),
        "lag_exact_max_s": exact[-1] if exact else None,
    }


def _closing_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        closed = conn.execute(
            text("SELECT COUNT(*) FROM referrals WHERE state = 'note_received'")
        ).scalar_one()
        parked = conn.execute(
            text("SELECT COUNT(*) FROM messages WHERE status = 'parked'")
        ).scalar_one()
    return {"note_received": int(closed), "parked_left": int(parked)}


# -- live: full rate with mllp_load -----------------------------------------------------------


def mllp_load_binary() -> Path:
    tmp = Path(os.environ.get("HL7BENCH_TMP") or Path(tempfile.gettempdir()) / "hl7bench")
    loader = Path(os.environ.get("MLLP_LOAD") or tmp / "bin" / "mllp_load")
    if not loader.exists():
        src = REPO.parent / "shared" / "bench" / "mllp_load.c"
        loader.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(loader), str(src)], check=True)
    return loader


def live(
    url: str, n: int, conns: int, workdir: Path, *, off: bool = False, file: Path | None = None
) -> dict[str, Any]:
    """The daemon as a subprocess, driven as fast as ACKs come back by ``conns`` mllp_load
    processes of one connection each, every one with its own file (:func:`streams`):
    one mllp_load with C connections would have them all send the same messages (its
    connection i sends messages i, i+1, ... of one file), so every loop 16 times over.
    With ``file``, one mllp_load -c ``conns`` -u sends that file (the old behaviour)."""
    loader = mllp_load_binary()
    with daemon(url, workdir, off=off) as d:
        base = [str(loader), "-p", str(d.port), "-w", "0", "-d", "120"]
        if file is not None:
            cmds = [[*base, "-c", str(conns), "-N", str(n), "-u", "-f", str(file)]]
        else:
            cmds = []
            for c, stream in enumerate(streams(n, conns, f"V{d.port % 1000:03d}")):
                hl7 = workdir / f"live-{d.port}-{c:02d}.hl7"
                hl7.write_bytes(b"\n\n".join(m.replace(b"\r", b"\n") for m in stream))
                cmds.append([*base, "-c", "1", "-N", str(len(stream)), "-f", str(hl7)])
        sampler = BacklogSampler(url)
        sampler.start()
        cpu = CpuMeter(d.proc.pid)
        started = time.perf_counter()
        loads = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for cmd in cmds]
        outs = [load.communicate()[0] for load in loads]
        acked_at = time.perf_counter()
        cpu_pct = cpu.percent()
        handled_at_last_ack = sampler.count(HANDLED_SQL)
        backlog_at_last_ack = sampler.count()
        sampler.stop()
        results = [json.loads(out or b"{}") for out in outs]
        if not all(r.get("acked_ok") for r in results):
            raise RuntimeError(f"mllp_load failed: {results}")
        drained_at = acked_at if off else sampler.wait_drained()
        eng = sampler.engine
        lag = {} if off else lag_summary(d, eng)
        counts = _closing_counts(eng)
        sampler.close()
    load_s = acked_at - started
    acked = sum(int(r.get("acked_ok", 0)) for r in results)
    p99s = sorted(float(r.get("lat_ms", {}).get("p99", 0.0)) for r in results)
    p50s = sorted(float(r.get("lat_ms", {}).get("p50", 0.0)) for r in results)
    return {
        "msgs": acked,
        "conns": conns,
        "errors": sum(
            int(r.get("acked_err", 0)) + int(r.get("timeouts", 0)) + int(r.get("conn_errors", 0))
            for r in results
        ),
        "ack_msgs_per_s": acked / load_s,
        # Per connection, then the median over connections: close to the pooled figure
        # when the connections are alike (they are: same messages, same daemon).
        "ack_p50_ms": statistics.median(p50s),
        "ack_p99_ms": statistics.median(p99s),
        "ack_p99_worst_conn_ms": p99s[-1],
        "load_seconds": load_s,
        "normalised_during_msgs_per_s": handled_at_last_ack / load_s if load_s else 0.0,
        "normalised_overall_msgs_per_s": acked / (drained_at - started),
        "backlog_max": max((b for _, b in sampler.samples), default=0),
        "backlog_at_last_ack": backlog_at_last_ack,
        "tail_after_last_ack_s": drained_at - acked_at,
        "cpu_pct": cpu_pct,
        **lag,
        **counts,
    }


# -- paced: a fixed offered rate ---------------------------------------------------------------


@dataclass
class SendStats:
    sent: int
    ok: int
    errors: int
    first_send: float  # perf_counter
    last_ack: float
    behind_max_s: float  # the latest a message left after its scheduled time
    ack_ms: list[float]


async def _paced_send(port: int, per_conn: Sequence[Sequence[bytes]], rate: float) -> SendStats:
    """One global schedule: the k-th message of connection c (of C) is due at
    start + (k * C + c) / rate, so together they offer ``rate`` msgs/s, evenly spaced.
    Each connection waits for its message's time, sends it and waits for the ACK (one in
    flight, as MLLP senders do); one that falls behind sends at once until it has caught
    up, and ``behind_max_s`` says how late a message left at worst."""
    loop = asyncio.get_running_loop()
    conns = len(per_conn)
    ack_ms: list[float] = []
    ok = errors = 0
    behind = 0.0
    last_ack = 0.0
    start = loop.time() + 0.2
    perf_offset = time.perf_counter() - loop.time()

    async def worker(c: int, frames: Sequence[bytes]) -> None:
        nonlocal ok, errors, behind, last_ack
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = FrameDecoder()
        pending: list[bytes] = []
        try:
            for k, frame in enumerate(frames):
                due = start + (k * conns + c) / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = loop.time()
                behind = max(behind, sent - due)
                writer.write(frame)
                while not pending:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        raise ConnectionError("the daemon closed the connection")
                    pending += [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
                ack = pending.pop(0)
                last_ack = max(last_ack, loop.time())
                ack_ms.append((loop.time() - sent) * 1000)
                if b"MSA|AA|" in ack or b"MSA|CA|" in ack:
                    ok += 1
                else:
                    errors += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    await asyncio.gather(*(worker(c, frames) for c, frames in enumerate(per_conn)))
    return SendStats(
        sent=ok + errors,
        ok=ok,
        errors=errors,
        first_send=start + perf_offset,
        last_ack=last_ack + perf_offset,
        behind_max_s=behind,
        ack_ms=sorted(ack_ms),
    )


def slope(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares trend of the backlog, messages per second."""
    if len(samples) < 3:
        return 0.0
    ts = [t for t, _ in samples]
    bs = [float(b) for _, b in samples]
    mt, mb = statistics.fmean(ts), statistics.fmean(bs)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (b - mb) for t, b in zip(ts, bs, strict=True)) / var if var else 0.0


def bounded(rate: float, growth: float) -> bool:
    """Bounded: the backlog's trend while sending (after the first second) is at most 5 %
    of the offered rate — the normaliser keeps at least ~95 % of the pace, which within
    one run's noise (batches of 256 make a saw-tooth) is keeping up. How big the standing
    backlog is shows in the lag, reported beside it."""
    return growth <= 0.05 * rate


def paced(
    url: str,
    rate: float,
    seconds: float,
    workdir: Path,
    *,
    conns: int = 32,
    every: float = SAMPLE_EVERY,
    off: bool = False,
) -> dict[str, Any]:
    """Offer ``rate`` msgs/s for ``seconds`` to a fresh daemon; sample the backlog.
    ``off``: the normaliser disabled (what ingest alone does at that rate)."""
    n = max(1, round(rate * seconds))
    with daemon(url, workdir, off=off) as d:
        per_conn = [
            [encode(m) for m in stream] for stream in streams(n, conns, f"P{d.port % 1000:03d}")
        ]
        sampler = BacklogSampler(url, every)
        sampler.start()
        cpu = CpuMeter(d.proc.pid)
        stats = asyncio.run(_paced_send(d.port, per_conn, rate))
        acked_at = time.perf_counter()
        cpu_pct = cpu.percent()
        handled_at_last_ack = sampler.count(HANDLED_SQL)
        backlog_end = sampler.count()
        sampler.stop()
        window = [(t, b) for t, b in sampler.samples if stats.first_send <= t <= acked_at]
        # The first second is the ramp from an empty store; the trend is what follows.
        steady = [(t, b) for t, b in window if t >= stats.first_send + 1.0]
        drained_at = acked_at if off else sampler.wait_drained()
        lag = {} if off else lag_summary(d, sampler.engine)
        if not off:
            # The first second includes the daemon's first batches (cold caches): the
            # steady state is what follows.
            wall = time.time() - (time.perf_counter() - stats.first_send) + 1.0
            later = db_lags(sampler.engine, datetime.fromtimestamp(wall, UTC))
            lag["lag_steady_p50_s"] = pct(later, 0.5)
            lag["lag_steady_p99_s"] = pct(later, 0.99)
        counts = _closing_counts(sampler.engine)
        sampler.close()
    send_s = stats.last_ack - stats.first_send
    growth = slope(steady)
    return {
        "offered_msgs_per_s": rate,
        "seconds": seconds,
        "conns": conns,
        "sent": stats.sent,
        "acked_ok": stats.ok,
        "errors": stats.errors,
        "sent_msgs_per_s": stats.sent / send_s if send_s > 0 else 0.0,
        "behind_max_s": stats.behind_max_s,
        "ack_p50_ms": pct(stats.ack_ms, 0.5),
        "ack_p99_ms": pct(stats.ack_ms, 0.99),
        "normalised_during_msgs_per_s": handled_at_last_ack / send_s if send_s > 0 else 0.0,
        "backlog_max": max((b for _, b in sampler.samples), default=0),
        "backlog_max_while_sending": max((b for _, b in window), default=0),
        "backlog_at_last_ack": backlog_end,
        "backlog_growth_per_s": growth,
        "bounded": bounded(rate, growth),
        "tail_after_last_ack_s": drained_at - acked_at,
        "cpu_pct": cpu_pct,
        "samples": [(round(t - stats.first_send, 3), b) for t, b in sampler.samples],
        **lag,
        **counts,
    }


# -- PostgreSQL schemas ------------------------------------------------------------------------


def pg_reachable(base: str) -> str | None:
    """None when ``base`` answers, else why not."""
    try:
        admin = create_engine(make_url(base).set(drivername="postgresql+psycopg"))
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
        admin.dispose()
    except Exception as exc:  # any reason is reported, not raised
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def pg_schema_url(base: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(base).set(drivername="postgresql+psycopg"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def drop_schema(base: str, schema: str) -> None:
    admin = create_engine(make_url(base).set(drivername="postgresql+psycopg"))
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@contextlib.contextmanager
def fresh_database(kind: str, pg: str | None, tmp: Path) -> Iterator[str]:
    """A URL to an empty database: a new SQLite file, or a new schema on ``pg``."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    assert pg is not None
    url, schema = pg_schema_url(pg)
    try:
        yield url
    finally:
        drop_schema(pg, schema)


# -- everything, for make bench ----------------------------------------------------------------


@dataclass
class Plan:
    n: int = 20000  # drain and full-rate messages
    conns: int = 16  # full rate: mllp_load connections
    paced_conns: int = 32
    seconds: float = 15.0  # each paced run
    # default paced rates: these fractions of the database's drain rate
    paced_factors: Sequence[float] = (0.4, 0.8)
    paced_rates: Sequence[float] = ()  # explicit rates (replace the factor), every database
    ingest_rates: dict[str, float] | None = None  # database -> foundation ingest rate
    paced_databases: Sequence[str] = ("sqlite", "postgresql")


def measure(
    pg: str | None,
    plan: Plan,
    *,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """drain, full-rate live and paced runs on SQLite and (when ``pg``) PostgreSQL; the
    dict :func:`report_lines` prints and bench/run.py stores."""
    kinds = ["sqlite", *(["postgresql"] if pg else [])]
    out: dict[str, Any] = {"kind": "normalise", "n": plan.n, "conns": plan.conns}
    out["drain"], out["live"], out["paced"] = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="refloop-norm-") as tmp_:
        tmp = Path(tmp_)
        for kind in kinds:
            progress(f"normaliser drain on {kind}: {plan.n} messages")
            with fresh_database(kind, pg, tmp) as url:
                out["drain"][kind] = d = drain(url, plan.n)
            progress(f"  {d['msgs_per_s']:,.0f} msgs/s")
        for kind in kinds:
            progress(f"full rate on {kind}: {plan.conns} x mllp_load -c 1, {plan.n} messages")
            with fresh_database(kind, pg, tmp) as url:
                out["live"][kind] = r = live(url, plan.n, plan.conns, tmp)
            progress(
                f"  ACKed {r['ack_msgs_per_s']:,.0f} msgs/s, backlog max {r['backlog_max']}, "
                f"drained {r['tail_after_last_ack_s']:.1f} s after the last ACK"
            )
        for kind in kinds:
            if kind not in plan.paced_databases:
                continue
            rates: list[tuple[str, float]] = []
            if plan.paced_rates:
                rates += [("--paced-rate", float(r)) for r in plan.paced_rates]
            else:
                drain_rate = out["drain"][kind]["msgs_per_s"]
                rates += [(f"{f:g} x drain", drain_rate * f) for f in plan.paced_factors]
            ingest = (plan.ingest_rates or {}).get(kind)
            if ingest:
                rates.append(("foundation ingest", ingest))
            for why, rate in rates:
                progress(f"paced on {kind}: {rate:,.0f} msgs/s ({why}) for {plan.seconds:g} s")
                with fresh_database(kind, pg, tmp) as url:
                    p = paced(url, rate, plan.seconds, tmp, conns=plan.paced_conns)
                p.update(database=kind, why=why)
                out["paced"].append(p)
                progress(
                    f"  sent {p['sent_msgs_per_s']:,.0f} msgs/s, normalised "
                    f"{p['normalised_during_msgs_per_s']:,.0f}; backlog max {p['backlog_max']}, "
                    f"{'bounded' if p['bounded'] else 'GROWING'}"
                )
    return out


# -- printing -----------------------------------------------------------------------------------


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 100 else f"{x:,.0f}")


def cpu_text(c: dict[str, float] | None) -> str:
    if not c:
        return "-"
    parts = [f"{k} {c[k]:.0f}" for k in ("daemon", "normaliser", "postgres", "bench", "load")]
    parts += [f"other {c['other']:.0f}"]
    return (
        f"CPU % of one core: {', '.join(p for p in parts if not p.endswith(' 0'))}; "
        f"machine {c['machine']:.0f} of {100 * int(c['cpus'])}"
    )


def _cpu_cell(c: dict[str, float] | None, sender: str) -> str:
    if not c:
        return "-"
    return " / ".join(
        f"{c.get(k, 0):.0f}" for k in ("daemon", "normaliser", "postgres", sender, "other")
    )


OTHER_WARN = 25.0  # % of a core used by processes outside the measurement


def report_lines(res: dict[str, Any]) -> list[str]:
    """Markdown: drain, full-rate and paced figures, with how to read them."""
    kinds = [k for k in ("sqlite", "postgresql") if k in res.get("drain", {})]
    names = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    dr, lv = res.get("drain", {}), res.get("live", {})
    c = res.get("conns", 16)
    lines = [
        "## Normalisation (after the ACK, in its own process)",
        "",
        f"Whole referral loops (ORM -> SIU S12 -> SIU S14 -> ORU; N = {res.get('n')} for "
        "drain and full rate), each connection sending its own referrals in order, "
        "staggered (drain: the same messages in the same order, already stored). "
        "lag = received -> normalisation committed, from "
        "`refloop_normalize_lag_seconds` (interpolated within its buckets); `exact` = "
        "messages.normalised_at - received_at. CPU = % of one core: daemon / normaliser "
        "process / PostgreSQL / load generator / anything else on the machine.",
        "",
    ]
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    lines += [
        "| | " + " | ".join(names[k] for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]

    def row(label: str, fn: Callable[[str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(k) for k in kinds) + " |")

    def lvf(fn: Callable[[dict[str, Any]], str]) -> Callable[[str], str]:
        return lambda k: fn(lv[k]) if k in lv else "-"

    row("drain: the normaliser alone, msgs/s", lambda k: _n(dr[k]["msgs_per_s"]))
    row("drain: share of its time spent mapping", lambda k: f"{dr[k]['mapping_share']:.0%}")
    row(f"full rate ({c} x mllp_load -c 1): ACKed msgs/s", lvf(lambda r: _n(r["ack_msgs_per_s"])))
    row(
        "full rate: ACK p50 / p99 ms",
        lvf(lambda r: f"{_ms(r['ack_p50_ms'])} / {_ms(r['ack_p99_ms'])}"),
    )
    row(
        "full rate: normalised msgs/s while sending",
        lvf(lambda r: _n(r["normalised_during_msgs_per_s"])),
    )
    row("full rate: highest backlog", lvf(lambda r: _n(r["backlog_max"])))
    row(
        "full rate: all normalised, s after the last ACK",
        lvf(lambda r: _s(r["tail_after_last_ack_s"])),
    )
    row(
        "full rate: lag p50 / p99 s",
        lvf(lambda r: f"{_s(r.get('lag_p50_s'))} / {_s(r.get('lag_p99_s'))}"),
    )
    row(
        "full rate: lag exact p50 / p99 s",
        lvf(lambda r: f"{_s(r.get('lag_exact_p50_s'))} / {_s(r.get('lag_exact_p99_s'))}"),
    )
    row(
        "full rate: CPU d / n / pg / load / other",
        lvf(lambda r: _cpu_cell(r.get("cpu_pct"), "load")),
    )
    notes: list[str] = []
    for k in kinds:
        if k in lv and lv[k].get("errors"):
            notes.append(f"WARNING: full rate on {names[k]}: {lv[k]['errors']} errors/timeouts")
        if k in lv and (lv[k].get("cpu_pct") or {}).get("other", 0) > OTHER_WARN:
            notes.append(
                f"WARNING: full rate on {names[k]}: something else used "
                f"{lv[k]['cpu_pct']['other']:.0f} % of a core during the run"
            )
    paced_runs = res.get("paced", [])
    if paced_runs:
        first = paced_runs[0]
        lines += [
            "",
            f"Paced: a fixed offered rate for {first['seconds']:g} s over {first['conns']} "
            "connections (one message in flight each), backlog sampled every "
            f"{SAMPLE_EVERY:g} s. growth = the backlog's trend while sending, after the first "
            "second (= offered - normalised); bounded = growth <= 5 % of the offered rate. "
            "CPU's 4th figure is this script (the sender and the sampler). "
            "foundation ingest = refloop-pg's ORM^O01 c=16 msgs/s (the peer table). "
            "The first second holds the daemon's first, slower batches: the lag after it "
            "is the steady state.",
            "",
            "| database | offered msgs/s | sent | ACK p50 / p99 ms | normalised msgs/s "
            "| max backlog | backlog at last ACK | growth msgs/s | drained after s "
            "| lag p50 / p99 s | exact p99 s: all / after 1st s "
            "| CPU d / n / pg / bench / other | bounded |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for p in paced_runs:
            db = names.get(p["database"], p["database"])
            lines.append(
                f"| {db} | {_n(p['offered_msgs_per_s'])} ({p['why']}) "
                f"| {_n(p['sent_msgs_per_s'])} "
                f"| {_ms(p['ack_p50_ms'])} / {_ms(p['ack_p99_ms'])} "
                f"| {_n(p['normalised_during_msgs_per_s'])} "
                f"| {_n(p['backlog_max_while_sending'])} | {_n(p['backlog_at_last_ack'])} "
                f"| {p['backlog_growth_per_s']:+,.0f} | {_s(p['tail_after_last_ack_s'])} "
                f"| {_s(p.get('lag_p50_s'))} / {_s(p.get('lag_p99_s'))} "
                f"| {_s(p.get('lag_exact_p99_s'))} / {_s(p.get('lag_steady_p99_s'))} "
                f"| {_cpu_cell(p.get('cpu_pct'), 'bench')} "
                f"| {'yes' if p['bounded'] else 'NO'} |"
            )
            label = f"paced {_n(p['offered_msgs_per_s'])} msgs/s on {db}"
            if p["errors"]:
                notes.append(f"WARNING: {label}: {p['errors']} NAKs/errors")
            if p["sent_msgs_per_s"] < 0.95 * p["offered_msgs_per_s"]:
                notes.append(
                    f"{label}: the sender fell behind ({_n(p['sent_msgs_per_s'])} msgs/s sent, "
                    f"up to {p['behind_max_s']:.1f} s late): ingest could not take the "
                    "offered rate"
                )
            if (p.get("cpu_pct") or {}).get("other", 0) > OTHER_WARN:
                notes.append(
                    f"WARNING: {label}: something else used "
                    f"{p['cpu_pct']['other']:.0f} % of a core during the run"
                )
    if notes:
        lines += ["", *notes]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--pg", default=None, help=f"PostgreSQL URL, e.g. {DEFAULT_PG}")
    ap.add_argument("--live", action="store_true", help="also run the whole daemon at full rate")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument(
        "--off", action="store_true", help="live and paced with the normaliser turned off"
    )
    ap.add_argument("--file", type=Path, default=None, help="live: send this message file")
    ap.add_argument(
        "--paced", type=float, action="append", default=[], help="paced run at RATE msgs/s"
    )
    ap.add_argument("--seconds", type=float, default=15.0, help="each paced run (default 15)")
    ap.add_argument("--paced-conns", type=int, default=32, help="paced connections (32)")
    ap.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    ap.add_argument(
        "--order", choices=("mix", "loops"), default="mix", help="drain: message order (mix)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    args = ap.parse_args()
    kinds = [args.only] if args.only else ["sqlite", *(["postgresql"] if args.pg else [])]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for kind in kinds:
            with fresh_database(kind, args.pg, tmp) as url:
                d = drain(url, args.n, order=args.order)
            results.append({"kind": "drain", "database": kind, **d})
            print(
                f"{kind:10} drain: {d['msgs']} msgs in {d['seconds']:.2f}s = "
                f"{d['msgs_per_s']:,.0f} msgs/s (mapping {d['mapping_share']:.0%} of the time); "
                f"{d['events']} events, {d['note_received']} referrals note_received",
                flush=True,
            )
        for kind in kinds if args.live else []:
            with fresh_database(kind, args.pg, tmp) as url:
                r = live(url, args.n, args.conns, tmp, off=args.off, file=args.file)
            results.append({"kind": "live", "database": kind, **r})
            print(
                f"{kind:10} live ({args.conns} conns, mllp_load): {r['msgs']} msgs ACKed "
                f"at {r['ack_msgs_per_s']:,.0f} msgs/s (ACK p99 {r['ack_p99_ms']:.1f} ms, "
                f"{r['errors']} errors); normalised {r['normalised_during_msgs_per_s']:,.0f} "
                f"msgs/s while sending; backlog max {r['backlog_max']}; all normalised "
                f"{r['tail_after_last_ack_s']:.2f}s after the last ACK; lag p50 "
                f"{_s(r.get('lag_p50_s'))}s p99 {_s(r.get('lag_p99_s'))}s (exact "
                f"{_s(r.get('lag_exact_p50_s'))} / {_s(r.get('lag_exact_p99_s'))}); "
                f"{r['note_received']} referrals note_received, {r['parked_left']} parked\n"
                f"{'':10} {cpu_text(r.get('cpu_pct'))}",
                flush=True,
            )
        for kind in kinds:
            for rate in args.paced:
                with fresh_database(kind, args.pg, tmp) as url:
                    p = paced(url, rate, args.seconds, tmp, conns=args.paced_conns, off=args.off)
                results.append({"kind": "paced", "database": kind, **p})
                print(
                    f"{kind:10} paced {rate:,.0f} msgs/s x {args.seconds:g}s: sent "
                    f"{p['sent_msgs_per_s']:,.0f} msgs/s (ACK p99 {_ms(p['ack_p99_ms'])} ms, "
                    f"{p['errors']} errors, up to {p['behind_max_s']:.2f}s late); normalised "
                    f"{p['normalised_during_msgs_per_s']:,.0f} msgs/s; backlog max "
                    f"{p['backlog_max_while_sending']}, at last ACK {p['backlog_at_last_ack']}, "
                    f"trend {p['backlog_growth_per_s']:+,.0f}/s -> "
                    f"{'bounded' if p['bounded'] else 'GROWING'}; drained "
                    f"{p['tail_after_last_ack_s']:.2f}s after; lag p50 {_s(p.get('lag_p50_s'))}s "
                    f"p99 {_s(p.get('lag_p99_s'))}s (exact {_s(p.get('lag_exact_p50_s'))} / "
                    f"{_s(p.get('lag_exact_p99_s'))}; after the first second "
                    f"{_s(p.get('lag_steady_p50_s'))} / {_s(p.get('lag_steady_p99_s'))})\n"
                    f"{'':10} {cpu_text(p.get('cpu_pct'))}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
