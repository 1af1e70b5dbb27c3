"""GET /api/v1/billing-accounts/{id}/costs: breakdowns equal the sum of the hourly rows,
at every granularity and grouping; tenancy; bad parameters named."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from conftest import Customer, client_with_key
from metering.models import HourlyUsage
from metering.tests.test_rollup import NOW, at, lifecycle, roll, used

# The data is of October and November 2026, read as of NOW: hourly detail is kept for a
# number of months back from today, so the clock is the data's, not the calendar's.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.clock(NOW, tick=True)]


@pytest.fixture
def billed(catalog: None, customer: Customer, make_account: Callable, post: Callable) -> BillingAccount:
    account = make_account(customer.user, currency="USD")
    post(
        [
            lifecycle(
                account,
                "s1",
                at("2026-10-31 20:30:00"),
                "start",
                resource_id="vm-1",
                spec={"compute.vcpu": 2, "compute.ram": 4},
                labels={"project": "web", "env": "prod"},
            ),
            lifecycle(account, "x1", at("2026-11-01 03:00:00"), "stop", resource_id="vm-1"),
            lifecycle(
                account,
                "s2",
                at("2026-11-01 01:15:00"),
                "start",
                resource_id="vm-2",
                spec={"compute.vcpu": 8},
                labels={"project": "ml"},
            ),
            lifecycle(account, "x2", at("2026-11-02 02:00:00"), "stop", resource_id="vm-2"),
            used(account, "e1", at("2026-10-31 21:05:00"), "80", resource_id="vm-1"),
            used(account, "e2", at("2026-11-01 00:05:00"), "90", resource_id="vm-1"),
            used(account, "e3", at("2026-11-01 05:05:00"), "30"),
            used(account, "r1", at("2026-11-01 05:10:00"), "120000", sku="storage.object.requests"),
        ]
    )
    roll(account)
    return account


@pytest.fixture
def post(producer: APIClient) -> Callable:
    import time_machine

    from metering.tests.test_rollup import NOW

    def send(events: list[dict[str, Any]]) -> None:
        with time_machine.travel(NOW, tick=False):
            assert not producer.post("/api/v1/usage/events", {"events": events}, format="json").json()["rejected"]

    return send


def costs(client: APIClient, account: BillingAccount | str, **params: str) -> Any:
    public = account if isinstance(account, str) else account.public_id
    return client.get(f"/api/v1/billing-accounts/{public}/costs", params)


def expected(account: BillingAccount, granularity: str, dims: list[str]) -> dict[tuple, tuple[Decimal, Decimal]]:
    """The breakdown computed in Python from the hourly rows."""
    out: dict[tuple, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for row in HourlyUsage.objects.filter(account_id=account.id):
        if granularity == "hour":
            period = row.hour.strftime("%Y-%m-%dT%H:%M:%SZ")
        elif granularity == "day":
            period = row.hour.date().isoformat()
        else:
            period = row.hour.date().replace(day=1).isoformat()
        key: list[Any] = [period]
        for dim in dims:
            if dim == "sku":
                key.append(row.sku)
            elif dim == "resource":
                key.append(row.resource_id)
            else:
                key.append(row.labels.get(dim.removeprefix("label:")))
        totals = out[tuple(key)]
        totals[0] += row.quantity
        totals[1] += row.amount or 0
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.parametrize("granularity", ["hour", "day", "month"])
@pytest.mark.parametrize("dims", [[], ["sku"], ["resource"], ["label:project"], ["sku", "resource", "label:env"]])
def test_breakdowns_equal_the_sum_of_the_hourly_rows(
    customer: Customer, billed: BillingAccount, granularity: str, dims: list[str]
) -> None:
    response = costs(
        customer.client, billed, start="2026-10-01", end="2026-12-01", granularity=granularity, group_by=",".join(dims)
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["currency"], body["granularity"], body["group_by"]) == ("USD", granularity, dims)
    got = {}
    for row in body["rows"]:
        key = [row["period"]]
        for dim in dims:
            if dim == "sku":
                key.append(row["sku"])
            elif dim == "resource":
                key.append(row["resource"])
            else:
                key.append(row["labels"][dim.removeprefix("label:")])
        got[tuple(key)] = Decimal(row["amount"])
        assert ("quantity" in row) == ("sku" in dims)
    want = expected(billed, granularity, dims)
    assert got == {k: v[1] for k, v in want.items()}
    assert Decimal(body["total"]) == sum(v[1] for v in want.values()) > 0


def test_quantities_by_sku_and_the_date_range(customer: Customer, billed: BillingAccount) -> None:
    body = costs(customer.client, billed, start="2026-11-01", end="2026-11-02", group_by="sku").json()
    by_sku = {row["sku"]: Decimal(row["quantity"]) for row in body["rows"]}
    assert by_sku["compute.vcpu"] == Decimal(2 * 3) + Decimal(8) * Decimal("22.75")  # vm-1 00-03, vm-2 01:15-24
    assert by_sku["network.egress"] == Decimal(120)
    assert {row["period"] for row in body["rows"]} == {"2026-11-01"}


def test_tenancy_and_roles(customer: Customer, billed: BillingAccount, make_customer: Callable) -> None:
    stranger = make_customer()
    assert costs(stranger.client, billed, start="2026-11-01", end="2026-11-02").status_code == 404
    assert costs(customer.client, "acc_0000000000001", start="2026-11-01", end="2026-11-02").status_code == 404
    viewer = make_customer()
    account_services.member_add(account_id=billed.id, email=viewer.user.email, role="viewer")
    assert costs(viewer.client, billed, start="2026-11-01", end="2026-11-02").status_code == 200
    reader = account_services.service_key_create(name="r", scopes=[Scope.ACCOUNTS_READ], created_by_id=None).raw
    assert costs(client_with_key(reader), billed, start="2026-11-01", end="2026-11-02").status_code == 200
    writer = account_services.service_key_create(name="w", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    assert costs(client_with_key(writer), billed, start="2026-11-01", end="2026-11-02").status_code == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "2026-11-02", "end": "2026-11-01"}, "end"),
        ({"start": "nope", "end": "2026-11-01"}, "start"),
        ({"end": "2026-11-01"}, "start"),
        ({"start": "2026-01-01", "end": "2026-12-01", "granularity": "hour"}, "end"),
        ({"start": "2026-11-01", "end": "2026-11-02", "granularity": "week"}, "granularity"),
        ({"start": "2026-11-01", "end": "2026-11-02", "group_by": "colour"}, "group_by"),
        ({"start": "2026-11-01", "end": "2026-11-02", "group_by": "sku,sku"}, "group_by"),
        ({"start": "2026-11-01", "end": "2026-11-02", "currency": "EUR"}, "currency"),
    ],
)
def test_bad_parameters_are_named(
    customer: Customer, billed: BillingAccount, params: dict[str, str], field: str
) -> None:
    response = costs(customer.client, billed, **params)
    assert response.status_code == 400
    assert field in {e["field"] for e in response.json()["errors"]}


def test_an_account_without_usage_has_an_empty_breakdown(
    catalog: None, customer: Customer, make_account: Callable
) -> None:
    account = make_account(customer.user)
    body = costs(customer.client, account, start="2026-11-01", end="2026-11-02").json()
    assert (body["rows"], body["total"], body["currency"]) == ([], "0", "EUR")


def test_day_breakdowns_follow_late_events_and_re_rated_tiers(
    customer: Customer, billed: BillingAccount, post: Callable
) -> None:
    # A late 200 GB early on the 1st pushes every later egress hour of the month up the tiers.
    post([used(billed, "late", at("2026-11-01 00:01:00"), "200")])
    roll(billed)
    for granularity in ("day", "month"):
        body = costs(
            customer.client,
            billed,
            start="2026-10-01",
            end="2026-12-01",
            granularity=granularity,
            group_by="sku,resource",
        ).json()
        got = {(r["period"], r["sku"], r["resource"]): Decimal(r["amount"]) for r in body["rows"]}
        assert got == {k: v[1] for k, v in expected(billed, granularity, ["sku", "resource"]).items()}
