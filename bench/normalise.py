#!/usr/bin/env python3
"""How fast the normaliser turns stored messages into referral events.

Two measurements, on SQLite (a fresh file, WAL, synchronous=FULL) and on PostgreSQL
(``--pg URL``, a fresh schema):

* **drain**: N messages (whole referral loops: ORM → SIU S12 → SIU S14 Complete → ORU
  final, a new placer number per loop) are committed as ingest would, then the real
  normaliser drains them in batches; msgs/s, and how the time splits between mapping
  (CPU) and the database;
* **live** (``--live``): ``refloop run`` as a subprocess driven by the shared C load
  generator (``mllp_load``, built under /tmp/hl7bench if missing) over C connections,
  sending the loops as fast as ACKs come back; ACKed msgs/s, the highest backlog of
  unnormalised messages seen, how long after the last ACK the last one was normalised,
  and p50/p99 of received → committed (``refloop_normalize_lag_seconds``).

Usage: .venv/bin/python bench/normalise.py [--n 4000] [--pg postgresql://...] [--live]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from engine.store.database import open_engine, upgrade  # noqa: E402
from tests.loop_messages import loop  # noqa: E402
from tests.normalising import processor, shipped, store  # noqa: E402


def messages(n: int, tag: str) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        out += loop(f"{tag}{i:06d}", mrn=f"{100000 + i}")
        i += 1
    return out[:n]


def drain(url: str, n: int, batch: int) -> dict[str, float]:
    engine = open_engine(url)
    upgrade(engine)
    payloads = messages(n, "B")
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
    }


def live(
    url: str, n: int, conns: int, workdir: Path, *, off: bool = False, file: Path | None = None
) -> dict[str, float]:
    """The daemon as a subprocess, driven by the shared C load generator (mllp_load)."""
    import json
    import os
    import signal
    import subprocess

    import httpx

    from tests.helpers import MAPPINGS, free_port

    tmp = Path(os.environ.get("HL7BENCH_TMP") or Path(tempfile.gettempdir()) / "hl7bench")
    loader = Path(os.environ.get("MLLP_LOAD") or tmp / "bin" / "mllp_load")
    if not loader.exists():
        src = REPO.parent / "shared" / "bench" / "mllp_load.c"
        loader.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(loader), str(src)], check=True)
    engine = open_engine(url)
    upgrade(engine)
    engine.dispose()
    port, http = free_port(), free_port()
    config = workdir / f"live-{port}.toml"
    config.write_text(
        f'[database]\nurl = {json.dumps(url)}\n[http]\nhost = "127.0.0.1"\nport = {http}\n'
        f'[[mllp.listeners]]\nname = "bench"\nhost = "127.0.0.1"\nport = {port}\n'
        f'[logging]\nlevel = "warning"\nformat = "json"\n'
        f"[mappings]\ndir = {json.dumps(str(MAPPINGS))}\n"
        f"[normalizer]\nenabled = {'false' if off else 'true'}\n"
    )
    # Whole loops, distinct placer numbers; 16 connections interleave them, so SIUs often
    # arrive before their order and are parked, then released: the real mix.
    hl7 = file or workdir / f"loops-{port}.hl7"
    if file is None:
        hl7.write_bytes(b"\n\n".join(m.replace(b"\r", b"\n") for m in messages(n, f"V{port}")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    refloop = str(REPO / ".venv" / "bin" / "refloop")
    daemon = subprocess.Popen([refloop, "run", "--config", str(config)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("daemon did not start")
            time.sleep(0.1)
        eng = open_engine(url)
        backlog_max = 0

        def backlog() -> int:
            with eng.connect() as conn:
                q = "SELECT COUNT(*) FROM messages WHERE status = 'received'"
                return int(conn.execute(text(q)).scalar_one())

        load = subprocess.Popen(
            [
                str(loader),
                "-p",
                str(port),
                "-c",
                str(conns),
                "-N",
                str(n),
                "-w",
                "0",
                "-u",
                "-f",
                str(hl7),
                "-d",
                "120",
            ],
            stdout=subprocess.PIPE,
        )
        started = time.perf_counter()
        while load.poll() is None:
            backlog_max = max(backlog_max, backlog())
            time.sleep(0.2)
        acked_at = time.perf_counter()
        result = json.loads(load.stdout.read() if load.stdout else b"{}")
        while not off and (left := backlog()) > 0:
            backlog_max = max(backlog_max, left)
            time.sleep(0.05)
        drained_at = time.perf_counter()
        with eng.connect() as conn:
            closed = conn.execute(
                text("SELECT COUNT(*) FROM referrals WHERE state = 'note_received'")
            ).scalar_one()
            left_parked = conn.execute(
                text("SELECT COUNT(*) FROM messages WHERE status = 'parked'")
            ).scalar_one()
        eng.dispose()
        metrics = httpx.get(f"http://127.0.0.1:{http}/metrics", timeout=5).text
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    lag = [
        line
        for line in metrics.splitlines()
        if line.startswith("refloop_normalize_lag_seconds_bucket")
    ]
    buckets = [(float(x.split('le="')[1].split('"')[0]), float(x.split()[-1])) for x in lag]
    return {
        "msgs": result.get("acked_ok", 0),
        "ack_msgs_per_s": result.get("throughput_msg_s", 0.0),
        "ack_p99_ms": result.get("lat_ms", {}).get("p99", 0.0),
        "tail_after_last_ack_s": drained_at - acked_at,
        "load_seconds": acked_at - started,
        "backlog_max": backlog_max,
        "lag_p50_s": _quantile(buckets, 0.5),
        "lag_p99_s": _quantile(buckets, 0.99),
        "note_received": closed,
        "parked_left": left_parked,
    }


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    total = max(count for _, count in buckets)
    for le, count in sorted(buckets):
        if count >= q * total:
            return le
    return float("inf")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--pg", default=None, help="PostgreSQL URL (a schema is made and dropped)")
    ap.add_argument("--live", action="store_true", help="also run the whole daemon")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--off", action="store_true", help="live with the normaliser turned off")
    ap.add_argument("--file", type=Path, default=None, help="live: send this message file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("sqlite", f"sqlite:///{tmp}/drain.db", None)]
        if args.pg:
            url, schema = pg_schema_url(args.pg)
            targets.append(("postgresql", url, schema))
        for name, url, schema in targets:
            try:
                d = drain(url, args.n, args.batch)
                print(
                    f"{name:10} drain: {d['msgs']} msgs in {d['seconds']:.2f}s = "
                    f"{d['msgs_per_s']:,.0f} msgs/s "
                    f"(mapping {d['mapping_share']:.0%} of the time); "
                    f"{d['events']} events, {d['note_received']} referrals note_received"
                )
            finally:
                if schema:
                    drop_schema(args.pg, schema)
        if args.live:
            lives = [("sqlite", f"sqlite:///{tmp}/live.db", None)]
            if args.pg:
                url, schema = pg_schema_url(args.pg)
                lives.append(("postgresql", url, schema))
            for name, url, schema in lives:
                try:
                    r = live(url, args.n, args.conns, Path(tmp), off=args.off, file=args.file)
                    print(
                        f"{name:10} live ({args.conns} conns, mllp_load): {r['msgs']} msgs ACKed "
                        f"at {r['ack_msgs_per_s']:,.0f} msgs/s (ACK p99 {r['ack_p99_ms']:.1f} ms); "
                        f"backlog max {r['backlog_max']}; all normalised "
                        f"{r['tail_after_last_ack_s']:.2f}s after the last ACK; received -> "
                        f"committed p50 <= {r['lag_p50_s']}s, p99 <= {r['lag_p99_s']}s; "
                        f"{r['note_received']} referrals note_received, {r['parked_left']} parked"
                    )
                finally:
                    if schema:
                        drop_schema(args.pg, schema)


if __name__ == "__main__":
    main()
