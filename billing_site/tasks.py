"""Operational tasks of the project itself (not of one bounded context)."""

from __future__ import annotations

from celery import shared_task
from django.db import connection
from django.utils import timezone


@shared_task(name="billing_site.worker_health")
def worker_health() -> dict[str, str]:
    """Round trip through the broker and the database: what a probe or an operator runs
    to know a worker is alive and can reach PostgreSQL
    (``celery -A billing_site call billing_site.worker_health``)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        (db_now,) = cursor.fetchone()
    return {"status": "ok", "database_time": db_now.isoformat(), "worker_time": timezone.now().isoformat()}


@shared_task(name="billing_site.outbox_drain")
def outbox_drain() -> int:
    """Deliver what the outbox holds (beat, every 15 s): side effects whose prompt delivery
    after commit did not happen (a crash, a broker outage)."""
    from billing_site.outbox import services

    return services.drain()
