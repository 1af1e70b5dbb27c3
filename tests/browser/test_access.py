"""Staff without the permission are refused by the server, whatever the page offers: a
support agent typing the address of fraud's Block, finance opening the fraud team's queue,
staff in no group opening an account. Each in a browser of their own."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page

from accounts.models import AccountState, BillingAccount
from conftest import Customer
from tests.browser.harness import admin_login, assert_refused, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_staff_without_the_permission_are_refused(
    new_page: Callable[[], Page], customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)
    refusals = {  # who, where, and the groups the refusal page names
        "support": (f"/admin/accounts/billingaccount/{account.pk}/transition/block/", ["fraud"]),
        "finance": ("/admin/antifraud/accountrisk/", ["fraud", "read-only", "support"]),
        "": (f"/admin/accounts/billingaccount/{account.pk}/change/", ["finance", "fraud", "read-only", "support"]),
    }
    for group, (address, needs) in refusals.items():
        page = new_page()
        admin_login(page, new_operator(*filter(None, [group])))
        assert_refused(page, page.goto(address), needs=needs)
        screenshot(page, f"refused-{group or 'nogroup'}")
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE
