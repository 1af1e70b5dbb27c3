"""The rollup task through a real worker and a real Redis broker."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import time_machine

from accounts import services as account_services
from accounts.models import Scope
from conftest import Customer, client_with_key
from metering.models import HourlyUsage
from metering.tasks import rollup_usage


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_rollup_task_runs_in_a_real_worker(
    celery_worker: object, catalog: None, customer: Customer, make_account: Callable
) -> None:
    account = make_account(customer.user, currency="USD")
    producer = client_with_key(
        account_services.service_key_create(name="p", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    )
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with time_machine.travel(moment + dt.timedelta(minutes=5), tick=False):
        body = producer.post(
            "/api/v1/usage/events",
            {
                "events": [
                    {
                        "id": "e1",
                        "account_id": account.public_id,
                        "time": moment.isoformat(),
                        "type": "usage",
                        "sku": "network.egress",
                        "quantity": "150",
                    }
                ]
            },
            format="json",
        ).json()
    assert body["accepted"] == 1
    summary = rollup_usage.delay(seconds=0.1, pause=0.05).get(timeout=60)
    assert "1 events" in summary
    row = HourlyUsage.objects.get(account_id=account.id)
    assert (row.quantity, row.amount) == (150, 4.5)
