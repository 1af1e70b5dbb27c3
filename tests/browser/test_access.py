"""Staff without the permission are refused by the server, whatever the page offers: a
support agent typing the address of fraud's Block, finance opening the fraud team's queue,
staff in no group opening an account, a read-only user typing the address of Suspend. Each in
a browser of their own; each refusal page names the group(s) that may."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

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


def test_a_read_only_user_sees_an_account_but_is_refused_its_suspension(
    page: Page, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    """Read-only sees the account without its lifecycle actions; typing the address of Suspend
    anyway gets a page that says who may (support), and the account stays as it was."""
    account = make_account(customer.user, name="Initech GmbH", state=AccountState.ACTIVE)
    auditor = new_operator("read-only")

    admin_login(page, auditor, next_url=f"/admin/accounts/billingaccount/{account.public_id}/")  # the customer page
    expect(page.locator("#content")).to_contain_text(account.public_id)
    expect(page.get_by_role("link", name="Suspend…")).to_have_count(0)  # not offered

    refused = page.goto(f"/admin/accounts/billingaccount/{account.public_id}/transition/suspend/")
    assert_refused(page, refused, needs=["support"])
    refusal = page.locator("#content-main.refusal")
    expect(refusal).to_contain_text("The transition “suspend” is not allowed for you.")
    expect(refusal).to_contain_text("Your groups: read-only.")
    screenshot(page, "refused-read-only")
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE
