from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from conftest import Customer, client_with_key
from metering import selectors

CATALOG = Path(__file__).resolve().parent.parent / "fixtures" / "catalog.json"


@pytest.fixture
def catalog(db: None) -> None:
    from io import StringIO

    call_command("load_catalog", str(CATALOG), stdout=StringIO())
    selectors.sku_cache_clear()


@pytest.fixture
def producer(db: None) -> APIClient:
    key = account_services.service_key_create(name="producer", scopes=[Scope.USAGE_WRITE], created_by_id=None)
    return client_with_key(key.raw)


@pytest.fixture
def usage_account(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="USD")


@pytest.fixture
def send(producer: APIClient) -> Callable[..., Any]:
    def send_events(events: list[dict[str, Any]], client: APIClient | None = None) -> Any:
        return (client or producer).post("/api/v1/usage/events", {"events": events}, format="json")

    return send_events


@pytest.fixture(autouse=True)
def _clean_metering_tables(request: pytest.FixtureRequest) -> None:
    """Tests that commit (``transaction=True``) are cleaned by Django's flush, which leaves the
    hand-made metering tables alone: empty them too, so each such test starts from nothing."""
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        return
    request.getfixturevalue("transactional_db")
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE metering_usageevent, metering_resourceevent, metering_resourcestate, metering_hourlyusage, "
            "metering_dailyusage, metering_monthlyspend"
        )
