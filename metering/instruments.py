"""What the ingest path counts for ``/metrics``: events by outcome, rejections by code, whole
batches refused, and each batch's latency. Counted in the process that ingests (a gunicorn
worker); with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client writes them to files there
that the ``/metrics`` view of any worker on the host sums (``billing_site/backoffice/metrics.py``).
Everything else ``/metrics`` shows is read from the database when it is scraped."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "billing_ingest_events",
    "Usage events received through POST /api/v1/usage/events, by outcome (accepted, duplicate, rejected)",
    ["outcome"],
)
REJECTED = Counter(
    "billing_ingest_rejected_events",
    "Usage events rejected, by code (invalid, unknown_account, too_old, conflict, ...)",
    ["code"],
)
BATCHES_REFUSED = Counter(
    "billing_ingest_batches_refused",
    "Whole batches refused (nothing of them accepted), by code (payload_too_large, malformed_request, "
    "log_unavailable, ...)",
    ["code"],
)
LATENCY = Histogram(
    "billing_ingest_batch_seconds",
    "Time to ingest one batch (decode, check, store or publish), seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def batch_done(*, accepted: int, duplicates: int, rejected_codes: list[str], seconds: float) -> None:
    if accepted:
        EVENTS.labels("accepted").inc(accepted)
    if duplicates:
        EVENTS.labels("duplicate").inc(duplicates)
    if rejected_codes:
        EVENTS.labels("rejected").inc(len(rejected_codes))
        counts: dict[str, int] = {}
        for code in rejected_codes:
            counts[code] = counts.get(code, 0) + 1
        for code, count in counts.items():
            REJECTED.labels(code).inc(count)
    LATENCY.observe(seconds)


def batch_refused(*, code: str, seconds: float) -> None:
    BATCHES_REFUSED.labels(code).inc()
    LATENCY.observe(seconds)
