"""The sink of the scale path: log → event store, acknowledged only after the insert.

A pass takes up to ``max_messages`` messages from the log's durable consumer (each one ingest
batch: a head line naming the hours of each shard it touches, then one JSON line per event,
``metering.ingest.encode_for_log``), inserts all their events into the event store as one
block with a deterministic deduplication token (a hash of the messages' stream sequences:
the same messages inserted again are stored once), marks the touched hours dirty in
PostgreSQL, and only then acknowledges the messages. A sink killed anywhere before the
acknowledgement gets its messages back after the log's ack wait; inserted again (perhaps cut
into other blocks), they are counted once all the same, because the event store counts an
event once (``metering.eventstore``). Nothing is acknowledged that is not stored and marked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from billing_site.common.logs import ms_since
from metering import eventstore, hours
from metering.ingest import decode_log_head, log_head_hours

log = logging.getLogger(__name__)


@dataclass
class SinkPass:
    messages: int = 0
    bytes: int = 0
    hours_marked: int = 0
    duration_ms: int = 0


def store_messages(payloads: Sequence[bytes], *, token: str) -> tuple[int, int]:
    """Insert the events of log messages as one block and mark their hours; returns
    (bytes of events, hour-shards marked)."""
    marked: set[tuple[int, dt.datetime]] = set()
    shards: dict[int, int] = {}
    bodies: list[bytes] = []
    for payload in payloads:
        line, _, body = payload.partition(b"\n")
        head = decode_log_head(line)
        marked.update(log_head_hours(head))
        shards.update(head.shards)
        if body:
            bodies.append(body)
    block = b"".join(bodies)
    if block:
        eventstore.get_store().insert_lines(block, token=token, shards=shards)
    return len(block), hours.mark_dirty(marked)


def drain_once(*, max_messages: int = 200, timeout: float = 1.0) -> SinkPass:
    """One pass: fetch, insert, mark, acknowledge."""
    from metering import eventlog

    started = time.monotonic()
    messages = eventlog.fetch(max_messages, timeout)
    report = SinkPass(messages=len(messages))
    if not messages:
        return report
    sequences = ",".join(str(message.seq) for message in sorted(messages, key=lambda m: m.seq))
    token = hashlib.sha256(sequences.encode()).hexdigest()[:32]
    report.bytes, report.hours_marked = store_messages([message.data for message in messages], token=token)
    for message in messages:
        message.ack()
    report.duration_ms = ms_since(started)
    log.info(
        "sink.pass",
        extra={
            "messages": report.messages,
            "first_seq": messages[0].seq,
            "last_seq": messages[-1].seq,
            "bytes": report.bytes,
            "hours_marked": report.hours_marked,
            "duration_ms": report.duration_ms,
        },
    )
    return report
