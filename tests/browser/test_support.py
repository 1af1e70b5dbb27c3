"""A support agent finds a customer's account by the billing-account list's search, opens its
customer page, suspends it with a reason through the transition page, and sees the suspension
in the account's history."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from accounts.models import AccountState, BillingAccount
from conftest import Customer
from tests.browser.harness import admin_login, assert_suspended, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REASON = "Leaked API key posted publicly; suspended until the customer rotates it"


def test_a_support_agent_finds_an_account_suspends_it_and_sees_the_history(
    page: Page, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, name="Initech GmbH", email="ap@initech.test", state=AccountState.ACTIVE)
    other = make_account(customer.user, name="Umbrella Corp", state=AccountState.ACTIVE)
    agent = new_operator("support")

    admin_login(page, agent, next_url="/admin/accounts/billingaccount/")
    page.locator("#searchbar").fill("initech")
    page.locator("#searchbar").press("Enter")
    results = page.locator("#result_list")
    expect(results).to_contain_text("Initech GmbH")
    expect(results).not_to_contain_text(other.public_id)
    screenshot(page, "support-account-search")

    results.get_by_role("link", name=account.public_id, exact=True).click()  # the customer page
    state = page.locator("#state")
    expect(state).to_contain_text("Active")
    expect(state.get_by_role("link", name="Block…")).to_have_count(0)  # fraud's, not support's
    state.get_by_role("link", name="Suspend…").click()
    expect(page.locator("#content")).to_contain_text("a reason is required")
    page.get_by_label("Reason").fill(REASON)
    screenshot(page, "support-suspend")
    page.get_by_role("button", name="Suspend", exact=True).click()

    expect(page.locator(".messagelist")).to_contain_text(f"Initech GmbH ({account.public_id}) suspended.")
    page.get_by_role("link", name="Edit profile…").click()  # the account's own page keeps its history
    history = page.locator(".inline-group", has_text="History")
    row = history.locator("tr", has_text=REASON)
    expect(row).to_contain_text("suspend")
    expect(row).to_contain_text(agent.email)
    screenshot(page, "support-account-history")

    assert_suspended(account, by=agent, reason=REASON)
