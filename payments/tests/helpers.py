"""Helpers of the payments tests: last month's invoice for an account, cards bound through the
API, the clock. Invoices are issued by the real period close from rated usage."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rest_framework.test import APIClient

from accounts.models import BillingAccount
from billing_site.common.actors import Actor
from invoicing import services as invoicing_services
from invoicing.models import Invoice
from invoicing.periods import Period
from invoicing.tests.factories import rated

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
OCTOBER = Period(dt.date(2026, 10, 1))
FINANCE = Actor.system("tests")


def issue_invoice(account: BillingAccount, amount: str = "100") -> Invoice:
    """October's invoice for ``account``: ``amount`` EUR of compute, plus VAT as the account's
    country says (NL: 21 %, so 100 → 121.00)."""
    rated(account.id, "2026-10-02", "compute.vcpu", "100", amount)
    invoicing_services.period_close(
        period=OCTOBER, actor=FINANCE, account_ids=[account.id], run_rollup=False, render_pdfs=False
    )
    return Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)


def bind(client: APIClient, account: BillingAccount, card: str = "pm_card_visa") -> Any:
    """Bind a sandbox test card through the API, as a customer's browser-less test flow does."""
    setup = client.post(f"/api/v1/billing-accounts/{account.public_id}/payment-methods/setup")
    assert setup.status_code == 201, setup.content
    return client.post(
        f"/api/v1/billing-accounts/{account.public_id}/payment-methods",
        {"setup_intent_id": setup.json()["setup_intent_id"], "test_payment_method": card},
        format="json",
    )


def pay(client: APIClient, account: BillingAccount, invoice: Invoice) -> Any:
    return client.post(f"/api/v1/billing-accounts/{account.public_id}/invoices/{invoice.public_id}/pay")
