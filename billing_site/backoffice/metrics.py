"""``GET /metrics``: the Prometheus text format (prometheus-client), for the team on call.

Two kinds of figures, each where it can be true:

- **Counted in the ingest path** (``metering.instruments``): events accepted, duplicate and
  rejected by code, whole batches refused, each batch's latency. They happen in the web
  processes, so they are counted there. Under gunicorn each worker is a process of its own: with
  ``PROMETHEUS_MULTIPROC_DIR`` set (an empty directory per host, emptied when the service
  starts), prometheus-client's multiprocess mode writes every worker's counts to files there and
  this view sums them, whichever worker Prometheus reaches. Without it (``runserver``, one
  process, the tests) the process's own counters are served.
- **Read from the database when scraped** (everything else): rollup progress per shard, the
  period close, payments, webhooks, the outbox, the fraud queue, accounts by state; and the
  broker's queue lengths. Celery workers run on other hosts and die and restart, so counters
  kept in them would be scattered and lost; the database is the one place that knows. Each
  read is one set-based statement through the app's selector (the same ones the staff home page
  uses), fast at a million accounts (``bench/backoffice.py``). A section that fails is reported
  as ``billing_metrics_section_failed{section="…"} 1`` and the rest is still served.

Access: ``METRICS_TOKEN`` (``Authorization: Bearer …``) or ``METRICS_ALLOWED_IPS``; a 403
otherwise, and a 404 when neither is configured. The metrics are listed in
``docs/operations.md``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Iterator

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from accounts import selectors as account_selectors
from antifraud import selectors as antifraud_selectors
from billing_site.backoffice import broker
from billing_site.common.backlogs import Backlog
from billing_site.common.views import client_ip
from billing_site.outbox import selectors as outbox_selectors
from invoicing import selectors as invoicing_selectors
from metering import selectors as metering_selectors
from payments import selectors as payment_selectors

log = logging.getLogger(__name__)

PAYMENTS_WINDOW = dt.timedelta(hours=1)


def _seconds(delta: dt.timedelta | None) -> float:
    return 0.0 if delta is None else delta.total_seconds()


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def rollup_metrics(now: dt.datetime) -> Iterator[Metric]:
    progress = metering_selectors.rollup_progress()
    lag = _gauge(
        "billing_rollup_lag_seconds", "Age of the oldest work waiting for the rollup in a shard (0: none)", ["shard"]
    )
    since = _gauge("billing_rollup_last_run_age_seconds", "Time since the shard's last rollup run committed", ["shard"])
    duration = _gauge("billing_rollup_last_duration_seconds", "Duration of the shard's last rollup run", ["shard"])
    waiting = _gauge(
        "billing_rollup_events_waiting",
        f"Committed events not rolled up yet (counted up to {metering_selectors.WAITING_COUNT_CAP})",
        ["shard"],
    )
    hours = _gauge("billing_rollup_hours_waiting", "Dirty hours not recomputed yet (the scale path)", ["shard"])
    processed = _gauge("billing_rollup_events_processed", "Events the shard's rollup has taken, all time", ["shard"])
    for shard in progress:
        label = [str(shard.shard)]
        lag.add_metric(label, _seconds(shard.lag(now)))
        if shard.last_run_at is not None:
            since.add_metric(label, _seconds(shard.since_last_run(now)))
        if shard.last_duration_ms is not None:
            duration.add_metric(label, shard.last_duration_ms / 1000)
        waiting.add_metric(label, shard.events_waiting)
        hours.add_metric(label, shard.hours_waiting)
        processed.add_metric(label, shard.events_processed)
    yield from (lag, since, duration, waiting, hours, processed)


def period_close_metrics(now: dt.datetime) -> Iterator[Metric]:
    progress = invoicing_selectors.period_close_progress()
    invoices = _gauge(
        "billing_period_close_invoices", "Monthly invoices of the newest closed period, by status", ["period", "status"]
    )
    last = _gauge(
        "billing_period_close_last_issued_timestamp_seconds",
        "When the newest period's last monthly invoice was issued (Unix time)",
        ["period"],
    )
    if progress is not None:
        for status, count in sorted(progress.by_status.items()):
            invoices.add_metric([progress.label, status], count)
        if progress.last_issued_at is not None:
            last.add_metric([progress.label], progress.last_issued_at.timestamp())
    yield from (invoices, last)


def payment_metrics(now: dt.datetime) -> Iterator[Metric]:
    recent = _gauge(
        "billing_payments_last_hour",
        "Payments whose state last changed in the past hour, by status and decline code",
        ["status", "decline_code"],
    )
    for (status, code), count in sorted(payment_selectors.payment_outcomes(since=now - PAYMENTS_WINDOW).items()):
        recent.add_metric([status, code], count)
    open_ = _gauge("billing_payments_open", "Payments not finished, by status", ["status"])
    oldest = _gauge(
        "billing_payments_open_oldest_seconds", "Age of the oldest unfinished payment, by status", ["status"]
    )
    for status, backlog in payment_selectors.payments_open().items():
        open_.add_metric([status], backlog.count)
        oldest.add_metric([status], _seconds(backlog.age(now)))
    webhooks = _gauge(
        "billing_webhook_events_unprocessed", "Gateway webhook events not processed, by status", ["status"]
    )
    webhooks_oldest = _gauge(
        "billing_webhook_events_oldest_seconds", "Age of the oldest unprocessed webhook event, by status", ["status"]
    )
    for status, backlog in payment_selectors.webhook_backlog().items():
        webhooks.add_metric([status], backlog.count)
        webhooks_oldest.add_metric([status], _seconds(backlog.age(now)))
    yield from (recent, open_, oldest, webhooks, webhooks_oldest)


def _backlog_metrics(
    backlog: Backlog, now: dt.datetime, *, count: tuple[str, str], oldest: tuple[str, str]
) -> Iterator[Metric]:
    """A backlog as two gauges: how many wait (``count``: name, help) and how long the oldest
    has waited (``oldest``: name, help)."""
    yield GaugeMetricFamily(*count, value=backlog.count)
    yield GaugeMetricFamily(*oldest, value=_seconds(backlog.age(now)))


def outbox_metrics(now: dt.datetime) -> Iterator[Metric]:
    yield from _backlog_metrics(
        outbox_selectors.backlog(),
        now,
        count=("billing_outbox_pending", "Outbox messages not delivered yet"),
        oldest=("billing_outbox_oldest_seconds", "Age of the oldest undelivered outbox message"),
    )


def queue_metrics(now: dt.datetime) -> Iterator[Metric]:
    lengths = broker.queue_lengths()
    if lengths is None:
        return
    gauge = _gauge("billing_celery_queue_length", "Messages waiting in the Celery queue (Redis broker)", ["queue"])
    for name, length in lengths.items():
        gauge.add_metric([name], length)
    yield gauge


def fraud_metrics(now: dt.datetime) -> Iterator[Metric]:
    yield from _backlog_metrics(
        antifraud_selectors.review_queue_backlog(),
        now,
        count=("billing_fraud_review_queue", "Accounts waiting for a fraud review"),
        oldest=("billing_fraud_review_oldest_seconds", "How long the oldest account in the review queue has waited"),
    )


def account_metrics(now: dt.datetime) -> Iterator[Metric]:
    gauge = _gauge("billing_accounts", "Billing accounts by state", ["state"])
    for state, count in account_selectors.billing_account_counts_by_state().items():
        gauge.add_metric([state], count)
    yield gauge


SECTIONS: dict[str, Callable[[dt.datetime], Iterator[Metric]]] = {
    "rollup": rollup_metrics,
    "period_close": period_close_metrics,
    "payments": payment_metrics,
    "outbox": outbox_metrics,
    "queues": queue_metrics,
    "fraud": fraud_metrics,
    "accounts": account_metrics,
}


class DatabaseCollector(Collector):
    """The figures read at scrape time; a section that fails is flagged, the others served."""

    def collect(self) -> Iterable[Metric]:
        now = timezone.now()
        failed = _gauge("billing_metrics_section_failed", "1 when a section of /metrics could not be read", ["section"])
        for name, section in SECTIONS.items():
            try:
                metrics = list(section(now))
            except Exception:
                log.exception("metrics.section_failed", extra={"section": name})
                failed.add_metric([name], 1)
                continue
            failed.add_metric([name], 0)
            yield from metrics
        yield failed


class _ProcessCollector(Collector):
    """This process's own registry (the ingest counters; Python's process and GC figures)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.MultiProcessCollector(registry, path=directory)
    else:
        registry.register(_ProcessCollector())
    registry.register(DatabaseCollector())
    return registry


def allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    if settings.METRICS_ALLOWED_IPS:
        address = client_ip(request)  # type: ignore[arg-type]
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in settings.METRICS_ALLOWED_IPS)
    return False


@require_GET
@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not settings.METRICS_TOKEN and not settings.METRICS_ALLOWED_IPS:
        raise Http404("metrics are not enabled (METRICS_TOKEN, METRICS_ALLOWED_IPS)")
    if not allowed(request):
        response = HttpResponse("403 Forbidden: a bearer token or an allowed address is needed\n", status=403)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        response["Content-Type"] = "text/plain; charset=utf-8"
        return response
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
