"""The staff home page in the browser: accounts by state, finance's figures, fraud's queue and
the pipeline's health above the admin's app list, each figure a link to the list behind it; laid
out across the page's width, readable at 1280 px (figures in a grid without list bullets, the
rollup table's headers on one line, nothing wider than the window)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from django.core.cache import cache
from playwright.sync_api import Page, expect

from accounts.models import AccountState, BillingAccount
from antifraud.models import AccountRisk, RiskStatus
from billing_site.backoffice import dashboard
from conftest import Customer
from tests.browser.books import CUSTOMERS, open_books
from tests.browser.harness import VIEWPORT, admin_login, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# How many lines each element's text takes on the page (one client rectangle per line box).
LINES_OF_TEXT = """elements => Object.fromEntries(elements.map(e => {
    const range = document.createRange();
    range.selectNodeContents(e);
    return [e.innerText, new Set([...range.getClientRects()].map(r => Math.round(r.top))).size];
}))"""


def test_the_home_page_shows_accounts_by_state_and_the_review_queue_with_links(
    page: Page, make_customer: Callable[..., Customer], make_account: Callable[..., BillingAccount]
) -> None:
    books = open_books(make_customer, make_account)
    assert books.in_review is not None and books.in_review.state == AccountState.PENDING
    assert AccountRisk.objects.get(account_id=books.in_review.id).status == RiskStatus.REVIEW
    states = Counter(state for _name, _country, _currency, state, _invoices in CUSTOMERS)
    states[AccountState.PENDING] += 1  # the one in review

    cache.delete(dashboard.FINANCE_CACHE_KEY)  # finance's figures as of these books, not another test's
    admin_login(page, new_operator("support", "fraud", "finance"))
    accounts = page.locator("#ops-accounts")
    for state, count in states.items():
        expect(accounts.locator(f"[data-figure={state.value}] .value")).to_have_text(str(count))
    queue = page.locator("#ops-fraud [data-figure=review-queue]")
    expect(queue.locator(".value")).to_have_text("1")
    expect(queue.locator(".note")).to_contain_text("oldest waits")
    expect(page.locator("#ops-pipeline")).to_be_visible()
    for section in ("receivables", "funnel", "revenue"):  # finance's figures, for finance
        expect(page.locator(f"#ops-{section}")).to_be_visible()
    expect(page.locator("#ops-receivables [data-figure=eur-owed] .value")).to_contain_text("EUR")
    expect(page.locator("#content-main .app-accounts")).to_be_visible()  # the admin's app list stays below
    expect(page.locator("#recent-actions-module")).to_have_count(0)  # no narrow column beside the figures

    # Readable at 1280 px: nothing wider than the window, the figures a grid of cards across
    # the content's width (no bullets), each header of the rollup table on one line.
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    content = page.locator("#content-main").bounding_box()
    assert content is not None and content["width"] > VIEWPORT["width"] * 0.8, content
    assert page.locator(".ops-figure").first.evaluate("e => getComputedStyle(e).listStyleType") == "none"
    assert page.locator("#ops-accounts .ops-figures").evaluate("e => getComputedStyle(e).display") == "grid"
    lines = page.locator("#ops-shards thead th").evaluate_all(LINES_OF_TEXT)
    assert lines and all(count == 1 for count in lines.values()), lines
    screenshot(page, "home-dashboard")

    accounts.locator(f"[data-figure={AccountState.SUSPENDED.value}]").get_by_role("link").click()
    results = page.locator("#result_list")
    expect(results).to_contain_text("Hooli SAS")
    expect(results).to_contain_text("Massive Dynamic Inc.")
    expect(results).not_to_contain_text("Initech BV")  # active
