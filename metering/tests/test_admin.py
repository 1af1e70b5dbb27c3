"""The catalog admin writes through the catalog service: new prices, never edited ones."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import pytest
from django.test import Client

from accounts import services as account_services
from conftest import staff_login
from metering.models import Price, Sku

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(catalog: None) -> Client:
    user = account_services.operator_create(email="cat@ops.test", password="pw-long-enough", groups=[], superuser=True)
    return staff_login(Client(), user)


def test_lists_and_pages_render(staff: Client) -> None:
    assert b"network.egress" in staff.get("/admin/metering/sku/").content
    assert b"up to 100: 0" in staff.get("/admin/metering/price/").content
    sku = Sku.objects.get(code="network.egress")
    assert staff.get(f"/admin/metering/sku/{sku.pk}/change/").status_code == 200
    price = Price.objects.filter(sku=sku).first()
    assert price is not None and staff.get(f"/admin/metering/price/{price.pk}/change/").status_code == 200


def test_add_a_sku_and_rename_it(staff: Client) -> None:
    response = staff.post(
        "/admin/metering/sku/add/", {"code": "gpu.h100", "name": "H100", "unit": "gpu-hour", "kind": "duration"}
    )
    assert response.status_code == 302, response.content[:3000]
    sku = Sku.objects.get(code="gpu.h100")
    staff.post(
        f"/admin/metering/sku/{sku.pk}/change/",
        {"name": "NVIDIA H100", "unit": "gpu-hour", "prices-TOTAL_FORMS": "0", "prices-INITIAL_FORMS": "0"},
    )
    sku.refresh_from_db()
    assert (sku.name, sku.kind) == ("NVIDIA H100", "duration")
    bad = staff.post("/admin/metering/sku/add/", {"code": "Bad Code!", "name": "x", "unit": "x", "kind": "quantity"})
    assert bad.status_code == 200 and not Sku.objects.filter(name="x").exists()


def test_add_a_superseding_price_and_refuse_a_changed_one(staff: Client) -> None:
    sku = Sku.objects.get(code="compute.vcpu")
    response = staff.post(
        "/admin/metering/price/add/",
        {
            "sku": sku.pk,
            "currency": "USD",
            "valid_from_0": "2026-12-01",
            "valid_from_1": "00:00:00",
            "unit_price": "0.0105",
        },
    )
    assert response.status_code == 302, response.content[:3000]
    assert Price.objects.filter(sku=sku, currency="USD").count() == 3
    again = staff.post(
        "/admin/metering/price/add/",
        {
            "sku": sku.pk,
            "currency": "USD",
            "valid_from_0": "2026-12-01",
            "valid_from_1": "00:00:00",
            "unit_price": "0.02",
        },
    )
    assert again.status_code == 200 and b"never change" in again.content
    tiered = staff.post(
        "/admin/metering/price/add/",
        {
            "sku": Sku.objects.get(code="network.egress").pk,
            "currency": "USD",
            "valid_from_0": "2027-01-01",
            "valid_from_1": "00:00:00",
            "tiers_json": '[{"up_to": "50", "unit_price": "0"}, {"up_to": null, "unit_price": "0.05"}]',
        },
    )
    assert tiered.status_code == 302, tiered.content[:3000]
    price = Price.objects.get(sku__code="network.egress", currency="USD", valid_from__year=2027)
    assert [(t.up_to, t.unit_price) for t in price.tiers.all()] == [(Decimal(50), Decimal(0)), (None, Decimal("0.05"))]


def test_admin_refuses_what_the_catalog_refuses_with_form_errors(staff: Client) -> None:
    existing = staff.post(
        "/admin/metering/sku/add/", {"code": "compute.vcpu", "name": "Other", "unit": "x", "kind": "quantity"}
    )
    assert existing.status_code == 200 and b"exists" in existing.content
    assert Sku.objects.get(code="compute.vcpu").name == "vCPU"
    chf = staff.post(
        "/admin/metering/price/add/",
        {
            "sku": Sku.objects.get(code="compute.vcpu").pk,
            "currency": "CHF",
            "valid_from_0": "2027-01-01",
            "valid_from_1": "00:00:00",
            "unit_price": "1",
        },
    )
    assert chf.status_code == 200 and b"CHF" in chf.content


@pytest.mark.django_db(transaction=True)
def test_the_usage_page_shows_costs_resources_and_data_quality(
    catalog: None, customer: object, make_account: object
) -> None:

    import time_machine

    from accounts.models import Scope
    from conftest import client_with_key
    from metering import rollup
    from metering.tests.test_rollup import NOW, at, lifecycle, used

    account = make_account(customer.user, currency="USD")  # type: ignore[attr-defined, operator]
    producer = client_with_key(
        account_services.service_key_create(name="p", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    )
    with time_machine.travel(NOW, tick=False):
        producer.post(
            "/api/v1/usage/events",
            {
                "events": [
                    lifecycle(account, "s", at("2026-11-02 08:00:00"), "start"),
                    lifecycle(
                        account,
                        "s2",
                        at("2026-11-02 09:00:00"),
                        "start",
                        labels={"project": "<b>apollo</b>", "team": "infra"},
                    ),
                    used(account, "u", at("2026-11-02 08:30:00"), "150"),
                ]
            },
            format="json",
        )
    rollup.rollup(now=NOW)
    support = account_services.operator_create(email="s@ops.test", password="pw-long-enough", groups=["support"])
    client = staff_login(Client(), support)
    assert b"Usage and costs" in client.get("/admin/metering/rollupshard/").content
    page = client.get(
        "/admin/metering/rollupshard/usage/", {"account": account.public_id, "start": "2026-11-01", "end": "2026-11-04"}
    )
    html = page.content.decode()
    assert page.status_code == 200
    assert "network.egress" in html and "compute.vcpu" in html and "vm-1" in html
    assert "Start for a running resource (taken as update)</th><td>1</td>" in html
    # Spec and labels as a small definition list, escaped; never a Python dict.
    assert "<dt>compute.vcpu</dt><dd>2</dd>" in html
    assert (
        "<dt>project</dt><dd>&lt;b&gt;apollo&lt;/b&gt;</dd><dt>team</dt><dd>infra</dd>" in html
        and "<b>apollo</b>" not in html
    )
    assert "{'" not in html and "{&#x27;" not in html
    # The range and the currency are said, on the total too.
    assert "usage from <strong>2026-11-01</strong> to <strong>2026-11-03</strong>" in html
    assert f"{account.name} ({account.public_id}), billed in USD" in html
    assert re.search(r"total \d+\.\d{2} USD\)", html), html


def _rated_day(account_id: int, day: str, sku: str, quantity: str, amount: str) -> None:
    """A day of rated usage where the rollup leaves it (the usage page reads the daily rollup)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount) "
            "VALUES (%s, %s, %s, '', '{}', %s, %s)",
            [
                account_id,
                dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC),
                sku,
                Decimal(quantity),
                Decimal(amount),
            ],
        )


