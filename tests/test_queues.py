"""Named queues and time limits: every task has both, and the rollup never waits behind PDFs."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import time_machine
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from billing_site.celery import QUEUES, TASKS, app

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)


def our_tasks() -> set[str]:
    app.loader.import_default_modules()
    return {name for name in app.tasks if not name.startswith("celery.")}


def test_every_task_has_a_named_queue_and_soft_and_hard_time_limits() -> None:
    assert our_tasks() == set(TASKS)  # a new task must say where it runs and how long it may
    for name, (queue, soft, hard) in TASKS.items():
        task = app.tasks[name]
        assert app.amqp.router.route({}, name)["queue"].name == queue in QUEUES
        assert (task.soft_time_limit, task.time_limit) == (soft, hard) and 0 < soft < hard
    assert app.amqp.router.route({}, "invoicing.render_documents")["queue"].name == "documents"
    assert app.amqp.router.route({}, "metering.rollup_usage")["queue"].name == "rollup"
    assert app.amqp.router.route({}, "payments.charge")["queue"].name == "payments"  # when it arrives


def test_a_killed_workers_messages_come_back_after_the_longest_hard_limit_and_no_sooner() -> None:
    from billing_site.celery import VISIBILITY_TIMEOUT_SECONDS

    longest = max(hard for _, _, hard in TASKS.values())
    assert app.conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT_SECONDS
    assert longest < VISIBILITY_TIMEOUT_SECONDS <= longest + 60  # never redelivered while it runs
    assert VISIBILITY_TIMEOUT_SECONDS == 62 * 60  # what the README says


def test_a_worker_started_without_queues_serves_all_of_them() -> None:
    assert (
        set(app.amqp.queues.consume_from)
        == set(QUEUES)
        == {"rollup", "invoicing", "documents", "payments", "antifraud", "default"}
    )


@pytest.fixture
def rollup_worker(redis_url: str) -> Iterator[str]:
    """A real worker that consumes the ``rollup`` queue only (``celery worker -Q rollup``), on
    broker keys of this test's own (another run's workers on the same Redis never see them).
    Yields the key prefix."""
    import redis
    from celery.contrib.testing.worker import start_worker

    prefix = f"test-queues-{uuid.uuid4().hex}:"

    def reconfigure(**conf: object) -> None:
        app.conf.update(conf)
        app._backend_cache = None
        app._local.__dict__.pop("backend", None)
        app._pool = None
        app.amqp._producer_pool = None

    names = ("broker_url", "result_backend", "task_always_eager", "broker_transport_options")
    saved = {k: app.conf[k] for k in names}
    reconfigure(
        broker_url=redis_url,
        result_backend=redis_url,
        task_always_eager=False,
        broker_transport_options={"global_keyprefix": prefix},
    )
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30, queues=["rollup"]):
            yield prefix
    finally:
        app.amqp.queues._consume_from = None  # -Q selected a subset on the shared app: undo it
        reconfigure(**saved)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_rollup_runs_while_document_renders_wait_in_their_own_queue(
    rollup_worker: str, redis_url: str, catalog: None, producer: APIClient, account: BillingAccount
) -> None:
    import redis

    from invoicing.tasks import render_documents
    from metering.models import HourlyUsage
    from metering.tasks import rollup_usage

    events: list[dict[str, Any]] = [
        {
            "id": f"e-{n}",
            "account_id": account.public_id,
            "time": "2026-11-03T10:15:00Z",
            "type": "usage",
            "sku": "network.egress",
            "quantity": "1",
        }
        for n in range(3)
    ]
    with time_machine.travel(NOW, tick=False):
        assert producer.post("/api/v1/usage/events", {"events": events}, format="json").status_code == 200
    # A period close's worth of renders is queued first, then the every-minute rollup.
    for chunk in range(50):
        render_documents.delay(kind="invoice", source_ids=list(range(chunk * 500, chunk * 500 + 500)))
    result = rollup_usage.delay(seconds=0, pause=0)

    assert result.get(timeout=60).startswith("1 passes, 3 events")
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(f"{rollup_worker}documents") == 50  # every render still waits, none was taken
    assert broker.llen(f"{rollup_worker}rollup") == 0
    assert [row.quantity for row in HourlyUsage.objects.filter(account_id=account.id)] == [3]
