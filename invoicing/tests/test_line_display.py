"""Quantities on documents: stored at full precision, shown rounded once, half-up, to at most
6 places, the same in the API, the admin and the PDF (``invoicing.line_display``)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal
from io import StringIO

import pytest
import time_machine
from django.core.management import call_command
from rest_framework.test import APIClient

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from conftest import Customer, client_with_key
from invoicing import pdf
from invoicing.line_display import detail_view, quantity_text
from invoicing.models import Invoice
from invoicing.tests.readers import api_invoice, laid_out, operator
from metering.tests.test_rollup import at, lifecycle

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


pytestmark = pytest.mark.clock(NOW)


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("743.999999999999", "744"),  # a month of hours summed from thirds of an hour
        ("1488.000000000001", "1488"),
        ("122316.199999999999", "122316.2"),
        ("25874.400000000001", "25874.4"),
        ("810.000000000000", "810"),
        ("0.0000005", "0.000001"),  # half-up, once
        ("0.00000049", "0"),
        ("-0.0000004", "0"),  # never "-0"
        ("-500.000000000000", "-500"),
        ("1E+3", "1000"),  # never exponent notation
        ("12345678901234567890123456.123456789012", "12345678901234567890123456.123457"),  # 38 digits
    ],
)
def test_a_quantity_is_shown_rounded_half_up_to_6_places_without_trailing_zeros(stored: str, shown: str) -> None:
    assert quantity_text(Decimal(stored)) == shown


def test_a_quantity_without_a_value_stays_empty_and_grouping_is_for_print() -> None:
    assert quantity_text(None) is None
    assert quantity_text(Decimal("1234567.1000004"), grouped=True) == "1,234,567.1"


def test_detail_rows_show_rounded_quantities_and_split_the_line_exactly() -> None:
    detail = {"resources": [["vm-1", "743.999999999999", "8.555999999999"], ["vm-2", "0.333333333333", "0.003"]]}
    assert detail_view(detail, 856, "EUR") == {
        "resources": [
            {"key": "vm-1", "quantity": "744", "amount": "8.56"},
            {"key": "vm-2", "quantity": "0.333333", "amount": "0.00"},
        ]
    }


@pytest.mark.django_db(transaction=True)
def test_a_resource_running_all_of_october_shows_744_times_its_units_everywhere(
    catalog: None,
    producer: APIClient,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
) -> None:
    account = make_account(customer.user, currency="EUR", country="NL", name="Whole Month BV")
    spec = {"compute.vcpu": "2", "compute.ram": "3"}
    events = [
        # 2 vCPU for all 744 hours of October; its project label changes twice within one
        # hour, so that hour is three rows of 2/3 vCPU-hour, each rounded to 12 places.
        lifecycle(account, "start", at("2026-10-01 00:00:00"), "start", spec=spec, labels={"project": "a"}),
        lifecycle(account, "to-b", at("2026-10-05 10:20:00"), "update", spec=spec, labels={"project": "b"}),
        lifecycle(account, "to-c", at("2026-10-05 10:40:00"), "update", spec=spec, labels={"project": "c"}),
        lifecycle(account, "stop", at("2026-11-01 00:00:00"), "stop"),
    ]
    with time_machine.travel(dt.datetime(2026, 11, 3, 2, 30, tzinfo=dt.UTC), tick=False):
        response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
        assert response.status_code == 200 and response.json()["accepted"] == 4, response.json()
        call_command("bill_period", "2026-10", stdout=StringIO())  # the real rollup, then the close
        invoice = Invoice.objects.get(account_id=account.id)
        vcpu = invoice.lines.get(sku="compute.vcpu")
        # The quantity is exact (durations are summed in unit-seconds and divided once, issue
        # 19: it was 1488.000000000001, the sum of per-hour pieces each rounded to 12 places);
        # the amount is rated per hour as before (17.112000000001 EUR, rounded once on the line).
        assert vcpu.quantity == Decimal("1488")
        assert vcpu.rated_amount == Decimal("17.112000000001") and vcpu.amount_minor == 1711

        line = next(line for line in api_invoice(account)["lines"] if line["sku"] == "compute.vcpu")
        assert (line["quantity"], line["unit"], line["amount"]) == ("1488", "vcpu-hour", "17.11")
        assert line["detail"]["resources"] == [{"key": "vm-1", "quantity": "1488", "amount": "17.11"}]
        assert [row["quantity"] for row in line["detail"]["projects"]] == ["212.666667", "0.666667", "1274.666667"]

        page = operator("finance").get(f"/admin/invoicing/invoice/{invoice.id}/change/")
        assert page.status_code == 200
        cells = re.findall(r'field-shown_quantity">\s*<p>([^<]*)</p>', page.content.decode())
        assert "1488" in cells and not any(len(cell.partition(".")[2]) > 6 for cell in cells), cells

        texts, _, _ = laid_out(pdf.invoice_html(invoice))
        assert "1,488" in texts and "vcpu-hour" in texts, texts
        assert not [text for text in texts if re.search(r"\d\.\d{7,}", text)]


@pytest.mark.django_db(transaction=True)
def test_the_demo_invoices_show_no_quantity_with_more_than_6_places() -> None:
    with time_machine.travel(NOW, tick=False):
        call_command("load_demo_data", "--force", stdout=StringIO())
        call_command("load_demo_usage", "--force", stdout=StringIO())
        call_command("load_demo_invoices", "--force", stdout=StringIO())
        reader = account_services.service_key_create(name="r", scopes=[Scope.ACCOUNTS_READ], created_by_id=None)
        client = client_with_key(reader.raw)
        stored, shown = [], []
        for invoice in Invoice.objects.exclude(status="draft"):
            account = BillingAccount.objects.get(id=invoice.account_id)
            body = client.get(f"/api/v1/billing-accounts/{account.public_id}/invoices/{invoice.public_id}").json()
            for line in body["lines"]:
                shown.append(line["quantity"])
                shown += [row["quantity"] for rows in line["detail"].values() for row in rows]
            stored += [line.quantity for line in invoice.lines.all() if line.quantity is not None]
    assert stored and any(q != q.quantize(Decimal("0.000001")) for q in stored)  # the demo does carry 12 places
    too_long = [q for q in shown if q is not None and len(q.partition(".")[2]) > 6]
    assert shown and not too_long, too_long
