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
    import time_machine

    from conftest import wait_for
    from invoicing import ledger, services
    from invoicing.models import Invoice
    from invoicing.tests.conftest import FINANCE, NOW, OCTOBER
    from invoicing.tests.factories import rated

    accounts = [make_account(customer.user, currency="EUR") for _ in range(3)]  # type: ignore[attr-defined,operator]
    for account in accounts:
        rated(account.id, "2026-10-02", "compute.vcpu", "1", "10")
    with time_machine.travel(NOW, tick=False):  # the worker's thread issues on the same clock
        report = services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, fan_out=True)
        assert report.queued_shards == 16 and Invoice.objects.count() <= 3
        assert wait_for(lambda: Invoice.objects.count() >= 3, seconds=60)
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == [f"INV-{NOW.year}-{n:06d}" for n in (1, 2, 3)]
    assert {invoice.issued_at for invoice in Invoice.objects.all()} == {NOW}
    assert ledger.check() == []
