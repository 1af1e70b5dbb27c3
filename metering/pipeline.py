"""The scale path's worker: sink and hourly rollup in one loop (``manage.py run_event_pipeline``).

With the embedded event store only one process may open it, so that process both drains the
log into the store (``metering.sink``) and computes the dirty hours into PostgreSQL
(``metering.rollup`` over ``metering.hours``). With a ClickHouse server, run several: sinks share
the log's durable consumer, and shards are claimed one worker at a time (``FOR UPDATE SKIP
LOCKED``), so any number of these processes share the work. Killed anywhere, nothing is lost or
counted twice: unacknowledged messages come back after the log's ack wait, and a rollup
transaction that did not commit left its hours dirty.

While the log cannot answer (a leader election, a lost connection) the loop waits and tries
again instead of ending: nothing it had not acknowledged is lost, and the rollup goes on. "Idle"
(``until_idle``) means the log's consumer has nothing left, neither undelivered nor delivered
and unacknowledged (a sink killed before its acknowledgement leaves those, delivered again after
the ack wait), and no hour is dirty.
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
    log_unavailable: int = 0  # passes that found the log unable to answer


def _log_drained() -> bool:
    """Whether the consumer has nothing left to hand out or to be acknowledged."""
    try:
        state = eventlog.consumer_info()
    except eventlog.LogUnavailable:
        return False
    return state.num_pending == 0 and state.num_ack_pending == 0


def _pause(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(0.1)


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
    report = PipelineReport()
    started = time.monotonic()
    last_rollup = 0.0
    stream_ready = False
    while not stop():
        try:
            if not stream_ready:
                eventlog.ensure_stream()
                stream_ready = True
            drained = sink.drain_once(max_messages=max_messages, timeout=0.5 if until_idle else 1.0)
        except eventlog.LogUnavailable as exc:
            report.log_unavailable += 1
            log.warning("pipeline.log_unavailable", extra={"reason": exc.reason, "retry_after": exc.retry_after})
            _pause(min(float(exc.retry_after), 2.0), stop)
            idle = False  # not known: the log did not say
        else:
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
            if until_idle and idle and not rolled.events and _log_drained():
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
            "log_unavailable": report.log_unavailable,
        },
    )
    return report
