"""/metrics, /healthz and /readyz: refused without the token or an allowed address, served with
it, the named families present with values that follow the data; health and readiness with a
migrated database, an unapplied migration and an unreachable database."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from antifraud.models import AccountRisk, RiskStatus
from billing_site.backoffice import health
from billing_site.outbox import services as outbox_services
from metering.tests.support import used
from payments.models import WebhookEvent

TOKEN = "s3cret-scrape-token"


@pytest.fixture
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOWED_IPS = []


def scrape(**headers: str) -> Any:
    return Client().get("/metrics", headers=headers)


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.mark.django_db
def test_metrics_is_a_404_until_configured(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_IPS = []
    assert scrape().status_code == 404
    assert scrape(Authorization="Bearer anything").status_code == 404


@pytest.mark.django_db
def test_metrics_refused_without_the_token_or_with_a_wrong_one(metrics_on: None) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        response = scrape(**headers)
        assert response.status_code == 403, headers
        assert b"billing_" not in response.content


@pytest.mark.django_db
def test_metrics_by_address_allow_list(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_IPS = ["10.1.0.0/16"]
    assert Client(REMOTE_ADDR="10.2.0.5").get("/metrics").status_code == 403
    response = Client(REMOTE_ADDR="10.1.7.9").get("/metrics")
    assert response.status_code == 200
    assert b"billing_outbox_pending" in response.content


@pytest.mark.django_db
def test_metrics_follow_the_outbox_webhooks_fraud_queue_and_accounts(metrics_on: None, account: BillingAccount) -> None:
    before = samples(scrape(Authorization=f"Bearer {TOKEN}").content)
    assert value(before, "billing_outbox_pending") == 0
    assert value(before, "billing_webhook_events_unprocessed", status="pending") == 0
    assert value(before, "billing_fraud_review_queue") == 0
    assert value(before, "billing_accounts", state="pending") == BillingAccount.objects.filter(state="pending").count()
    assert value(before, "billing_accounts", state="closed") == 0

    from django.db import transaction

    with transaction.atomic():
        outbox_services.enqueue_task("billing_site.worker_health", prompt=False)
    WebhookEvent.objects.create(
        gateway="stripe", event_id="evt_1", type="charge.succeeded", payload={}, received_at=timezone.now()
    )
    WebhookEvent.objects.create(
        gateway="stripe",
        event_id="evt_2",
        type="charge.refunded",
        payload={},
        status="failed",
        received_at=timezone.now() - dt.timedelta(minutes=20),
    )
    AccountRisk.objects.create(
        account_id=account.id, status=RiskStatus.REVIEW, score=80, flagged_at=timezone.now() - dt.timedelta(hours=3)
    )

    response = scrape(Authorization=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    after = samples(response.content)
    assert value(after, "billing_outbox_pending") == 1
    assert value(after, "billing_webhook_events_unprocessed", status="pending") == 1
    assert value(after, "billing_webhook_events_unprocessed", status="failed") == 1
    assert (value(after, "billing_webhook_events_oldest_seconds", status="failed") or 0) >= 20 * 60 - 5
    assert value(after, "billing_fraud_review_queue") == 1
    assert (value(after, "billing_fraud_review_oldest_seconds") or 0) >= 3 * 3600 - 5
    for section in ("rollup", "period_close", "payments", "outbox", "queues", "fraud", "accounts"):
        assert value(after, "billing_metrics_section_failed", section=section) == 0, section


@pytest.mark.django_db
def test_metrics_count_ingested_events_and_show_rollup_lag_per_shard(
    metrics_on: None, usage_account: BillingAccount, producer: APIClient
) -> None:
    before = samples(scrape(Authorization=f"Bearer {TOKEN}").content)
    now = timezone.now()
    events = [used(usage_account, f"e{i}", now - dt.timedelta(minutes=5), "1") for i in range(3)]
    events.append(used(usage_account, "bad", now - dt.timedelta(days=400), "1"))  # too_old
    answer = producer.post("/api/v1/usage/events", {"events": events}, format="json")
    assert answer.status_code == 200 and answer.json()["accepted"] == 3
    assert producer.post("/api/v1/usage/events", b"{not json", content_type="application/json").status_code == 400

    after = samples(scrape(Authorization=f"Bearer {TOKEN}").content)

    def delta(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert delta("billing_ingest_events_total", outcome="accepted") == 3
    assert delta("billing_ingest_events_total", outcome="rejected") == 1
    assert delta("billing_ingest_rejected_events_total", code="too_old") == 1
    assert delta("billing_ingest_batches_refused_total", code="malformed_request") == 1
    assert delta("billing_ingest_batch_seconds_count") == 2
    from metering import selectors

    shard = str(next(p.shard for p in selectors.rollup_progress() if p.events_waiting))
    assert value(after, "billing_rollup_events_waiting", shard=shard) == 3
    assert value(after, "billing_rollup_lag_seconds", shard=shard) is not None
    assert (value(after, "billing_rollup_lag_seconds", shard=shard) or 0) >= 0
    assert sum(v for (name, _), v in after.items() if name == "billing_rollup_events_waiting") == 3


def test_ingest_counters_add_up_across_processes(tmp_path: Path, metrics_on: None, db: None) -> None:
    """Multiprocess mode: two processes count (as two gunicorn workers would), /metrics sums them."""
    code = (
        "from metering import instruments; "
        "instruments.batch_done(accepted=5, duplicates=1, rejected_codes=['too_old'], seconds=0.02)"
    )
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
            cwd=Path(__file__).resolve().parents[3],
        )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    try:
        found = samples(scrape(Authorization=f"Bearer {TOKEN}").content)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert value(found, "billing_ingest_events_total", outcome="accepted") == 10
    assert value(found, "billing_ingest_events_total", outcome="duplicate") == 2
    assert value(found, "billing_ingest_rejected_events_total", code="too_old") == 2
    assert value(found, "billing_ingest_batch_seconds_count") == 2
    assert value(found, "billing_outbox_pending") == 0  # the database's figures are there too


def test_healthz_needs_no_database() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_on_a_migrated_database() -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["migrations"] == {"ok": True}
    assert "broker" not in body["checks"]  # none configured in the tests


@pytest.mark.django_db
def test_readyz_503_while_a_migration_is_unapplied() -> None:
    app, name = next(leaf for leaf in health.migration_leaves() if leaf[0] == "metering")
    with connection.cursor() as cursor:  # undone with the test's transaction
        cursor.execute("DELETE FROM django_migrations WHERE app = %s AND name = %s", [app, name])
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["migrations"] == {"ok": False, "unapplied": [f"{app}.{name}"]}


def test_readyz_503_when_the_database_is_unreachable() -> None:
    """In a process of its own whose DATABASE_URL points at a port nothing listens on."""
    from conftest import ROOT, free_port

    code = (
        "import django, json; django.setup(); from django.test import Client; "
        "r = Client(HTTP_HOST='localhost').get('/readyz'); print(r.status_code); print(r.content.decode())"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
        "DATABASE_URL": f"postgres://nobody@127.0.0.1:{free_port()}/nothing",
        "LOG_LEVEL": "CRITICAL",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    status, body = out.stdout.strip().splitlines()[-2:]
    assert status == "503", out.stdout + out.stderr
    checks = json.loads(body)["checks"]
    assert checks["database"]["ok"] is False and "OperationalError" in checks["database"]["error"]
    assert checks["migrations"] == {"ok": False, "error": "database unreachable"}


@pytest.mark.django_db
def test_readyz_checks_the_broker_when_one_is_configured(settings: Any) -> None:
    from conftest import free_port

    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"]["ok"] is False


@pytest.mark.django_db
def test_queue_lengths_and_readiness_with_a_real_redis_broker(settings: Any, metrics_on: None, redis_url: str) -> None:
    """Messages published to the rollup and documents queues by kombu (what Celery does) are
    counted per queue; /readyz checks the broker and is ready."""
    from kombu import Connection

    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = redis_url
    before = samples(scrape(Authorization=f"Bearer {TOKEN}").content)
    with Connection(redis_url) as conn:
        rollup, documents = conn.SimpleQueue("rollup"), conn.SimpleQueue("documents")
        for n in range(3):
            rollup.put({"n": n})
        documents.put({"n": 0}, priority=6)  # kombu keeps priorities in lists of their own
        rollup.close()
        documents.close()
    after = samples(scrape(Authorization=f"Bearer {TOKEN}").content)

    def delta(queue: str) -> float:
        return (value(after, "billing_celery_queue_length", queue=queue) or 0) - (
            value(before, "billing_celery_queue_length", queue=queue) or 0
        )

    assert delta("rollup") == 3
    assert delta("documents") == 1
    assert delta("payments") == 0
    assert value(after, "billing_metrics_section_failed", section="queues") == 0
    ready = Client().get("/readyz")
    assert ready.status_code == 200, ready.content
    assert ready.json()["checks"]["broker"] == {"ok": True}