def test_the_usage_page_defaults_to_this_month(catalog: None, customer: object, make_account: object) -> None:
    import time_machine

    account = make_account(customer.user, currency="EUR", name="Range GmbH")  # type: ignore[operator]
    _rated_day(account.id, "2026-10-31", "network.egress", "1", "5")  # last month: not shown
    _rated_day(account.id, "2026-11-30", "network.egress", "2", "1.25")  # this month's last day
    _rated_day(account.id, "2026-12-01", "network.egress", "3", "7")  # next month: not shown
    with time_machine.travel(dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC), tick=False):
        support = account_services.operator_create(email="s@ops.test", password="pw-long-enough", groups=["support"])
        client = staff_login(Client(), support)
        empty = client.get("/admin/metering/rollupshard/usage/").content.decode()
        assert 'value="2026-11-01"' in empty and 'value="2026-12-01"' in empty  # the form opens on this month
        html = client.get("/admin/metering/rollupshard/usage/", {"account": account.public_id}).content.decode()
    assert "usage from <strong>2026-11-01</strong> to <strong>2026-11-30</strong> inclusive" in html
    assert "the range ends before 2026-12-01" in html
    assert "total 1.25 EUR" in html and "2026-11-30" in html
    assert "2026-10-31" not in html and "2026-12-01</td>" not in html
