"""W5: freshness under steady load. Producers send events at a fixed rate through the real
endpoint (gunicorn) while the rollup runs as the Celery task does (a pass, a 2 s pause,
again); for every accepted batch: how long until a rollup pass that started after its
acceptance had finished, i.e. until it was visible in the costs.

    .venv/bin/python -m bench.freshness --rate 23000 --seconds 60     target p99 <= 60 s
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import multiprocessing as mp
import random
import signal
import time
from typing import Any

from bench.ingest import database_url, prepare, setup_django, start_server


def producer(
    port: int, key: str, accounts: list[str], rate: float, seconds: float, batch: int, seed: int, out: Any
) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    interval = batch / rate
    accepted: list[float] = []
    errors = 0
    start = time.time()
    n = 0
    while time.time() - start < seconds:
        due = start + len(accepted) * interval + errors * interval
        pause = due - time.time()
        if pause > 0:
            time.sleep(pause)
        moment = dt.datetime.now(dt.UTC).isoformat()
        events = []
        for _ in range(batch):
            n += 1
            events.append(
                {
                    "id": f"w5-{seed}-{start:.0f}-{n}",
                    "account_id": accounts[rng.randrange(len(accounts))],
                    "time": moment,
                    "type": "usage",
                    "sku": "network.egress",
                    "quantity": f"{rng.random():.6f}",
                    "resource_id": f"vm-{rng.randrange(5)}",
                }
            )
        conn.request("POST", "/api/v1/usage/events", body=json.dumps({"events": events}), headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            accepted.append(time.time())
        else:
            errors += 1
    out.put((accepted, errors))


def roller(url: str, stop: Any, out: Any) -> None:
    setup_django(url)
    from metering import rollup

    passes: list[tuple[float, float, int]] = []
    while not stop.is_set():
        started = time.time()
        report = rollup.rollup()
        passes.append((started, time.time(), report.events))
        stop.wait(2.0)
    started = time.time()
    report = rollup.rollup()
    passes.append((started, time.time(), report.events))
    out.put(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=23_000, help="events per second, all producers")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=18_432)
    args = parser.parse_args()

    url = database_url()
    setup_django(url)
    accounts, key = prepare(args.accounts)
    from django.db import connection

    from metering import rollup

    rollup.rollup()  # start from a drained pipeline
    connection.close()
    server = start_server(url, args.port, args.workers)
    ctx = mp.get_context("fork")
    stop, out, roll_out = ctx.Event(), ctx.Queue(), ctx.Queue()
    roll_proc = ctx.Process(target=roller, args=(url, stop, roll_out))
    producers = [
        ctx.Process(
            target=producer,
            args=(args.port, key, accounts, args.rate / args.producers, args.seconds, args.batch, i, out),
        )
        for i in range(args.producers)
    ]
    try:
        roll_proc.start()
        for proc in producers:
            proc.start()
        results = [out.get() for _ in producers]
        stop.set()
        passes = roll_out.get()
        for proc in [*producers, roll_proc]:
            proc.join()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    accepted = sorted(t for r in results for t in r[0])
    errors = sum(r[1] for r in results)
    freshness = []
    for accepted_at in accepted:
        visible = next((end for start, end, _ in passes if start >= accepted_at), None)
        if visible is not None:
            freshness.append(visible - accepted_at)
    freshness.sort()
    span = accepted[-1] - accepted[0] if len(accepted) > 1 else 1
    rate = len(accepted) * args.batch / span
    p = lambda q: freshness[min(len(freshness) - 1, int(q * len(freshness)))]  # noqa: E731
    pass_times = [end - start for start, end, _ in passes]
    print(
        f"W5: {len(accepted) * args.batch:,} events accepted at {rate:,.0f} events/s ({errors} failed batches); "
        f"{len(passes)} rollup passes, median pass {sorted(pass_times)[len(pass_times) // 2]:.1f} s, "
        f"longest {max(pass_times):.1f} s"
    )
    print(
        f"W5: accepted -> visible in costs: p50 {p(0.5):.1f} s, p99 {p(0.99):.1f} s, max {freshness[-1]:.1f} s "
        f"(target p99 <= 60 s)"
    )


if __name__ == "__main__":
    main()
