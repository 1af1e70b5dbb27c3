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
    from invoicing.tests.factories import rated
    from invoicing.tests.support import FINANCE, NOW, OCTOBER

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


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_rollup_queues_the_credit_check_and_a_worker_issues_the_threshold_invoice(
    celery_worker: object, catalog: None, customer: object, make_account: object
) -> None:
    import datetime as dt
    from decimal import Decimal

    import time_machine

    from accounts import services as account_services
    from accounts.models import Scope
    from conftest import client_with_key, wait_for
    from invoicing.models import Invoice, InvoiceKind
    from metering.tasks import rollup_usage

    # Active, with a credit limit of 1.00 USD: 150 GB of egress (4.50 USD) passes it.
    account = make_account(customer.user, currency="USD", state="active", credit_limit=Decimal(1))  # type: ignore[attr-defined,operator]
    producer = client_with_key(
        account_services.service_key_create(name="p", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    )
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with time_machine.travel(moment + dt.timedelta(minutes=5), tick=False):
        event = {
            "id": "e1",
            "account_id": account.public_id,
            "time": moment.isoformat(),
            "type": "usage",
            "sku": "network.egress",
            "quantity": "150",
        }
        assert producer.post("/api/v1/usage/events", {"events": [event]}, format="json").json()["accepted"] == 1
    assert "1 events" in rollup_usage.delay(seconds=0.1, pause=0.05).get(timeout=60)
    # The drain queued `invoicing.threshold_billing` by name (METERING_AFTER_ROLLUP_TASKS); the
    # worker ran it: a threshold invoice of the 4.50 so far, with 21 % Dutch VAT.
    threshold = Invoice.objects.filter(account_id=account.id, kind=InvoiceKind.THRESHOLD)
    assert wait_for(threshold.exists, seconds=60)
    early = threshold.get()
    assert (early.subtotal_minor, early.tax_minor, early.total_minor) == (450, 95, 545)
