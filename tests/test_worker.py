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


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_fanned_out_period_close_is_billed_by_the_workers(
    celery_worker: object, catalog: None, customer: object, make_account: object
) -> None:
    import datetime as dt
    import time

    from billing_site.common.actors import Actor
    from invoicing import ledger, services
    from invoicing.billing import Period
    from invoicing.models import Invoice
    from invoicing.tests.factories import rated

    accounts = [make_account(customer.user, currency="EUR") for _ in range(3)]  # type: ignore[attr-defined,operator]
    for account in accounts:
        rated(account.id, "2026-10-02", "compute.vcpu", "1", "10")
    report = services.period_close(
        period=Period(dt.date(2026, 10, 1)), actor=Actor.system("tests"), run_rollup=False, fan_out=True
    )
    assert report.queued_shards == 16 and Invoice.objects.count() <= 3
    deadline = time.monotonic() + 60
    while Invoice.objects.count() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(Invoice.objects.values_list("number", flat=True)) == [f"INV-2026-{n:06d}" for n in (1, 2, 3)]
    assert ledger.check() == []
