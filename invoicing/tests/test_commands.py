"""bill_period and ledger_check from the command line."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import BillingAccount
from conftest import Customer
from invoicing.models import Invoice
from invoicing.tests.factories import rated
from invoicing.tests.support import NOW

pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def two(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> list[BillingAccount]:
    accounts = [make_account(customer.user, currency="EUR", country="NL") for _ in range(2)]
    for account in accounts:
        rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    return accounts


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_dry_run_prints_and_writes_nothing(two: list[BillingAccount]) -> None:
    text = run("bill_period", "2026-10", "--dry-run", "--no-rollup")
    assert "2 accounts with usage; would issue 2 invoices (242.00 EUR)" in text
    assert not Invoice.objects.exists()


def test_one_account_then_the_rest(two: list[BillingAccount]) -> None:
    assert "issued 1 invoices" in run("bill_period", "2026-10", "--no-rollup", "--account", two[0].public_id)
    assert "issued 1 invoices (121.00 EUR); 1 already invoiced" in run("bill_period", "2026-10", "--no-rollup")
    assert run("ledger_check").strip() == "ledger ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["2026-11"], "has not ended yet"),
        (["2026-13"], "is not a month"),
        (["2026-10", "--account", "acc_nope"], "is not an account id"),
    ],
)
def test_refusals(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("bill_period", *args, "--no-rollup")
