#!/usr/bin/env python3
"""Outbound: how many referral packets per second the daemon delivers through the
``mllp`` channel, and how long after the order's ACK each one reaches the specialist.

Theory of operation
-------------------
Everything is real and on 127.0.0.1:

* **the specialist** is an MLLP sink in its own process (this file with ``--sink``): an
  asyncio server on :mod:`engine.protocol.mllp` framing that answers every message AA
  (:func:`engine.protocol.ack.build_ack`) the moment it is read, and reports, per
  message, the arrival time (``time.monotonic()``: CLOCK_MONOTONIC, the same clock in
  every process on the machine), MSH-10, MSH-9 and the placer order number (RF1-6 of a
  REF^I12, else ORC-2). It listens twice: ``specialist`` (the packets) and ``ehr``
  (write-back; orders trigger none, but the channel must exist).
* **the daemon** is ``refloop run`` as a subprocess, configured like
  deploy/examples/closed-loop.toml: one ``ehr`` listener, ``[outbound] dir`` =
  deploy/examples/closed-loop (a new referral's REF^I12 goes to the cardiology practice
  over ``[channels.specialist]``), the shipped mappings, the normaliser in its own
  process (the default), log level ``warning``; on a fresh SQLite file (WAL,
  ``synchronous=FULL``) or a fresh schema on the local PostgreSQL, dropped afterwards.
* **the EHR** is an asyncio MLLP sender in this process: N synthetic ORM^O01 new orders
  (tests/loop_messages.py ``orm()``, a distinct placer number each) over a few
  connections, one message in flight per connection, either **paced** on one global
  schedule at a fixed offered rate, or as a **burst** (each connection sends its next
  order as soon as the previous one is ACKed). It records when each ACK came back.

Each run starts a fresh sink, daemon and database, waits for the normaliser process to
report, sends a few warm-up orders and waits for their packets (the first delivery
opens the channel's connection and warms the renderer; its latency is reported as
"cold"), then sends the N measured orders and waits (bounded) until all N packets have
arrived. Per run it reports:

* **deliveries/s** — packets arriving at the sink per second over the steady part (the
  10th to the 90th percentile of arrivals), and overall (all N over first ACK → last
  arrival);
* **ACK → delivery** p50 / p95 / p99 / max — the sink's arrival time minus the ACK time
  of the order that caused it, matched by placer number (a packet that never arrived
  counts as infinitely late);
* **where the time went**, from the outbox row of each packet (matched by MSH-10, which
  is derived from the delivery key): ACK → enqueued (``created_at``: the normaliser's
  write transaction), enqueued → claimed (``claimed_at``: the dispatcher took it),
  claimed → arrived (render, store the payload, send), arrived → recorded
  (``finished_at``: the ACK read and the outcome committed);
* what ``/metrics`` says at the end: ``refloop_deliveries_total`` by channel and outcome,
  and ``refloop_delivery_seconds`` (time in the channel) count, mean and p50/p99;
* CPU per process (daemon, normaliser, PostgreSQL, this process, the sink).

Usage: .venv/bin/python bench/deliver.py [--quick] [--pg postgresql://...|--no-pg]
       [--rate 50 --rate 200] [--seconds 15] [--burst 2000] [--conns 4] [--json out.json]
bench/run.py (``make bench``) calls :func:`measure` after the normaliser part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import normalise as nb  # noqa: E402  (the normaliser bench: schemas, CPU meter, figures)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from sqlalchemy import select, text  # noqa: E402

from channels.base import Envelope  # noqa: E402
from engine.outbound.model import PacketContext, Party  # noqa: E402
from engine.protocol.ack import build_ack  # noqa: E402
from engine.protocol.hl7v2 import HeaderError, parse_header  # noqa: E402
from engine.protocol.mllp import Frame, FrameDecoder, encode  # noqa: E402
from engine.services.dispatcher import DispatchStore, Outcome, control_id  # noqa: E402
from engine.store.database import open_engine, upgrade  # noqa: E402
from engine.store.eventlog import EventLog  # noqa: E402
from engine.store.schema import deliveries as deliveries_table  # noqa: E402
from tests.helpers import MAPPINGS, free_port  # noqa: E402
from tests.loop_messages import orm  # noqa: E402

EXAMPLE = REPO / "deploy" / "examples" / "closed-loop"
TARGET_P99_S = 1.0  # the issue's: ACK -> delivery p99 under 1 s with peers up
WARMUP = 3  # orders sent and delivered before the clock starts
STEADY = (0.10, 0.90)  # the arrivals the steady deliveries/s is measured over


def log(msg: str) -> None:
    print(f"[deliver {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the specialist: an MLLP sink in its own process -----------------------------------


def placer_of(payload: bytes) -> str:
    """RF1-6.1 (REF^I12), else ORC-2.1 (OMG, ORM status); "-" when neither is there."""
    found: dict[bytes, bytes] = {}
    for segment in payload.split(b"\r"):
        name = segment[:4]
        if name in (b"RF1|", b"ORC|") and name not in found:
            fields = segment.split(b"|")
            index = 6 if name == b"RF1|" else 2
            if len(fields) > index and fields[index]:
                found[name] = fields[index].split(b"^", 1)[0]
    value = found.get(b"RF1|") or found.get(b"ORC|") or b"-"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value.decode("latin-1"))


class _SinkLink(asyncio.Protocol):
    """One connection: ACK every frame at once, note its arrival."""

    def __init__(self, name: str, out: list[str], counter: list[int]) -> None:
        self.name = name
        self.out = out
        self.counter = counter
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        arrived = time.monotonic()
        assert self.transport is not None
        for event in self.decoder.feed(data):
            if not isinstance(event, Frame):
                continue
            try:
                header = parse_header(event.payload)
            except HeaderError:
                header = None
            self.counter[0] += 1
            ack = build_ack(
                header, "AA", control_id=f"SINK{self.counter[0]}", now=datetime.now(UTC)
            )
            self.transport.write(encode(ack))
            control = header.control_id if header else "-"
            kind = header.type_label if header else "-"
            self.out.append(
                f"A {self.name} {arrived:.6f} {placer_of(event.payload)} {control} {kind}\n"
            )


async def _sink(names: Sequence[str]) -> None:
    loop = asyncio.get_running_loop()
    out: list[str] = []
    counter = [0]
    servers = [
        await loop.create_server(
            lambda n=name: _SinkLink(n, out, counter),  # type: ignore[misc]
            "127.0.0.1",
            0,
        )
        for name in names
    ]
    ports = " ".join(
        f"{name}={s.sockets[0].getsockname()[1]}" for name, s in zip(names, servers, strict=True)
    )
    sys.stdout.write(f"PORTS {ports}\n")
    sys.stdout.flush()
    done = asyncio.Event()

    def wait_stdin() -> None:
        # The bench closes our stdin to stop us (and so does its death).
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=wait_stdin, daemon=True).start()
    while not done.is_set():
        # Arrival times are taken on arrival; reporting them in 5 ms batches only
        # delays when the bench learns of them, not what they say.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.005):
                await done.wait()
        if out:
            sys.stdout.write("".join(out))
            sys.stdout.flush()
            out.clear()
    for s in servers:
        s.close()
        await s.wait_closed()
    sys.stdout.write("END\n")
    sys.stdout.flush()


@dataclass(frozen=True, slots=True)
class Arrival:
    listener: str
    t: float  # time.monotonic() in the sink
    placer: str
    control: str
    kind: str


class Sink:
    """The sink subprocess, seen from the bench: its ports and what arrived so far."""

    def __init__(self, names: Sequence[str] = ("specialist", "ehr")) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--sink", *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "PORTS":
            self.close()
            raise RuntimeError("the MLLP sink did not start")
        self.ports = {k: int(v) for k, v in (p.split("=") for p in first[1:])}
        self.arrivals: list[Arrival] = []
        self._counts: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="sink-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 6 and parts[0] == "A":
                a = Arrival(parts[1], float(parts[2]), parts[3], parts[4], parts[5])
                with self._cond:
                    self.arrivals.append(a)
                    self._counts[a.listener] += 1
                    self._cond.notify_all()

    def count(self, listener: str) -> int:
        with self._cond:
            return self._counts[listener]

    def wait_for(self, listener: str, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._counts[listener] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def cpu_seconds(self) -> float:
        return nb.CpuMeter._proc(self.proc.pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            if hasattr(self, "_reader"):
                self._reader.join(5)
            self.proc.stdout.close()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the daemon under test ---------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    path: Path
    port: int  # the "ehr" MLLP listener
    http: int


#: Config overrides: {"outbound": {"poll_seconds": 0.05}, "channels.specialist": {...}}.
Overrides = Mapping[str, Mapping[str, Any]]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_config(
    url: str,
    workdir: Path,
    sink: Sink,
    *,
    enabled: bool = True,
    overrides: Overrides | None = None,
) -> DaemonConfig:
    """A config like deploy/examples/closed-loop.toml's, on ``url``, the channels pointed
    at ``sink``, MLLP and HTTP on free ports, then ``overrides``. ``enabled`` false:
    routing still enqueues (the channels exist) but nothing is sent."""
    port, http = free_port(), free_port()
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": url, "sqlite_synchronous": "FULL"},
        "http": {"host": "127.0.0.1", "port": http},
        "logging": {"level": "warning", "format": "json"},
        "mappings": {"dir": str(MAPPINGS)},
        "outbound": {
            "enabled": enabled,
            "dir": str(EXAMPLE),
            "sending_application": "REFLOOP",
            "sending_facility": "EXAMPLE",
        },
    }
    for name in ("specialist", "ehr"):
        sections[f"channels.{name}"] = {
            "type": "mllp",
            "host": "127.0.0.1",
            "port": sink.ports[name],
            "ack_timeout_seconds": 10,
            "backoff_initial_seconds": 2,
            "backoff_max_seconds": 30,
        }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    toml_text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
        for name, values in sections.items()
    )
    toml_text += f'[[mllp.listeners]]\nname = "ehr"\nhost = "127.0.0.1"\nport = {port}\n'
    path = workdir / f"deliver-{port}.toml"
    path.write_text(toml_text)
    return DaemonConfig(path, port, http)


@contextlib.contextmanager
def daemon(
    url: str,
    workdir: Path,
    sink: Sink,
    *,
    enabled: bool = True,
    overrides: Overrides | None = None,
) -> Iterator[nb.Daemon]:
    """``refloop run`` on :func:`write_config`'s config (the database migrated first).
    Waits for the normaliser process's first report; SIGTERM on exit."""
    engine = open_engine(url)
    upgrade(engine)
    engine.dispose()
    cfg = write_config(url, workdir, sink, enabled=enabled, overrides=overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    refloop = str(REPO / ".venv" / "bin" / "refloop")
    out = (workdir / f"deliver-{cfg.port}.log").open("wb")
    proc = subprocess.Popen(
        [refloop, "run", "--config", str(cfg.path)], env=env, stdout=out, stderr=out
    )
    try:
        deadline = time.monotonic() + 30
        d = nb.Daemon(cfg.port, cfg.http, proc)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{cfg.http}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"daemon did not start; see {out.name}")
            time.sleep(0.1)
        while "refloop_mapping_reloads_total" not in d.metrics():
            if time.monotonic() > deadline + 15 or proc.poll() is not None:
                raise RuntimeError(f"the normaliser did not start; see {out.name}")
            time.sleep(0.1)
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


