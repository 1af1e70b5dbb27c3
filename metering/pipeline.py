"""The scale path's worker: sink and hourly rollup in one loop (``manage.py run_event_pipeline``).

With the embedded event store only one process may open it, so that process both drains the
log into the store (``metering.sink``) and computes the dirty hours into PostgreSQL
(``metering.rollup`` over ``metering.hours``). With a ClickHouse server, run several: sinks share
the log's durable consumer, and shards are claimed one worker at a time (``FOR UPDATE SKIP
LOCKED``), so any number of these processes share the work. Killed anywhere, nothing is lost or
counted twice: unacknowledged messages come back after the log's ack wait, and a rollup
transaction that did not commit left its hours dirty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from billing_site.common.on_commit import queue_task
from metering import eventlog, rollup, sink

log = logging.getLogger(__name__)


@dataclass
class PipelineReport:
    sink_passes: int = 0
    messages: int = 0
    rollups: int = 0
    events_rolled_up: int = 0


def run(
    *,
    seconds: float | None = None,
    until_idle: bool = False,
    rollup_every: float = 2.0,
    max_messages: int = 200,
    stop: Callable[[], bool] = lambda: False,
) -> PipelineReport:
    """Drain and roll up until ``seconds`` have passed, ``stop()`` says so, or (with
    ``until_idle``) the log has nothing left and no hour is dirty."""
    eventlog.ensure_stream()
    report = PipelineReport()
    started = time.monotonic()
    last_rollup = 0.0
    while not stop():
        drained = sink.drain_once(max_messages=max_messages, timeout=0.5 if until_idle else 1.0)
        report.sink_passes += 1
        report.messages += drained.messages
        idle = drained.messages == 0
        if idle or time.monotonic() - last_rollup >= rollup_every:
            rolled = rollup.rollup(check_held=False)
            last_rollup = time.monotonic()
            report.rollups += 1
            report.events_rolled_up += rolled.events
            if rolled.events:
                for name in settings.METERING_AFTER_ROLLUP_TASKS:
                    queue_task(name)
            if until_idle and idle and not rolled.events:
                break
        if seconds is not None and time.monotonic() - started >= seconds:
            break
    log.info(
        "pipeline.run",
        extra={
            "sink_passes": report.sink_passes,
            "messages": report.messages,
            "rollups": report.rollups,
            "events_rolled_up": report.events_rolled_up,
        },
    )
    return report
