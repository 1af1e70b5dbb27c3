"""A real worker through a real Redis broker: the Celery app's wiring works end to end."""

from __future__ import annotations

import pytest

from billing_site.tasks import worker_health


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_runs_tasks_through_redis(celery_worker: object) -> None:
    result = worker_health.delay()
    body = result.get(timeout=30)
    assert body["status"] == "ok"
    assert result.successful()
