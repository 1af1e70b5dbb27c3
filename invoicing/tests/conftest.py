"""The invoicing tests' fixtures (their clock and constants are in ``support.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from accounts.models import BillingAccount
from conftest import Customer


@pytest.fixture
def acct(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]
) -> Callable[..., BillingAccount]:
    """Makes billing accounts (``acct(currency="EUR", country="NL")``) owned by one customer."""

    def make(**fields: object) -> BillingAccount:
        return make_account(customer.user, **fields)

    return make
