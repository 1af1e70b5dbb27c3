"""The event store alone (metering/eventstore.py, the real module, embedded ClickHouse): what the
capacity plan scales from.

    .venv/bin/python -m bench.eventstore                         # 4 M events, ~1-2 minutes
    .venv/bin/python -m bench.eventstore --events 20000000 --hours 24

Writes events as the log carries them (``ingest.encode_for_log``'s JSON lines: 40 % usage of
a few SKUs with labels, resource lifecycle events, random event ids) over ``--accounts``
accounts and ``--hours`` hours, in blocks of 200,000 (a sink's block: 20 batches of 10,000),
then ``--resend`` of them again re-cut into other blocks. Reports: insert events/s (new and
resent), bytes per event on disk (as inserted, and after the merges a day would do:
``OPTIMIZE``), events counted once (``FINAL``) against the distinct events written, and the time
of one hour-shard's usage read (``hour_usage``), the rollup's per-hour input, per million events
in that hour-shard. The machine's load is printed before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import django

from bench import loadavg

BLOCK = 200_000
START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def configure(path: str) -> None:
    """The project's settings (the modules under test import them), the event store in ``path``."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings.base")
    os.environ["METERING_CHDB_PATH"] = path
    os.environ["METERING_CLICKHOUSE_URL"] = ""
    os.environ["METERING_EVENT_RETENTION_DAYS"] = "100000"  # the bench's hours must not expire
    django.setup()


def rows(count: int, accounts: int, hours: int, seed: int) -> list[object]:
    from metering.ingest import Row

    rng = random.Random(seed)
    skus = ["network.egress", "storage.object.requests"]
    labels = [None, '{"env":"prod","project":"ml"}', '{"team":"x"}']
    out: list[object] = []
    for index in range(count):
        account = 10_000 + rng.randrange(accounts)
        moment = START + dt.timedelta(seconds=rng.randrange(hours * 3600), microseconds=rng.randrange(1_000_000))
        head = (index, account, f"{rng.getrandbits(64):016x}-{index}", moment)
        if rng.random() < 0.4:
            sku, quantity = rng.choice(skus), Decimal(rng.randrange(1, 10**6)) / 1000
            out.append(Row(*head, "usage", sku, quantity, None, None, None, rng.choice(labels)))
        else:
            action = rng.choice(["start", "update", "stop"])
            spec = None if action == "stop" else f'{{"compute.vcpu":{rng.randrange(1, 64)}}}'
            out.append(Row(*head, "resource", None, None, f"vm-{rng.randrange(50)}", action, spec, rng.choice(labels)))
    return out


def blocks(events: list[object]) -> list[tuple[bytes, dict[int, int]]]:
    """Blocks as a sink inserts them: the events' lines and the heads' account → shard map."""
    from metering.ingest import decode_log_head, encode_for_log

    out = []
    for start in range(0, len(events), BLOCK):
        head, _, body = encode_for_log(events[start : start + BLOCK]).partition(b"\n")  # type: ignore[arg-type]
        out.append((body, decode_log_head(head).shards))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=4_000_000)
    parser.add_argument("--accounts", type=int, default=5_000)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--resend", type=float, default=0.25, help="share of the events sent again, re-cut")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="bench-eventstore-")
    configure(str(Path(directory) / "store"))
    from metering import eventstore
    from metering.sharding import shard_of

    print(f"# {platform.node()} {os.cpu_count()} cores; load before {loadavg()}")
    store = eventstore.get_store()
    try:
        events = rows(args.events, args.accounts, args.hours, seed=1)
        new_blocks = blocks(events)
        started = time.monotonic()
        for number, (block, shards) in enumerate(new_blocks):
            store.insert_lines(block, token=f"new-{number}", shards=shards)
        new_seconds = time.monotonic() - started
        resent = random.Random(2).sample(events, int(len(events) * args.resend))
        resent_blocks = blocks(resent)
        started = time.monotonic()
        for number, (block, shards) in enumerate(resent_blocks):
            store.insert_lines(block, token=f"again-{number}", shards=shards)
        resend_seconds = time.monotonic() - started
        stored = store.stats()
        counted = store.counted_events()
        store.optimize()
        merged = store.stats()

        # One hour-shard's usage read: the rollup's input for that hour.
        per_hour_shard: dict[tuple[int, dt.datetime], int] = {}
        for row in events:
            key = (shard_of(row.account_id), row.occurred_at.replace(minute=0, second=0, microsecond=0))  # type: ignore[attr-defined]
            per_hour_shard[key] = per_hour_shard.get(key, 0) + 1
        sample = sorted(per_hour_shard)[: min(16, len(per_hour_shard))]
        reads = []
        for shard, hour in sample:
            started = time.monotonic()
            store.hour_usage(shard, [hour])
            store.hour_resource_events(shard, [hour])
            store.hour_digests(shard, [hour])
            reads.append((time.monotonic() - started) / (per_hour_shard[(shard, hour)] / 1e6))
        print(f"events written: {len(events):,} new + {len(resent):,} resent re-cut, blocks of {BLOCK:,}")
        print(f"insert, new:    {len(events) / new_seconds:,.0f} events/s")
        print(f"insert, resent: {len(resent) / resend_seconds:,.0f} events/s")
        print(
            f"counted once (FINAL): {counted:,} of {len(events):,} distinct "
            f"({'exact' if counted == len(events) else 'WRONG'})"
        )
        print(
            f"bytes/event as inserted (copies included): {stored.bytes_on_disk / len(events):.1f}"
            f" ({stored.rows:,} rows stored)"
        )
        print(f"bytes/event merged (OPTIMIZE): {merged.bytes_on_disk / len(events):.1f} ({merged.rows:,} rows)")
        print(
            f"hour-shard read (usage + lifecycles + digest): median {statistics.median(reads):.2f} s per million"
            f" events in the hour-shard ({len(sample)} hour-shards of"
            f" ~{statistics.median(per_hour_shard[k] for k in sample):,.0f})"
        )
        print(f"# load after {loadavg()}")
    finally:
        eventstore.close_store()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
