"""Ingestion benchmarks W1-W3 against the real HTTP endpoint under gunicorn.

    make bench                       # defaults: a few minutes
    .venv/bin/python -m bench.ingest --events 2000000 --batch 10000 --clients 4

W1  batched ingestion of new events (with dedupe)      target >= 50,000 events/s
W2  one event per request, as a baseline               W1 must be >= 20x W2
W3  replay of already-accepted batches                 nothing changes; >= 2x W1
W3b the same events again, cut into different batches  nothing changes (measured: the
    per-event dedupe path, which a byte-identical resend does not need)

The database is DATABASE_URL, else `billing_bench` on 127.0.0.1:5432 (created if missing),
else the embedded server. The server is gunicorn with sync workers on 127.0.0.1, production
settings but DEBUG off and no TLS redirect. Clients are separate processes sending
pre-built request bodies over keep-alive connections, so the figure is the server's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import itertools
import json
import multiprocessing as mp
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "billing_bench"


def database_url() -> str:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            pass
    except OSError:
        from billing_site.database import embedded_database_url

        return embedded_database_url()
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone():
            conn.execute(f"CREATE DATABASE {BENCH_DB}")
    return f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"


def setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings.base")
    import django

    django.setup()


def ensure_accounts(count: int) -> None:
    from accounts.models import BillingAccount

    have = BillingAccount.objects.filter(name__startswith="bench ").count()
    if have >= count:
        return
    batch = []
    for i in range(have, count):
        batch.append(
            BillingAccount(
                name=f"bench {i}",
                email=f"bench{i}@bench.test",
                kind="business",
                country="NL",
                currency="USD" if i % 2 else "EUR",
                address_line1="x",
                address_city="x",
                address_postal_code="x",
            )
        )
        if len(batch) == 10_000:
            BillingAccount.objects.bulk_create(batch)
            batch = []
    BillingAccount.objects.bulk_create(batch)


def prepare(accounts: int) -> tuple[list[str], str]:
    """Migrate, load the catalog, make sure ``accounts`` billing accounts exist; a fresh key."""
    from django.core.management import call_command

    from accounts import services
    from accounts.models import BillingAccount, Scope

    call_command("migrate", verbosity=0)
    call_command("load_catalog", str(ROOT / "metering" / "fixtures" / "catalog.json"), verbosity=0)
    ensure_accounts(accounts)
    have = list(BillingAccount.objects.filter(name__startswith="bench ").values_list("id", flat=True)[:accounts])
    key = services.service_key_create(
        name=f"bench-{secrets.token_hex(3)}", scopes=[Scope.USAGE_WRITE], created_by_id=None
    )
    return [BillingAccount(id=i).public_id for i in have], key.raw


def make_events(run: str, worker: int, count: int, accounts: list[str], seed: int) -> list[dict[str, Any]]:
    """A realistic mix: 70% egress/requests usage, 30% VM/disk/GPU lifecycle events."""
    rng = random.Random(seed)
    base = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    events: list[dict[str, Any]] = []
    for n in range(count):
        account = accounts[rng.randrange(len(accounts))]
        moment = (base + dt.timedelta(seconds=rng.randrange(7000))).isoformat()
        event_id = f"{run}-{worker}-{n}"
        roll = rng.random()
        if roll < 0.45:
            events.append(
                {
                    "id": event_id,
                    "account_id": account,
                    "time": moment,
                    "type": "usage",
                    "sku": "network.egress",
                    "quantity": f"{rng.random() * 5:.6f}",
                    "resource_id": f"vm-{rng.randrange(50)}",
                    "labels": {"project": f"p{rng.randrange(5)}"},
                }
            )
        elif roll < 0.7:
            events.append(
                {
                    "id": event_id,
                    "account_id": account,
                    "time": moment,
                    "type": "usage",
                    "sku": "storage.object.requests",
                    "quantity": str(rng.randrange(1, 5000)),
                    "resource_id": f"bucket-{rng.randrange(10)}",
                }
            )
        else:
            action = rng.choice(["start", "update", "stop"])
            event: dict[str, Any] = {
                "id": event_id,
                "account_id": account,
                "time": moment,
                "type": "resource",
                "resource_id": f"vm-{rng.randrange(50)}",
                "action": action,
                "labels": {"project": f"p{rng.randrange(5)}", "env": "prod"},
            }
            if action != "stop":
                event["spec"] = {
                    "compute.vcpu": rng.choice(["1", "2", "4", "8"]),
                    "compute.ram": rng.choice(["2", "4", "16"]),
                    "storage.disk.ssd": rng.choice(["20", "100"]),
                }
            events.append(event)
    return events


def client(port: int, key: str, bodies: list[bytes], ready: Any, go: Any, out: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "errors": 0}
    ready.wait()
    go.wait()
    for body in bodies:
        started = time.perf_counter()
        conn.request("POST", "/api/v1/usage/events", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            totals["errors"] += 1
            continue
        parsed = json.loads(data)
        totals["accepted"] += parsed["accepted"]
        totals["duplicates"] += parsed["duplicates"]
        totals["rejected"] += len(parsed["rejected"])
    out.put((totals, latencies))


def run_workload(name: str, port: int, key: str, bodies_per_client: list[list[bytes]], events: int) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready = ctx.Barrier(len(bodies_per_client) + 1)
    go = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=client, args=(port, key, b, ready, go, out)) for b in bodies_per_client]
    for proc in procs:
        proc.start()
    ready.wait()
    started = time.perf_counter()
    go.set()
    results = [out.get() for _ in procs]
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join()
    totals = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    latencies = sorted(lat for r in results for lat in r[1])
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    row = {
        "workload": name,
        "events": events,
        "requests": len(latencies),
        "seconds": elapsed,
        "events_per_s": events / elapsed,
        "p50_ms": p(0.5),
        "p99_ms": p(0.99),
        **totals,
    }
    print(
        f"{name}: {events:,} events in {len(latencies):,} requests, {elapsed:.1f} s -> "
        f"{row['events_per_s']:,.0f} events/s; latency p50 {row['p50_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms; "
        f"accepted {totals['accepted']:,} duplicates {totals['duplicates']:,} rejected {totals['rejected']:,} "
        f"errors {totals['errors']}",
        flush=True,
    )
    return row


def start_server(url: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.production",
        "DATABASE_URL": url,
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",
        "DATABASE_CONN_MAX_AGE": "600",
        "LOG_LEVEL": "WARNING",
        "API_KEY_TOUCH_INTERVAL_SECONDS": "60",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "billing_site.wsgi",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--timeout",
            "300",
            "--keep-alive",
            "75",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("gunicorn did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="W1/W3 events in all")
    parser.add_argument("--batch", type=int, default=5_000, help="events per request in W1/W3")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn sync workers")
    parser.add_argument("--single-events", type=int, default=20_000, help="W2 events (one per request)")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--port", type=int, default=18_431)
    args = parser.parse_args()

    url = database_url()
    setup_django(url)
    accounts, key = prepare(args.accounts)
    from django.db import connection

    from metering.models import UsageEvent

    run = secrets.token_hex(4)
    per_client = args.events // args.clients
    print(f"building {args.events:,} events in {args.clients} clients' batches of {args.batch:,} ...", flush=True)
    batches: list[list[bytes]] = []
    rebatched: list[list[bytes]] = []
    for c in range(args.clients):
        events = make_events(run, c, per_client, accounts, seed=c)
        batches.append(
            [json.dumps({"events": events[i : i + args.batch]}).encode() for i in range(0, len(events), args.batch)]
        )
        shifted = [0, *range(args.batch // 2, len(events), args.batch), len(events)]
        rebatched.append(
            [json.dumps({"events": events[a:b]}).encode() for a, b in itertools.pairwise(shifted) if b > a]
        )
    single_per_client = args.single_events // args.clients
    singles = [
        [
            json.dumps({"events": [e]}).encode()
            for e in make_events(f"{run}s", c, single_per_client, accounts, seed=99 + c)
        ]
        for c in range(args.clients)
    ]
    body_mb = sum(len(b) for bs in batches for b in bs) / 1e6
    print(f"{body_mb:,.0f} MB of request bodies; average {body_mb * 1e6 / (per_client * args.clients):.0f} bytes/event")
    connection.close()

    server = start_server(url, args.port, args.workers)
    try:
        before = UsageEvent.objects.count()
        w1 = run_workload("W1 batched, new", args.port, key, batches, per_client * args.clients)
        after_w1 = UsageEvent.objects.count()
        w2 = run_workload("W2 one per request", args.port, key, singles, single_per_client * args.clients)
        after_w2 = UsageEvent.objects.count()
        w3 = run_workload("W3 replay of W1", args.port, key, batches, per_client * args.clients)
        w3b = run_workload("W3b W1 re-batched", args.port, key, rebatched, per_client * args.clients)
        after_w3 = UsageEvent.objects.count()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    stored_ok = after_w1 - before == w1["accepted"] == per_client * args.clients
    replay_ok = after_w3 == after_w2 and all(
        w["accepted"] == 0 and w["duplicates"] == per_client * args.clients for w in (w3, w3b)
    )
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL on the same machine, gunicorn {args.workers} sync workers, {args.clients} clients"
    )
    print(f"W1 stored every event once: {stored_ok}; W3 changed nothing: {replay_ok}")
    print(
        f"W1/W2 = {w1['events_per_s'] / w2['events_per_s']:.0f}x (target >= 20x); "
        f"W3/W1 = {w3['events_per_s'] / w1['events_per_s']:.2f}x (target >= 2x); W1 target >= 50,000 events/s"
    )
    print()
    print("| workload | events | requests | seconds | events/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in (w1, w2, w3, w3b):
        print(
            f"| {row['workload']} | {row['events']:,} | {row['requests']:,} | {row['seconds']:.1f} | "
            f"{row['events_per_s']:,.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    if not (stored_ok and replay_ok):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
