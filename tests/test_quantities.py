"""A month of a resource started and stopped at odd seconds: the costs API shows the same
quantity as the invoice, exact (no 10^-12 artefacts of summing per-hour pieces each rounded
to 12 places), and the invoice's amounts are those of the exact durations, to the cent."""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import call_command
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from conftest import Customer
from invoicing.models import Invoice
from metering.tests.test_rollup import lifecycle

pytestmark = pytest.mark.django_db(transaction=True)

NOV_3 = dt.datetime(2026, 11, 3, 2, 30, tzinfo=dt.UTC)
SPEC = {"compute.vcpu": "3", "compute.ram": "7.3", "storage.disk.ssd": "333.3"}
EUR = {"compute.vcpu": Decimal("0.0115"), "compute.ram": Decimal("0.0015"), "storage.disk.ssd": Decimal("0.000128")}


def shown(value: Fraction) -> str:
    """Half-up to at most 6 places, no trailing zeros: how invoices show quantities."""
    rounded = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal("1e-6"), ROUND_HALF_UP)
    return f"{rounded.normalize():f}"


def month_of_odd_seconds(account: BillingAccount) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every day of October: started at an odd second after midnight, stopped at another odd
    second in the afternoon (so that each run covers many hourly pieces); the seconds run
    each day."""
    events, seconds = [], {}
    for day in range(1, 32):
        start = dt.datetime(2026, 10, day, 0, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=(day * 7919) % 3541 + 1)
        stop = dt.datetime(2026, 10, day, 13, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=(day * 104729) % 3559 + 3)
        events.append(lifecycle(account, f"start-{day}", start, "start", spec=SPEC))
        events.append(lifecycle(account, f"stop-{day}", stop, "stop"))
        seconds[f"2026-10-{day:02d}"] = int((stop - start).total_seconds())
    return events, seconds


def test_costs_show_what_the_invoice_shows_over_a_month_of_odd_seconds(
    catalog: None, producer: APIClient, customer: Customer, account: BillingAccount
) -> None:
    assert account.currency == "EUR"
    events, seconds = month_of_odd_seconds(account)
    with time_machine.travel(NOV_3, tick=False):
        response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
        assert response.status_code == 200 and response.json()["accepted"] == len(events)
        out = StringIO()
        call_command("bill_period", "2026-10", stdout=out)
        assert "issued 1 invoices" in out.getvalue()
        costs = customer.client.get(
            f"/api/v1/billing-accounts/{account.public_id}/costs",
            {"start": "2026-10-01", "end": "2026-11-01", "granularity": "month", "group_by": "sku"},
        )
        days = customer.client.get(
            f"/api/v1/billing-accounts/{account.public_id}/costs",
            {"start": "2026-10-01", "end": "2026-11-01", "granularity": "day", "group_by": "sku"},
        )
        invoice = Invoice.objects.get(account_id=account.id)
        shown_lines = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/invoices/{invoice.public_id}")
    assert costs.status_code == 200 and days.status_code == 200 and shown_lines.status_code == 200
    exact = {sku: Fraction(units) * sum(seconds.values()) / 3600 for sku, units in SPEC.items()}
    expected = {sku: shown(q) for sku, q in exact.items()}
    assert {row["sku"]: row["quantity"] for row in costs.json()["rows"]} == expected
    assert {line["sku"]: line["quantity"] for line in shown_lines.json()["lines"]} == expected
    assert {(row["period"], row["sku"]): row["quantity"] for row in days.json()["rows"]} == {
        (day, sku): shown(Fraction(units) * daily / 3600)
        for day, daily in seconds.items()
        for sku, units in SPEC.items()
    }
    # Amounts: the exact durations rated, rounded to the cent once per line.
    lines = {line.sku: line for line in invoice.lines.all()}
    for sku, quantity in exact.items():
        amount = Decimal(quantity.numerator) / Decimal(quantity.denominator) * EUR[sku]
        assert lines[sku].amount_minor == int(amount.quantize(Decimal("0.01"), ROUND_HALF_UP) * 100), sku
