"""The staff home page in the browser: accounts by state, fraud's queue and the pipeline's
health above the admin's app list, each figure a link to the list behind it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from accounts.models import AccountState, BillingAccount
from antifraud.models import AccountRisk, RiskStatus
from conftest import Customer
from tests.browser.books import CUSTOMERS, open_books
from tests.browser.harness import admin_login, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_home_page_shows_accounts_by_state_and_the_review_queue_with_links(
    page: Page, make_customer: Callable[..., Customer], make_account: Callable[..., BillingAccount]
) -> None:
    books = open_books(make_customer, make_account)
    assert books.in_review is not None and books.in_review.state == AccountState.PENDING
    assert AccountRisk.objects.get(account_id=books.in_review.id).status == RiskStatus.REVIEW
    states = Counter(state for _name, _country, _currency, state, _invoices in CUSTOMERS)
    states[AccountState.PENDING] += 1  # the one in review

    admin_login(page, new_operator("support", "fraud"))
    accounts = page.locator("#ops-accounts")
    for state, count in states.items():
        expect(accounts.locator(f"[data-figure={state.value}] .value")).to_have_text(str(count))
    queue = page.locator("#ops-fraud [data-figure=review-queue]")
    expect(queue.locator(".value")).to_have_text("1")
    expect(queue.locator(".note")).to_contain_text("oldest waits")
    expect(page.locator("#ops-pipeline")).to_be_visible()
    expect(page.locator("#content-main .app-accounts")).to_be_visible()  # the admin's app list stays below
    screenshot(page, "home-dashboard")

    accounts.locator(f"[data-figure={AccountState.SUSPENDED.value}]").get_by_role("link").click()
    results = page.locator("#result_list")
    expect(results).to_contain_text("Hooli SAS")
    expect(results).to_contain_text("Massive Dynamic Inc.")
    expect(results).not_to_contain_text("Initech BV")  # active
