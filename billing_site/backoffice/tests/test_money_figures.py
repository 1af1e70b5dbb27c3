"""The period close and payments, as /metrics and the home page show them (the clock frozen at
the payments tests' moment: October's invoices, issued on November 3rd)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from accounts.models import BillingAccount
from billing_site.backoffice.tests.test_dashboard import figure, is_red
from billing_site.backoffice.tests.test_ops_endpoints import TOKEN, samples, scrape, value
from conftest import Customer, operator
from payments.tests.helpers import NOW, bind, issue_invoice, pay

pytestmark = [pytest.mark.clock(NOW), pytest.mark.django_db]


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL")


def test_period_close_and_declines_in_metrics_and_on_the_home_page(
    settings: Any, customer: Customer, acct: BillingAccount
) -> None:
    settings.METRICS_TOKEN = TOKEN
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")
    assert pay(customer.client, acct, invoice).json()["decline_code"] == "card_declined"

    found = samples(scrape(Authorization=f"Bearer {TOKEN}").content)
    assert value(found, "billing_period_close_invoices", period="2026-10", status="issued") == 1
    assert value(found, "billing_period_close_last_issued_timestamp_seconds", period="2026-10") == (
        invoice.issued_at.timestamp() if invoice.issued_at else None
    )
    assert (value(found, "billing_payments_last_hour", status="failed", decline_code="card_declined") or 0) >= 1
    assert value(found, "billing_payments_open", status="unknown") == 0

    _, client = operator(["finance"])
    close = figure(client.get("/admin/").content.decode(), "Last period close")
    assert ">2026-10<" in close and "last invoice issued" in close and "drafts remain" not in close
    assert 'href="/admin/invoicing/invoice/?period=2026-10&amp;kind__exact=period"' in close
    assert not is_red(close)  # November 3rd: October is closed
