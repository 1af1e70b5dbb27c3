"""A month of billing end to end: events in over the API, the real rollup, the period close,
the invoice to the cent, late usage on the next invoice, the ledger checked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import call_command
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from conftest import Customer
from invoicing.line_display import detail_view
from invoicing.models import Invoice
from metering.tests.test_rollup import at, lifecycle, used

pytestmark = pytest.mark.django_db(transaction=True)


def send(producer: APIClient, events: list[dict[str, Any]], now: dt.datetime) -> None:
    with time_machine.travel(now, tick=False):
        response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
    assert response.status_code == 200 and not response.json()["rejected"], response.json()


def bill(period: str, now: dt.datetime) -> str:
    out = StringIO()
    with time_machine.travel(now, tick=False):
        call_command("bill_period", period, stdout=out)
    return out.getvalue()


def test_tiers_and_a_mid_month_price_change_reach_the_invoice_and_late_usage_the_next(
    catalog: None, producer: APIClient, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, currency="USD", country="US", kind="business")
    nov_3 = dt.datetime(2026, 11, 3, 2, 30, tzinfo=dt.UTC)
    send(
        producer,
        [
            # 2 vCPU from Oct 14 22:00 to Oct 15 02:00: 4 h, the price drops from 0.0125 to 0.0110 at midnight
            lifecycle(account, "s", at("2026-10-14 22:00:00"), "start", labels={"project": "web"}),
            lifecycle(account, "x", at("2026-10-15 02:00:00"), "stop"),
            # egress: 100 GB free, then 0.09
            used(account, "e1", at("2026-10-20 08:10:00"), "60"),
            used(account, "e2", at("2026-10-21 09:10:00"), "70"),
        ],
        nov_3,
    )
    assert "issued 1 invoices" in bill("2026-10", nov_3)  # the command rolls usage up first
    invoice = Invoice.objects.get(account_id=account.id)
    lines = {line.sku: line for line in invoice.lines.all()}
    assert (lines["compute.vcpu"].quantity, lines["compute.vcpu"].rated_amount) == (8, Decimal("0.094"))
    assert (lines["compute.vcpu"].amount_minor, lines["compute.vcpu"].pricing) == (9, "varied")
    assert detail_view(lines["compute.vcpu"].detail, 9, "USD")["projects"] == [
        {"key": "web", "quantity": "8", "amount": "0.09"}
    ]
    assert (lines["network.egress"].quantity, lines["network.egress"].amount_minor) == (130, 270)
    assert lines["network.egress"].pricing == "tiered"
    assert (invoice.tax_treatment, invoice.tax_minor, invoice.total_minor) == ("outside_eu", 0, 279)

    # Late October egress, accepted after October's invoice was issued, and November's own.
    send(
        producer,
        [used(account, "e3", at("2026-10-31 23:00:00"), "50"), used(account, "n1", at("2026-11-10 10:00:00"), "10")],
        dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
    )
    dec_1 = dt.datetime(2026, 12, 1, 2, 30, tzinfo=dt.UTC)
    assert "issued 1 invoices" in bill("2026-11", dec_1)
    assert invoice.lines.count() == 2 and Invoice.objects.get(id=invoice.id).total_minor == 279  # unchanged
    november = Invoice.objects.get(account_id=account.id, period_start="2026-11-01")
    assert [(line.description, line.quantity, line.amount_minor) for line in november.lines.order_by("position")] == [
        ("Internet egress", 10, 0),  # November starts again in the free tier
        ("Usage adjustment for 2026-10: Internet egress", 50, 450),
    ]
    assert "issued 0 invoices" in bill("2026-11", dec_1)  # again: nothing twice
    out = StringIO()
    call_command("ledger_check", stdout=out)
    assert out.getvalue().strip() == "ledger ok"