# -- the EHR: orders over MLLP -------------------------------------------------------------


@dataclass
class Sent:
    acked: dict[str, float] = field(default_factory=dict)  # placer -> ACK time (monotonic)
    ack_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_send: float = math.inf
    last_ack: float = 0.0
    behind_max_s: float = 0.0


def orders(n: int, tag: str, conns: int) -> list[list[tuple[str, bytes]]]:
    """``n`` new orders, a new placer number and patient each, dealt to ``conns``
    connections in turn (order k on connection k % conns)."""
    per: list[list[tuple[str, bytes]]] = [[] for _ in range(conns)]
    for k in range(n):
        placer = f"{tag}{k:06d}"
        per[k % conns].append((placer, encode(orm(f"{placer}-O", placer, mrn=f"{k:07d}"))))
    return per


async def send_orders(
    port: int, per_conn: Sequence[Sequence[tuple[str, bytes]]], rate: float | None
) -> Sent:
    """Paced (``rate``): order k of connection c (of C) is due at start + (k*C + c)/rate,
    one global schedule; a connection that falls behind sends at once until it has
    caught up. Burst (None): each connection sends its next order when the ACK of the
    previous one is in. One message in flight per connection either way."""
    out = Sent()
    conns = len(per_conn)
    start = time.monotonic() + 0.2

    async def worker(c: int, frames: Sequence[tuple[str, bytes]]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = FrameDecoder()
        pending: list[bytes] = []
        try:
            for k, (placer, frame) in enumerate(frames):
                if rate is not None:
                    due = start + (k * conns + c) / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    out.behind_max_s = max(out.behind_max_s, time.monotonic() - due)
                sent = time.monotonic()
                out.first_send = min(out.first_send, sent)
                writer.write(frame)
                while not pending:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        raise ConnectionError("the daemon closed the connection")
                    pending += [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
                ack = pending.pop(0)
                now = time.monotonic()
                out.last_ack = max(out.last_ack, now)
                out.ack_ms.append((now - sent) * 1000)
                if b"MSA|AA|" in ack or b"MSA|CA|" in ack:
                    out.acked[placer] = now
                else:
                    out.errors += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    await asyncio.gather(*(worker(c, frames) for c, frames in enumerate(per_conn)))
    out.ack_ms.sort()
    return out


# -- figures -------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    return nb.pct(values, q)


def steady_rate(times: Sequence[float]) -> float | None:
    """Arrivals per second between the STEADY percentiles of sorted ``times``."""
    if len(times) < 20:
        return None
    lo, hi = (int(q * (len(times) - 1)) for q in STEADY)
    span = times[hi] - times[lo]
    return (hi - lo) / span if span > 0 else None


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 / max of sorted ``values``, in seconds."""
    return {
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "max": values[-1] if values else None,
    }


def read_metrics(page: str) -> dict[str, Any]:
    """The outbound families of one /metrics page: attempts by channel and outcome, and
    time in the channel per channel (count, mean, p50/p99 interpolated in the buckets)."""
    attempts: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            channel = s.labels.get("channel", "")
            if s.name == "refloop_deliveries_total" and s.value:
                attempts.setdefault(channel, {})[s.labels["outcome"]] = s.value
            elif s.name == "refloop_delivery_seconds_bucket":
                buckets.setdefault(channel, []).append((float(s.labels["le"]), s.value))
            elif s.name == "refloop_delivery_seconds_sum":
                sums[channel] = s.value
            elif s.name == "refloop_delivery_seconds_count":
                counts[channel] = s.value
    seconds = {}
    for channel, bs in buckets.items():
        bs.sort()
        n = counts.get(channel, 0.0)
        seconds[channel] = {
            "count": n,
            "mean_s": sums.get(channel, 0.0) / n if n else None,
            "p50_s": nb.histogram_quantile(bs, 0.5),
            "p99_s": nb.histogram_quantile(bs, 0.99),
        }
    return {"deliveries_total": attempts, "delivery_seconds": seconds}


def wait_metrics(d: nb.Daemon, channel: str, expected: int, timeout: float = 10.0) -> str:
    """The outcome is counted after the record commits, just after the sink has the
    packet: wait until /metrics counts every delivery (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        page = d.metrics()
        done = sum(read_metrics(page)["deliveries_total"].get(channel, {}).values())
        if done >= expected or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def _aware(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)


def stages(
    url: str, acked: dict[str, float], arrivals: dict[str, Arrival], wall_minus_mono: float
) -> tuple[dict[str, dict[str, float | None]], Counter[str]]:
    """Per packet, from its outbox row: ACK → enqueued → claimed → arrived → recorded
    (seconds, p50/p95/p99/max of each stage), and the rows' statuses."""
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(select(deliveries_table)))
    finally:
        engine.dispose()
    statuses: Counter[str] = Counter(f"{r.channel}:{r.status}" for r in rows)
    by_control = {a.control: a for a in arrivals.values()}
    parts: dict[str, list[float]] = {
        "ack_to_enqueued": [],
        "enqueued_to_claimed": [],
        "claimed_to_arrived": [],
        "arrived_to_recorded": [],
    }
    for r in rows:
        a = by_control.get(control_id(r.key))
        if a is None or a.placer not in acked or r.claimed_at is None:
            continue
        created = _aware(r.created_at).timestamp()  # type: ignore[union-attr]
        claimed = _aware(r.claimed_at).timestamp()  # type: ignore[union-attr]
        arrived = a.t + wall_minus_mono
        parts["ack_to_enqueued"].append(created - (acked[a.placer] + wall_minus_mono))
        parts["enqueued_to_claimed"].append(claimed - created)
        parts["claimed_to_arrived"].append(arrived - claimed)
        if r.finished_at is not None:
            parts["arrived_to_recorded"].append(_aware(r.finished_at).timestamp() - arrived)  # type: ignore[union-attr]
    return {k: summary(sorted(v)) for k, v in parts.items()}, statuses


class Analyzer(threading.Thread):
    """``ANALYZE deliveries`` every ``every`` seconds (PostgreSQL): the statistics a busy
    server's autovacuum would keep, for comparing the claim query with and without them.
    A diagnostic (``--pg-analyze-every``), not part of the default runs."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(name="analyzer", daemon=True)
        self.engine = open_engine(url)
        self.every = every
        self.runs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            with contextlib.suppress(Exception), self.engine.begin() as conn:
                conn.execute(text("ANALYZE deliveries"))
                self.runs += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.engine.dispose()


@contextlib.contextmanager
def analyzing(url: str, every: float | None) -> Iterator[None]:
    if not every or not url.startswith("postgresql"):
        yield
        return
    a = Analyzer(url, every)
    a.start()
    try:
        yield
    finally:
        a.stop()


# -- one run ---------------------------------------------------------------------------------


def run(
    url: str,
    n: int,
    rate: float | None,
    workdir: Path,
    *,
    conns: int = 4,
    wait_seconds: float = 120.0,
    overrides: Overrides | None = None,
    analyze_every: float | None = None,
) -> dict[str, Any]:
    """A fresh sink and daemon on ``url``; ``n`` orders paced at ``rate`` (None: burst)."""
    with (
        Sink() as sink,
        daemon(url, workdir, sink, overrides=overrides) as d,
        analyzing(url, analyze_every),
    ):
        tag = f"D{d.port % 1000:03d}"
        warm = orders(WARMUP, f"W{tag}", 1)
        w = asyncio.run(send_orders(d.port, warm, None))
        if not sink.wait_for("specialist", WARMUP, 60):
            raise RuntimeError("the warm-up packets did not arrive within 60 s")
        cold = [a.t - w.acked[a.placer] for a in sink.arrivals if a.placer in w.acked]
        per_conn = orders(n, tag, conns)
        cpu = nb.CpuMeter(d.proc.pid)
        sink_cpu0 = sink.cpu_seconds()
        sent = asyncio.run(send_orders(d.port, per_conn, rate))
        complete = sink.wait_for("specialist", WARMUP + n, wait_seconds)
        waited_until = time.monotonic()
        cpu_pct = cpu.percent()
        _add_sink_cpu(cpu_pct, sink, sink_cpu0, cpu.t0)
        metrics_text = wait_metrics(d, "specialist", WARMUP + n)
        arrivals_all = list(sink.arrivals)
        wall_minus_mono = time.time() - time.monotonic()
        stage, statuses = stages(
            url,
            sent.acked,
            {a.placer: a for a in arrivals_all if a.listener == "specialist"},
            wall_minus_mono,
        )
    packets = [a for a in arrivals_all if a.listener == "specialist" and a.placer in sent.acked]
    first: dict[str, Arrival] = {}
    for a in packets:
        first.setdefault(a.placer, a)
    duplicates = len(packets) - len(first)
    times = sorted(a.t for a in first.values())
    lat = sorted(a.t - sent.acked[p] for p, a in first.items())
    missing = len(sent.acked) - len(first)
    lat_all = lat + [math.inf] * missing
    send_s = sent.last_ack - sent.first_send
    last_arrival = times[-1] if times else math.nan
    return {
        "mode": "burst" if rate is None else "paced",
        "offered_msgs_per_s": rate,
        "orders": n,
        "conns": conns,
        "acked": len(sent.acked),
        "errors": sent.errors,
        "sent_msgs_per_s": len(sent.acked) / send_s if send_s > 0 else None,
        "behind_max_s": sent.behind_max_s,
        "ack_p50_ms": pct(sent.ack_ms, 0.5),
        "ack_p99_ms": pct(sent.ack_ms, 0.99),
        "delivered": len(first),
        "missing": missing,
        "complete": complete,
        "duplicates": duplicates,
        "ehr_arrivals": sum(1 for a in arrivals_all if a.listener == "ehr"),
        "deliveries_per_s_steady": steady_rate(times),
        "deliveries_per_s_overall": (
            len(first) / (last_arrival - sent.first_send) if len(first) > 1 else None
        ),
        "last_arrival_after_last_ack_s": (
            last_arrival - sent.last_ack if times else waited_until - sent.last_ack
        ),
        "latency_s": summary(lat_all),
        "cold_latency_s": max(cold) if cold else None,
        "stages_s": stage,
        "outbox": dict(statuses),
        "metrics": read_metrics(metrics_text),
        "cpu_pct": cpu_pct,
    }


def _add_sink_cpu(cpu_pct: dict[str, float], sink: Sink, since: float, t0: float) -> None:
    """The sink's share, taken out of CpuMeter's "other" (it is a child not yet reaped)."""
    cpu_pct["sink"] = round(100 * (sink.cpu_seconds() - since) / (time.perf_counter() - t0), 1)
    cpu_pct["other"] = round(cpu_pct["other"] - cpu_pct["sink"], 1)


def outbox_size(url: str, channel: str = "specialist") -> int:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return len(
                conn.execute(
                    select(deliveries_table.c.id).where(deliveries_table.c.channel == channel)
                ).all()
            )
    finally:
        engine.dispose()


def enqueue(url: str, n: int, workdir: Path, sink: Sink, tag: str, conns: int = 4) -> None:
    """``n`` orders into a daemon with ``[outbound] enabled = false``: routing enqueues
    their packets, nothing sends them. Returns once all ``n`` are in the outbox."""
    with daemon(url, workdir, sink, enabled=False) as d:
        sent = asyncio.run(send_orders(d.port, orders(n, tag, conns), None))
        if sent.errors:
            raise RuntimeError(f"{sent.errors} orders NAKed")
        deadline = time.monotonic() + 120
        while outbox_size(url) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {outbox_size(url)} of {n} packets enqueued")
            time.sleep(0.2)


def drain(
    url: str,
    n: int,
    workdir: Path,
    *,
    wait_seconds: float = 120.0,
    overrides: Overrides | None = None,
    analyze_every: float | None = None,
) -> dict[str, Any]:
    """The dispatcher alone: ``n`` packets already in the outbox (:func:`enqueue`), then a
    daemon with outbound on delivers them with nothing else to do."""
    with Sink() as sink:
        enqueue(url, n, workdir, sink, "Q")
        with (
            daemon(url, workdir, sink, overrides=overrides) as d,
            analyzing(url, analyze_every),
        ):
            cpu = nb.CpuMeter(d.proc.pid)
            sink_cpu0 = sink.cpu_seconds()
            complete = sink.wait_for("specialist", n, wait_seconds)
            cpu_pct = cpu.percent()
            _add_sink_cpu(cpu_pct, sink, sink_cpu0, cpu.t0)
            metrics = read_metrics(wait_metrics(d, "specialist", n))
        times = sorted(a.t for a in sink.arrivals if a.listener == "specialist")
    return {
        "orders": n,
        "delivered": len(times),
        "complete": complete,
        "deliveries_per_s_steady": steady_rate(times),
        "seconds": times[-1] - times[0] if times else None,
        "cpu_pct": cpu_pct,
        "metrics": metrics,
    }


PHASES = ("claim", "context", "render", "save_render", "send", "record")


async def _phases(url: str, config_path: Path, n: int) -> dict[str, Any]:
    """The dispatcher's steps for each queued packet, one after another, timed (wall and
    this thread's CPU): the same store, renderer, directory and channel the daemon uses,
    in this process, without the overlap (the daemon sends one packet while its store
    thread works on the next)."""
    # Here, not at the top: the sink subprocess imports this file and needs none of it.
    from engine.config import load_config
    from engine.edges.daemon import build_channels, load_mappings
    from engine.metrics import Metrics
    from engine.outbound.packets.registry import renderers

    config = load_config(config_path)
    holder = load_mappings(config, Metrics())
    channels = build_channels(config)
    channel = channels["specialist"][0]
    render = renderers()
    engine = open_engine(url)
    store = DispatchStore(engine)
    sender = Party(config.outbound.sending_application, config.outbound.sending_facility)
    wall = dict.fromkeys(PHASES, 0.0)
    cpu = dict.fromkeys(PHASES, 0.0)
    claims = 0
    kept: list[tuple[str, PacketContext]] = []

    def timed(phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            wall[phase] += time.perf_counter() - t
            cpu[phase] += time.thread_time() - c

    done = 0
    try:
        while done < n:
            claimed = timed(
                "claim", store.claim, datetime.now(UTC), "bench-phases", {"specialist": 4}
            )
            claims += 1
            if not claimed:
                break
            for d in claimed:
                recipient = holder.outbound.specialist(d.recipient_id) if d.recipient_id else None
                options = holder.outbound.options(d.route_id)
                ctx = timed(
                    "context", store.context, d, datetime.now(UTC), sender, recipient, options
                )
                rendered = timed("render", render[d.format], ctx)
                timed("save_render", store.save_render, d, rendered)
                envelope = Envelope(
                    idempotency_key=d.key,
                    delivery_id=d.id,
                    referral_id=d.referral_id,
                    kind=d.kind,
                    payload=rendered.payload,
                    content_type=rendered.content_type,
                    attempt=d.attempts,
                    endpoint=d.endpoint,
                    metadata={**rendered.metadata, "control_id": control_id(d.key)},
                )
                t, c = time.perf_counter(), time.thread_time()
                receipt = await channel.send(envelope)
                wall["send"] += time.perf_counter() - t
                cpu["send"] += time.thread_time() - c
                outcome = Outcome("delivered" if receipt.confirmed else "sent", receipt=receipt)
                timed("record", store.record, d, outcome, datetime.now(UTC))
                if len(kept) < 50:
                    kept.append((d.format, ctx))
                done += 1
    finally:
        store.close()
        for ch, _settings in channels.values():
            await ch.aclose()
        engine.dispose()

    # hl7apy's share of a render: the same contexts rendered again under cProfile.
    def again() -> None:
        for fmt, ctx in kept:
            render[fmt](ctx)

    prof = cProfile.Profile()
    prof.runcall(again)
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = validate = hl7apy = 0.0
    for (filename, _line, func), (_cc, _nc, tottime, cumtime, _callers) in stats.items():
        if func == "again":
            total = cumtime
        elif func == "validate" and filename.endswith("hl7v2_validate.py"):
            validate += cumtime
        if f"{os.sep}hl7apy{os.sep}" in filename:
            hl7apy += tottime
    per = {k: 1000 * v / done for k, v in wall.items()} if done else {}
    store_ms = sum(v for k, v in per.items() if k != "send")
    return {
        "packets": done,
        "claims": claims,
        "wall_ms": per,
        "cpu_ms": {k: 1000 * v / done for k, v in cpu.items()} if done else {},
        "store_thread_ms": store_ms,
        "ceiling_per_s": 1000 / store_ms if store_ms else None,
        "validate_share_of_render": validate / total if total else None,
        "hl7apy_share_of_render": hl7apy / total if total else None,
    }


def phases(url: str, n: int, workdir: Path) -> dict[str, Any]:
    """:func:`_phases` over ``n`` packets queued by a real daemon (:func:`enqueue`)."""
    with Sink() as sink:
        enqueue(url, n, workdir, sink, "F")
        cfg = write_config(url, workdir, sink)
        return asyncio.run(_phases(url, cfg.path, n))


def claim_plan(url: str, n: int, workdir: Path, *, looks: int = 200) -> dict[str, Any]:
    """PostgreSQL: the dispatcher's claim query ("due") over ``n`` queued packets, before
    and after ``ANALYZE deliveries``: EXPLAIN ANALYZE's execution time and plan, and the
    mean of ``looks`` claims of one packet each (each finished at once, as the daemon
    claims one packet per freed slot)."""
    with Sink() as sink:
        enqueue(url, n, workdir, sink, "E")
    engine = open_engine(url)
    raw = engine.raw_connection()
    out: dict[str, Any] = {"packets": n}
    try:
        log_ = EventLog(raw.driver_connection, "postgresql")
        ob = log_.outbox
        cur = raw.driver_connection.cursor()
        for label in ("no_statistics", "analyzed"):
            if label == "analyzed":
                cur.execute("ANALYZE deliveries")
                raw.driver_connection.commit()
            cur.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + ob.sql["due"],
                (datetime.now(UTC), ["specialist"], 4),
            )
            plan = cur.fetchone()[0][0]
            raw.driver_connection.rollback()
            took: list[float] = []
            for _ in range(looks):
                t = time.perf_counter()
                got = ob.claim(datetime.now(UTC), "bench-explain", 1, ["specialist"])
                took.append(time.perf_counter() - t)
                for d in got:
                    ob.begin()
                    ob.finish(d.id, "delivered", datetime.now(UTC))
                    ob.commit()
            took.sort()
            out[label] = {
                "explain_ms": plan["Execution Time"],
                "plan": _plan_lines(plan["Plan"]),
                "claim_mean_ms": 1000 * statistics.fmean(took),
                "claim_p50_ms": 1000 * took[len(took) // 2],
            }
    finally:
        raw.close()
        engine.dispose()
    return out


def _plan_lines(node: dict[str, Any], depth: int = 0) -> list[str]:
    """EXPLAIN's JSON tree as short lines: node type, index, actual rows x loops."""
    what = " ".join(x for x in (node.get("Join Type", ""), node["Node Type"]) if x and x != "Inner")
    what += f" using {node['Index Name']}" if "Index Name" in node else ""
    rows = f"{node.get('Actual Rows', '?')} rows x {node.get('Actual Loops', '?')}"
    out = [f"{'  ' * depth}{what} ({rows})"]
    for child in node.get("Plans", []):
        out += _plan_lines(child, depth + 1)
    return out


# -- everything, for make bench ----------------------------------------------------------------


@dataclass
class Plan:
    rates: Sequence[float] = (10.0, 50.0, 200.0)  # paced offered orders/s
    seconds: float = 15.0  # each paced run
    burst: int = 1000  # orders in the burst run (0: none)
    conns: int = 4
    wait_seconds: float = 120.0  # for the last packet, after the last order's ACK
    databases: Sequence[str] = ("sqlite", "postgresql")
    overrides: Overrides = field(default_factory=dict)  # config settings (diagnostics)
    analyze_every: float | None = None  # PostgreSQL: ANALYZE deliveries this often (diagnostic)
    drain: int = 600  # packets queued first, then delivered by the dispatcher alone (0: none)
    phases: int = 300  # packets through the dispatcher's steps one by one, timed (0: none)


QUICK = Plan(seconds=5.0, burst=400, wait_seconds=30.0, drain=0, phases=150)


def measure(
    pg: str | None, plan: Plan, *, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """The paced and burst runs on each database of ``plan`` (PostgreSQL only with
    ``pg``); the dict :func:`report_lines` prints and bench/run.py stores."""
    kinds = [k for k in plan.databases if k == "sqlite" or (k == "postgresql" and pg)]
    out: dict[str, Any] = {
        "kind": "deliver",
        "conns": plan.conns,
        "seconds": plan.seconds,
        "overrides": {k: dict(v) for k, v in plan.overrides.items()},
        "analyze_every": plan.analyze_every,
        "runs": [],
        "drain": {},
        "phases": {},
    }
    loads: list[tuple[str, float | None, int]] = [
        (f"{r:g}/s", r, max(1, round(r * plan.seconds))) for r in plan.rates
    ]
    if plan.burst:
        loads.append(("burst", None, plan.burst))
    with tempfile.TemporaryDirectory(prefix="refloop-deliver-") as tmp_:
        tmp = Path(tmp_)
        for kind in kinds:
            for label, rate, n in loads:
                progress(f"{kind}: {n} orders, {label} over {plan.conns} connections")
                with nb.fresh_database(kind, pg, tmp) as url:
                    r = run(
                        url,
                        n,
                        rate,
                        tmp,
                        conns=plan.conns,
                        wait_seconds=plan.wait_seconds,
                        overrides=plan.overrides,
                        analyze_every=plan.analyze_every,
                    )
                r["database"] = kind
                out["runs"].append(r)
                lat = r["latency_s"]
                progress(
                    f"  {r['delivered']}/{n} delivered, "
                    f"{_n(r['deliveries_per_s_steady'])} deliveries/s steady; ACK -> delivery "
                    f"p50 {_s(lat['p50'])} s, p99 {_s(lat['p99'])} s"
                )
            if plan.drain:
                progress(f"{kind}: dispatcher drain, {plan.drain} packets queued first")
                with nb.fresh_database(kind, pg, tmp) as url:
                    out["drain"][kind] = dr = drain(
                        url,
                        plan.drain,
                        tmp,
                        wait_seconds=plan.wait_seconds,
                        overrides=plan.overrides,
                        analyze_every=plan.analyze_every,
                    )
                progress(f"  {_n(dr['deliveries_per_s_steady'])} deliveries/s")
            if plan.phases:
                progress(f"{kind}: the dispatcher's steps one by one, {plan.phases} packets")
                with nb.fresh_database(kind, pg, tmp) as url:
                    out["phases"][kind] = ph = phases(url, plan.phases, tmp)
                progress(
                    f"  {ph['store_thread_ms']:.1f} ms of store-thread work per packet "
                    f"(render {ph['wall_ms']['render']:.1f} ms)"
                )
    return out


# -- printing -----------------------------------------------------------------------------------

_n, _s, _ms = nb._n, nb._s, nb._ms
NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _stage(r: dict[str, Any], name: str) -> str:
    s = r["stages_s"].get(name) or {}
    return f"{_ms_s(s.get('p50'))} / {_ms_s(s.get('p99'))}"


def _ms_s(x: float | None) -> str:
    """Seconds as ms."""
    return "-" if x is None else _ms(1000 * x)


def _channel_cell(r: dict[str, Any]) -> str:
    m = r["metrics"]
    outcomes = m["deliveries_total"].get("specialist", {})
    secs = m["delivery_seconds"].get("specialist", {})
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(outcomes.items())) or "none"
    return f"{parts}; {_ms_s(secs.get('mean_s'))} / {_ms_s(secs.get('p99_s'))}"


def report_lines(res: dict[str, Any]) -> list[str]:
    """Markdown: one row per run, the stage breakdown, the /metrics view, and notes."""
    runs = res.get("runs", [])
    lines = [
        "## Outbound: referral packets through the mllp channel",
        "",
        f"N synthetic ORM^O01 new orders over {res.get('conns')} MLLP connections to a fresh "
        "daemon (deploy/examples/closed-loop routes: each new referral's REF^I12 goes to an "
        "MLLP sink that ACKs AA at once). deliveries/s = packets arriving at the sink per "
        f"second between its {STEADY[0]:.0%} and {STEADY[1]:.0%} arrivals (overall: all "
        "N over first send -> last arrival); ACK -> delivery = arrival at the sink minus the "
        "order's ACK (same placer number); a missing packet counts as infinitely late. "
        f"Target: p99 < {TARGET_P99_S:g} s.",
        "",
    ]
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    for section, values in (res.get("overrides") or {}).items():
        set_ = ", ".join(f"{k} = {_toml(v)}" for k, v in values.items())
        lines += [f"Config changed for this run: [{section}] {set_}", ""]
    if res.get("analyze_every"):
        lines += [
            f"PostgreSQL: `ANALYZE deliveries` every {res['analyze_every']:g} s during each run "
            "(a diagnostic: the statistics autovacuum would keep on a busy server)",
            "",
        ]
    lines += [
        "| database | load | orders | sent msgs/s | delivered | deliveries/s steady / overall "
        "| ACK -> delivery p50 / p95 / p99 / max s | last after last ACK s | cold s "
        "| CPU d / n / pg / bench / sink | p99 < 1 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: list[str] = []
    for r in runs:
        db = NAMES.get(r["database"], r["database"])
        load = "burst" if r["mode"] == "burst" else f"paced {_n(r['offered_msgs_per_s'])}/s"
        lat = r["latency_s"]
        p99 = lat["p99"]
        ok = p99 is not None and p99 < TARGET_P99_S
        cpu = r.get("cpu_pct") or {}
        cpu_cell = " / ".join(
            f"{cpu.get(k, 0):.0f}" for k in ("daemon", "normaliser", "postgres", "bench", "sink")
        )
        lines.append(
            f"| {db} | {load} | {r['orders']:,} | {_n(r['sent_msgs_per_s'])} "
            f"| {r['delivered']:,} | {_n(r['deliveries_per_s_steady'])} / "
            f"{_n(r['deliveries_per_s_overall'])} "
            f"| {_s(lat['p50'])} / {_s(lat['p95'])} / {_s(p99)} / {_s(lat['max'])} "
            f"| {_s(r['last_arrival_after_last_ack_s'])} | {_s(r['cold_latency_s'])} "
            f"| {cpu_cell} | {'PASS' if ok else 'MISS'} |"
        )
        label = f"{db} {load}"
        if r["errors"]:
            notes.append(f"WARNING: {label}: {r['errors']} orders NAKed")
        if r["missing"]:
            notes.append(f"{label}: {r['missing']} packets had not arrived when the wait ended")
        if r["duplicates"]:
            notes.append(f"{label}: {r['duplicates']} packets arrived more than once")
        if r["ehr_arrivals"]:
            notes.append(f"{label}: {r['ehr_arrivals']} unexpected write-backs at the EHR sink")
        if r["mode"] == "paced" and (r["sent_msgs_per_s"] or 0) < 0.95 * r["offered_msgs_per_s"]:
            notes.append(f"{label}: the sender fell behind ({_n(r['sent_msgs_per_s'])} msgs/s)")
        if cpu.get("other", 0) > nb.OTHER_WARN:
            notes.append(f"WARNING: {label}: something else used {cpu['other']:.0f} % of a core")
    lines += [
        "",
        "Where the time went (ms, p50 / p99), from each packet's outbox row: enqueued = the "
        "normaliser's write transaction (created_at), claimed = the dispatcher took it "
        "(claimed_at), arrived = at the sink, recorded = outcome committed (finished_at). "
        'channel = /metrics refloop_deliveries_total{channel="specialist"} by outcome; '
        "refloop_delivery_seconds mean / p99 (ms, time in the channel).",
        "",
        "| database | load | ACK -> enqueued | enqueued -> claimed | claimed -> arrived "
        "| arrived -> recorded | channel (/metrics) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        db = NAMES.get(r["database"], r["database"])
        load = "burst" if r["mode"] == "burst" else f"paced {_n(r['offered_msgs_per_s'])}/s"
        lines.append(
            f"| {db} | {load} | {_stage(r, 'ack_to_enqueued')} "
            f"| {_stage(r, 'enqueued_to_claimed')} | {_stage(r, 'claimed_to_arrived')} "
            f"| {_stage(r, 'arrived_to_recorded')} | {_channel_cell(r)} |"
        )
    drains, steps = res.get("drain", {}), res.get("phases", {})
    if drains:
        lines += [
            "",
            "Dispatcher drain: packets enqueued by a daemon with `[outbound] enabled = false`, "
            "then a daemon with it on delivers them, with no inbound traffic: the "
            "dispatcher's own ceiling.",
            "",
            "| database | packets | deliveries/s | CPU d / n / pg / sink | channel (/metrics) |",
            "|---|---:|---:|---:|---|",
        ]
        for kind, dr in drains.items():
            cpu = dr.get("cpu_pct") or {}
            cpu_cell = " / ".join(
                f"{cpu.get(k, 0):.0f}" for k in ("daemon", "normaliser", "postgres", "sink")
            )
            lines.append(
                f"| {NAMES.get(kind, kind)} | {dr['delivered']:,} "
                f"| {_n(dr['deliveries_per_s_steady'])} | {cpu_cell} | {_channel_cell(dr)} |"
            )
    if steps:
        names = list(PHASES)
        lines += [
            "",
            "The dispatcher's steps, one packet after another in the bench process (same "
            "store, renderer, directory and channel; no overlap), ms per packet, wall "
            "(CPU of the thread). claim is per look (up to 4 packets) shared out; store "
            "thread = everything but send, which the daemon runs on one thread for all "
            "deliveries: 1000 / that is its ceiling in deliveries/s.",
            "",
            "| database | " + " | ".join(names) + " | store thread | ceiling /s "
            "| hl7apy share of render |",
            "|---|" + "---:|" * (len(names) + 3),
        ]
        for kind, ph in steps.items():
            cells = " | ".join(
                f"{ph['wall_ms'].get(k, 0):.1f} ({ph['cpu_ms'].get(k, 0):.1f})" for k in names
            )
            share = ph.get("hl7apy_share_of_render")
            validate = ph.get("validate_share_of_render")
            lines.append(
                f"| {NAMES.get(kind, kind)} | {cells} | {ph['store_thread_ms']:.1f} "
                f"| {_n(ph['ceiling_per_s'])} "
                f"| {'-' if share is None else f'{share:.0%}'}"
                f"{'' if validate is None else f' (validate() {validate:.0%})'} |"
            )
    if notes:
        lines += ["", *notes]
    return lines


def parse_sets(items: Sequence[str], ap: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not section or not name:
            ap.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            ap.error(f"--set {item!r}: VALUE is not a TOML value (quote text)")
        out.setdefault(section, {})[name] = value
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sink":
        asyncio.run(_sink(sys.argv[2:] or ["specialist"]))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="5-second paced runs, a 400 burst, no drain"
    )
    ap.add_argument("--pg", default=nb.DEFAULT_PG, help=f"PostgreSQL (default {nb.DEFAULT_PG})")
    ap.add_argument("--no-pg", action="store_true", help="SQLite only")
    ap.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    ap.add_argument("--rate", type=float, action="append", default=None, help="paced orders/s")
    ap.add_argument("--seconds", type=float, default=None, help="each paced run")
    ap.add_argument("--burst", type=int, default=None, help="orders in the burst (0: none)")
    ap.add_argument("--conns", type=int, default=None, help="sender connections (4)")
    ap.add_argument("--wait", type=float, default=None, help="max wait for the last packet")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a daemon config setting for every run, e.g. normalizer.poll_seconds=0.1 "
        '(VALUE as TOML: 0.1, true, "text"); for diagnostics',
    )
    ap.add_argument("--drain", type=int, default=None, help="dispatcher drain packets (0: none)")
    ap.add_argument("--phases", type=int, default=None, help="timed-steps packets (0: none)")
    ap.add_argument(
        "--pg-analyze-every",
        type=float,
        default=None,
        metavar="S",
        help="PostgreSQL: ANALYZE deliveries every S seconds during the runs (diagnostic)",
    )
    ap.add_argument(
        "--explain",
        type=int,
        default=None,
        metavar="N",
        help="PostgreSQL only: the claim query's plan and cost over N queued packets, "
        "without and with statistics, instead of the runs",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    base = QUICK if args.quick else Plan()
    pg: str | None = None if args.no_pg or args.only == "sqlite" else args.pg
    note = None
    if pg is not None and (why := nb.pg_reachable(pg)) is not None:
        note = f"PostgreSQL {pg} does not answer ({why}): SQLite only"
        log(note)
        pg = None
    if args.explain:
        if pg is None:
            ap.error("--explain needs PostgreSQL")
        with (
            tempfile.TemporaryDirectory() as tmp_,
            nb.fresh_database("postgresql", pg, Path(tmp_)) as url,
        ):
            found = claim_plan(url, args.explain, Path(tmp_))
        for label in ("no_statistics", "analyzed"):
            r = found[label]
            print(
                f"{label}: claim query {r['explain_ms']:.2f} ms (EXPLAIN ANALYZE) over "
                f"{found['packets']} queued; a claim of 1, mean {r['claim_mean_ms']:.2f} ms "
                f"(p50 {r['claim_p50_ms']:.2f})"
            )
            print("\n".join(f"    {line}" for line in r["plan"]))
        if args.json:
            args.json.write_text(json.dumps(found, indent=1))
        return
    plan = Plan(
        rates=args.rate if args.rate is not None else base.rates,
        seconds=args.seconds or base.seconds,
        burst=args.burst if args.burst is not None else base.burst,
        conns=args.conns or base.conns,
        wait_seconds=args.wait or base.wait_seconds,
        databases=[args.only] if args.only else base.databases,
        overrides=parse_sets(args.set, ap),
        drain=args.drain if args.drain is not None else base.drain,
        phases=args.phases if args.phases is not None else base.phases,
        analyze_every=args.pg_analyze_every,
    )
    res = measure(pg, plan, progress=log)
    if note:
        res["note"] = note
    print("\n".join(report_lines(res)))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
