"""Rollup and costs benchmarks: W4 and the costs API (W5 lives in bench/freshness.py).

    make bench                                   # everything, default sizes
    .venv/bin/python -m bench.rollup --events 13900000 --accounts 100000 --workers 2

W4  a 10-minute window of events at 2 billion a day (13.9 million, a mix of usage and
    lifecycle events over ~100k accounts) rolled up and rated      target <= 60 s
costs  a month of hourly data over thousands of resources           target p99 < 1 s

Events are written straight into the event table with SQL (ingestion has its own
benchmark); the rollup is the real one: ``rollup_shard`` per shard, in ``--workers``
processes claiming shards with SKIP LOCKED, as Celery workers would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import secrets
import statistics
import time
from typing import Any

from bench.ingest import database_url, prepare, setup_django


def generate_events(total: int, accounts: int, run: str, window_start: dt.datetime) -> float:
    """``total`` events in the 10 minutes from ``window_start``: 60 % egress, 25 % storage
    requests (usage), 15 % VM lifecycle (start / resize / stop) on 5 VMs per account."""
    from django.db import connection, transaction

    from metering import horizon

    started = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_accounts")
        cur.execute(
            "CREATE UNLOGGED TABLE bench_accounts AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id "
            "FROM accounts_billingaccount WHERE name LIKE 'bench %%' LIMIT %s",
            [accounts],
        )
        cur.execute("CREATE UNIQUE INDEX ON bench_accounts (n)")
    chunk = 1_000_000
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk) - 1
        with transaction.atomic(), connection.cursor() as cur:
            horizon.writer_lock()  # an event writer like ingestion (metering.horizon)
            cur.execute(
                """
                INSERT INTO metering_usageevent
                    (account_id, event_id, occurred_at, kind, sku, quantity, resource_id, action, spec, labels)
                SELECT a.id, %(run)s || '-' || g,
                       %(t0)s::timestamptz + (g %% 600000) * interval '1 millisecond',
                       CASE WHEN h < 850 THEN 'usage' ELSE 'resource' END,
                       CASE WHEN h < 600 THEN 'network.egress' WHEN h < 850 THEN 'storage.object.requests' END,
                       CASE WHEN h < 600 THEN (h %% 97) / 10.0 WHEN h < 850 THEN h * 13 END,
                       'vm-' || (g %% 5),
                       CASE WHEN h < 850 THEN NULL WHEN h < 900 THEN 'start' WHEN h < 960 THEN 'update' ELSE 'stop' END,
                       CASE WHEN h >= 850 AND h < 960
                            THEN jsonb_build_object('compute.vcpu', 1 + h %% 8, 'compute.ram', 2 * (1 + h %% 8)) END,
                       jsonb_build_object('project', 'p' || (g %% 3))
                FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
                CROSS JOIN LATERAL (SELECT (hashint8(g) & 1023) %% 1000 AS h) r
                JOIN bench_accounts a ON a.n = (g * 7919) %% %(accounts)s
                """,
                {"run": run, "t0": window_start, "lo": lo, "hi": hi, "accounts": accounts},
            )
    return time.perf_counter() - started


def rollup_worker(url: str, shards: list[int], now: dt.datetime, out: Any) -> None:
    setup_django(url)
    from metering import rollup

    done: list[tuple[int, int, float]] = []
    for shard in shards:
        started = time.perf_counter()
        report = rollup.rollup_shard(shard=shard, now=now)
        if report is not None:
            done.append((shard, report.events, time.perf_counter() - started))
    out.put(done)


def run_w4(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from django.db import connection

    from metering import rollup

    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    window_start = now - dt.timedelta(minutes=10)
    print(f"W4: writing {args.events:,} events over {args.accounts:,} accounts ...", flush=True)
    load_seconds = generate_events(args.events, args.accounts, f"w4-{secrets.token_hex(3)}", window_start)
    print(f"    written in {load_seconds:.0f} s; rolling up with {args.workers} workers ...", flush=True)
    connection.close()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    # Each worker walks all shards, starting at a different one; SKIP LOCKED keeps them apart
    # and a shard already done has nothing left.
    order = list(range(rollup.SHARDS))
    procs = [
        ctx.Process(target=rollup_worker, args=(url, order[i:] + order[:i], now, out))
        for i in range(0, rollup.SHARDS, max(1, rollup.SHARDS // args.workers))[: args.workers]
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join()
    events = sum(e for r in results for _, e, _ in r)
    slowest = max((s for r in results for _, _, s in r), default=0)
    print(
        f"W4: {events:,} events rolled up and rated in {elapsed:.1f} s -> {events / elapsed:,.0f} events/s "
        f"(slowest shard {slowest:.1f} s); target <= 60 s for 13.9 M",
        flush=True,
    )
    return {"events": events, "seconds": elapsed, "load_seconds": load_seconds}


def run_costs(args: argparse.Namespace) -> dict[str, Any]:
    from django.db import connection
    from django.test import Client

    from accounts import services
    from accounts.models import BillingAccount, Scope

    account = BillingAccount.objects.filter(name="bench costs").first()
    if account is None:
        account = BillingAccount.objects.create(
            name="bench costs",
            email="costs@bench.test",
            kind="business",
            country="NL",
            currency="USD",
            address_line1="x",
            address_city="x",
            address_postal_code="x",
        )
    month = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM metering_hourlyusage WHERE account_id = %s", [account.id])
        have = cur.fetchone()[0]
        want = args.resources * 31 * 24 * 3
        if have < want:
            print(f"costs: writing a month of hourly rows for {args.resources:,} resources ...", flush=True)
            cur.execute("DELETE FROM metering_hourlyusage WHERE account_id = %s", [account.id])
            cur.execute(
                """
                INSERT INTO metering_hourlyusage (account_id, hour, sku, resource_id, labels, quantity, amount)
                SELECT %(account)s, %(month)s::timestamptz + h * interval '1 hour', s.sku, 'vm-' || r,
                       jsonb_build_object('project', 'p' || (r %% 7),
                                          'env', CASE WHEN r %% 2 = 0 THEN 'prod' ELSE 'dev' END),
                       s.units, s.units * s.price
                FROM generate_series(0, %(resources)s - 1) r
                CROSS JOIN generate_series(0, 31 * 24 - 1) h
                CROSS JOIN (VALUES ('compute.vcpu', 4.0, 0.011), ('compute.ram', 16.0, 0.0016),
                                   ('storage.disk.ssd', 100.0, 0.000137)) AS s(sku, units, price)
                """,
                {"account": account.id, "month": month, "resources": args.resources},
            )
            cur.execute("DELETE FROM metering_dailyusage WHERE account_id = %s", [account.id])
            cur.execute(  # what the rollup keeps for the days it touches
                "INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount) "
                "SELECT account_id, date_trunc('day', hour, 'UTC'), sku, resource_id, labels, sum(quantity), "
                "sum(amount) FROM metering_hourlyusage WHERE account_id = %s GROUP BY 1, 2, 3, 4, 5",
                [account.id],
            )
            cur.execute("ANALYZE metering_hourlyusage")
            cur.execute("ANALYZE metering_dailyusage")
            cur.execute("SELECT count(*) FROM metering_hourlyusage WHERE account_id = %s", [account.id])
            have = cur.fetchone()[0]
    key = services.service_key_create(name="bench-costs", scopes=[Scope.ACCOUNTS_READ], created_by_id=None).raw
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}", SERVER_NAME="127.0.0.1")
    queries = {
        "month by day and sku": {"start": "2026-10-01", "end": "2026-11-01", "granularity": "day", "group_by": "sku"},
        "month total by month": {"start": "2026-10-01", "end": "2026-11-01", "granularity": "month"},
        "month by day and label": {"start": "2026-10-01", "end": "2026-11-01", "group_by": "label:project"},
        "month by month and resource": {
            "start": "2026-10-01",
            "end": "2026-11-01",
            "granularity": "month",
            "group_by": "resource",
        },
        "a week by hour": {"start": "2026-10-01", "end": "2026-10-08", "granularity": "hour"},
    }
    figures = {}
    for name, params in queries.items():
        timings = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            response = client.get(f"/api/v1/billing-accounts/{account.public_id}/costs", params)
            timings.append(time.perf_counter() - started)
            assert response.status_code == 200, response.content[:300]
        timings.sort()
        p99 = timings[min(len(timings) - 1, int(0.99 * len(timings)))]
        figures[name] = (statistics.median(timings) * 1000, p99 * 1000, len(response.json()["rows"]))
        print(
            f"costs {name}: p50 {figures[name][0]:.0f} ms, p99 {figures[name][1]:.0f} ms, {figures[name][2]:,} rows",
            flush=True,
        )
    return {"rows": have, "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_390_000, help="W4 events (13,900,000 = 10 min at 2 B/day)")
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2, help="rollup worker processes")
    parser.add_argument("--resources", type=int, default=2_000, help="costs: resources in the month of data")
    parser.add_argument("--repeat", type=int, default=20, help="costs: calls per query")
    parser.add_argument("--skip-w4", action="store_true")
    parser.add_argument("--skip-costs", action="store_true")
    args = parser.parse_args()

    url = database_url()
    setup_django(url)
    prepare(args.accounts)
    from metering import rollup

    print("draining what earlier runs left ...", flush=True)
    rollup.rollup()
    if not args.skip_w4:
        run_w4(url, args)
    if not args.skip_costs:
        run_costs(args)


if __name__ == "__main__":
    main()
