"""Celery tasks of the metering app: thin, they call services."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from billing_site.common.logs import ms_since
from billing_site.common.on_commit import queue_task
from metering import services

log = logging.getLogger(__name__)


@shared_task(name="metering.ingest_batches_prune")
def ingest_batches_prune() -> int:
    """Forget batch fingerprints whose events have left the acceptance window."""
    return services.ingest_batches_prune()


@shared_task(name="metering.inactive_usage_compact")
def inactive_usage_compact() -> int:
    """Fold the inactive-account usage rows appended per batch into one per account, state and day."""
    return services.inactive_usage_compact()


@shared_task(name="metering.hourly_partitions_maintain")
def hourly_partitions_maintain() -> str:
    """Daily: next months' hourly partitions created, months past the retention dropped."""
    return services.hourly_partitions_maintain().summary()


@shared_task(name="metering.rollup_usage")
def rollup_usage(seconds: float = 50.0, pause: float = 2.0) -> str:
    """Started every minute by beat; keeps draining for ``seconds`` (a pass, a short pause,
    again), so an accepted event reaches the costs within seconds, not within the next
    minute. Shards busy in another worker are skipped and picked up by the next pass."""
    import time

    from metering import rollup

    if settings.METERING_EVENT_STORE == "clickhouse" and not settings.METERING_CLICKHOUSE_URL:
        # The embedded event store opens in one process only: run_event_pipeline's, which
        # computes the hours itself.
        return "the event pipeline process rolls up (embedded event store)"
    started = time.monotonic()
    deadline = started + seconds
    events = passes = 0
    while True:
        report = rollup.rollup(check_held=False)
        events += report.events
        passes += 1
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
    report.held = rollup.check_horizon()  # once per run, not per pass: one warning a minute
    log.info("rollup.drain", extra={"passes": passes, "events": events, "duration_ms": ms_since(started)})
    for name in settings.METERING_AFTER_ROLLUP_TASKS:  # the credit check reads the new totals
        queue_task(name)
    return f"{passes} passes, {events} events; last: {report.summary()}"
