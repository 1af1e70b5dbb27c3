"""A fraud analyst works the review queue in the browser: approves one account and blocks
another through the rendered pages, and the accounts' states follow."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from accounts.models import AccountState, BillingAccount
from antifraud.models import AccountRisk, ReviewDecision, RiskStatus
from antifraud.tests.test_checkpoints import US_IP, bind, open_account
from billing_site.outbox import services as outbox
from conftest import Customer
from tests.browser.harness import admin_login, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

AU_IP = "1.1.1.1"


def flagged(customer: Customer, *, name: str, email: str, ip: str, card: str) -> BillingAccount:
    """An account opened from abroad with a throwaway address, a card bound: in review, pending.
    Each its own IP, address and card, so that deciding on one does not reassess the other."""
    account = open_account(customer, ip, name=name, email=email)
    bind(customer, account, card)
    assert account.state == AccountState.PENDING
    assert AccountRisk.objects.get(account_id=account.id).status == RiskStatus.REVIEW
    return account


def decide(page: Page, account: BillingAccount, button: str, reason: str) -> None:
    """From the queue: open the account's review page, type the reason under the decision and
    press its button."""
    page.goto("/admin/antifraud/accountrisk/")
    page.locator("#result_list").get_by_role("link", name=account.public_id, exact=True).click()
    expect(page.locator("h1")).to_contain_text(account.public_id)
    page.get_by_label(button, exact=True).fill(reason)
    page.get_by_role("button", name=button, exact=True).click()


def test_an_analyst_approves_one_review_and_blocks_another(page: Page, make_customer: Callable[..., Customer]) -> None:
    good = flagged(make_customer(), name="Honest Hosting BV", email="ops@mailinator.com", ip=US_IP, card="pm_card_visa")
    bad = flagged(make_customer(), name="Card Testers Ltd", email="cc@yopmail.com", ip=AU_IP, card="pm_card_mastercard")
    analyst = new_operator("fraud")

    admin_login(page, analyst, next_url="/admin/antifraud/accountrisk/")
    queue = page.locator("#result_list")
    expect(queue).to_contain_text(good.public_id)
    expect(queue).to_contain_text(bad.public_id)
    expect(queue).to_contain_text("disposable_email")
    screenshot(page, "fraud-review-queue")

    decide(page, good, "Approve", "Called the customer; a real company")
    expect(page.locator(".messagelist")).to_have_text(f"Account {good.public_id} approved.")
    screenshot(page, "fraud-review-approved")

    decide(page, bad, "Block", "Stolen card, confirmed with the issuer")
    expect(page.locator(".messagelist")).to_have_text(f"Account {bad.public_id} blocked.")

    while outbox.drain():  # what the outbox's periodic task does: decisions reach the accounts
        pass
    good.refresh_from_db()
    bad.refresh_from_db()
    assert (good.state, bad.state) == (AccountState.ACTIVE, AccountState.BLOCKED)
    standing = dict(AccountRisk.objects.filter(account_id__in=[good.id, bad.id]).values_list("account_id", "status"))
    assert standing == {good.id: RiskStatus.APPROVED, bad.id: RiskStatus.BLOCKED}
    decisions = ReviewDecision.objects.order_by("id").values_list("account_id", "action", "analyst_user_id", "reason")
    assert list(decisions) == [
        (good.id, "approve", analyst.id, "Called the customer; a real company"),
        (bad.id, "block", analyst.id, "Stolen card, confirmed with the issuer"),
    ]

    page.goto("/admin/antifraud/accountrisk/")  # the queue is empty again
    expect(page.locator("#changelist")).not_to_contain_text(good.public_id)
    expect(page.locator("#changelist")).not_to_contain_text(bad.public_id)
