"""The invoicing tests' clock and period: every test runs frozen at ``NOW``, two days into
November 2026, so October is the last closed month whatever the real date (a test moves the
clock on with the ``clock`` fixture or its own ``time_machine.travel``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
import time_machine

from accounts.models import BillingAccount
from billing_site.common.actors import Actor
from conftest import Customer
from invoicing.periods import Period

# The price catalog, and the emptying of the hand-made metering tables for committing tests.
from metering.tests.conftest import _clean_metering_tables, catalog  # noqa: F401

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
OCTOBER = Period(dt.date(2026, 10, 1))
NOVEMBER = Period(dt.date(2026, 11, 1))
FINANCE = Actor.system("tests")


@pytest.fixture
def acct(
    catalog: None,  # noqa: F811 (the fixture imported above, requested by name)
    customer: Customer,
    make_account: Callable[..., BillingAccount],
) -> Callable[..., BillingAccount]:
    """Makes billing accounts (``acct(currency="EUR", country="NL")``) owned by one customer."""

    def make(**fields: object) -> BillingAccount:
        return make_account(customer.user, **fields)

    return make


@pytest.fixture(autouse=True)
def clock() -> Iterator[time_machine.Traveller]:
    """The clock, frozen at ``NOW`` (threads see it too; child processes through ``manage_py``)."""
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture(autouse=True)
def _seeded_tax_rates(request: pytest.FixtureRequest) -> None:
    """Committing tests are cleaned by Django's flush, which empties the VAT rates seeded by
    migration 0002 too: seed them again. (The ledger's append-only trigger does not stop the
    TRUNCATE that flush uses.)"""
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        return
    request.getfixturevalue("transactional_db")
    from invoicing.taxes import seed_rates

    seed_rates()
