"""The fraud team's review queue in the admin: the queue, one account's page with everything
needed to decide, the decisions (approve, block, request information) and their audit rows,
the dashboard; roles; and what customers never see."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from django.core import mail
from django.test import Client

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount
from antifraud.models import AccountRisk, ReviewDecision, RiskRule, RiskStatus
from antifraud.tests.test_checkpoints import ANALYST, NL_IP, US_IP, bind, open_account
from billing_site.outbox import services as outbox
from conftest import Customer, staff_login
from tests.pages import press


def staff(group: str) -> Client:
    user = account_services.operator_create(email=f"{group}@ops.test", password="x-correct-horse-9", groups=[group])
    return staff_login(Client(), user)


@pytest.fixture
def flagged(customer: Customer) -> BillingAccount:
    """A throwaway address from an IP abroad, with a card: in review, still pending."""
    account = open_account(customer, US_IP, email="x@mailinator.com")
    bind(customer, account, "pm_card_visa")
    assert account.state == AccountState.PENDING
    return account


def settle(account: BillingAccount) -> None:
    """What the outbox's periodic task does (every queued message delivered: decisions reach
    the account), then ``account`` as it now is."""
    while outbox.drain():
        pass
    account.refresh_from_db()


def decide(client: Client, account: BillingAccount, action: str, reason: str) -> int:
    response = client.post(f"/admin/antifraud/accountrisk/{account.id}/decide/{action}/", {"reason": reason})
    settle(account)
    return response.status_code


@pytest.mark.django_db
def test_the_queue_and_an_accounts_page_show_what_is_needed_to_decide(
    flagged: BillingAccount, make_customer: Callable[..., Customer]
) -> None:
    honest = open_account(make_customer(), NL_IP, name="Honest BV", email="ap@honest.test")
    fraud = staff("fraud")
    queue = fraud.get("/admin/antifraud/accountrisk/", follow=True)
    assert queue.status_code == 200
    page = queue.content.decode()
    assert flagged.public_id in page and honest.public_id not in page  # only accounts in review
    assert "disposable_email (+40)" in page

    review = fraud.get(f"/admin/antifraud/accountrisk/{flagged.id}/change/").content.decode()
    for seen in ("mailinator.com", "country_mismatch", "visa •••• 4242", "Approve", "Request more information"):
        assert seen in review, seen

    board = fraud.get("/admin/antifraud/accountrisk/dashboard/").content.decode()
    assert "1 account in review" in board


@pytest.mark.django_db
def test_approve_activates_the_pending_account_and_is_audited(flagged: BillingAccount) -> None:
    assert decide(staff("fraud"), flagged, "approve", "Called the customer; a real company") == 302
    assert flagged.state == AccountState.ACTIVE
    assert AccountRisk.objects.get(account_id=flagged.id).status == RiskStatus.APPROVED
    decision = ReviewDecision.objects.get(account_id=flagged.id)
    assert (decision.action, decision.analyst_name) == ("approve", "fraud@ops.test")
    assert decision.assessment is not None


@pytest.mark.django_db
def test_block_blocks_and_the_customer_sees_a_neutral_reason(customer: Customer, flagged: BillingAccount) -> None:
    assert decide(staff("fraud"), flagged, "block", "Stolen card, confirmed with the issuer") == 302
    assert flagged.state == AccountState.BLOCKED
    history = customer.client.get(f"/api/v1/billing-accounts/{flagged.public_id}/history").json()["results"]
    blocked = next(entry for entry in history if entry["transition"] == "block")
    assert blocked["reason"] == "Account under review. Contact support."
    body = customer.client.get(f"/api/v1/billing-accounts/{flagged.public_id}").content.decode()
    for secret in ("score", "risk", "disposable", "Stolen"):  # its own email it may see
        assert secret not in body


@pytest.mark.django_db
def test_request_information_emails_the_customer_and_keeps_the_account_in_review(flagged: BillingAccount) -> None:
    mail.outbox.clear()
    assert decide(staff("fraud"), flagged, "request_info", "Please send us your company registration.") == 302
    assert [m.to for m in mail.outbox] == [["x@mailinator.com"]]
    assert "company registration" in mail.outbox[0].body
    assert AccountRisk.objects.get(account_id=flagged.id).status == RiskStatus.REVIEW
    assert flagged.state == AccountState.PENDING


@pytest.mark.django_db
def test_only_the_fraud_team_decides_and_a_reason_is_required(flagged: BillingAccount) -> None:
    support = staff("support")
    assert support.get(f"/admin/antifraud/accountrisk/{flagged.id}/change/").status_code == 200
    assert decide(support, flagged, "approve", "looks fine") == 403
    assert staff("finance").get("/admin/antifraud/accountrisk/", follow=True).status_code == 403
    fraud = staff("fraud")
    assert decide(fraud, flagged, "block", "  ") == 302  # refused with a message
    assert flagged.state == AccountState.PENDING and not ReviewDecision.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("button", "standing", "state"),
    [
        ("Approve", RiskStatus.APPROVED, AccountState.ACTIVE),
        ("Block", RiskStatus.BLOCKED, AccountState.BLOCKED),
        ("Request more information", RiskStatus.REVIEW, AccountState.PENDING),
    ],
)
def test_each_decision_works_from_the_rendered_page(
    flagged: BillingAccount, button: str, standing: str, state: str
) -> None:
    """What the analyst's browser does: the page's own forms, as html.parser reads them, the
    reason typed into the form of the button pressed (issue 19: Approve's form sat inside the
    admin's change form, so the browser posted it to the read-only change view: a blank 403)."""
    fraud = staff("fraud")
    url = f"/admin/antifraud/accountrisk/{flagged.id}/change/"
    response = press(fraud, url, button, reason="Checked with the customer by phone")
    assert response.status_code == 302 and response["Location"] == url
    settle(flagged)
    assert AccountRisk.objects.get(account_id=flagged.id).status == standing
    assert flagged.state == state
    decision = ReviewDecision.objects.get(account_id=flagged.id)
    assert decision.reason == "Checked with the customer by phone"


@pytest.mark.django_db
def test_approving_a_blocked_account_unblocks_it_and_the_button_says_so(flagged: BillingAccount) -> None:
    """Issue 19: Approve on a blocked account said "approved" and left it blocked. The button
    says what it does, and does it: the account returns to where it was before the block (a
    pending account with a card bound is activated, as an approval of a pending one is)."""
    fraud = staff("fraud")
    url = f"/admin/antifraud/accountrisk/{flagged.id}/change/"
    press(fraud, url, "Block", reason="Looks like the ring from last week")
    settle(flagged)
    assert flagged.state == AccountState.BLOCKED
    page = fraud.get(url).content.decode()
    assert 'value="Approve and unblock"' in page and 'value="Approve"' not in page
    response = press(fraud, url, "Approve and unblock", reason="Not the ring: a real company, called them")
    assert response.status_code == 302
    settle(flagged)
    assert flagged.state == AccountState.ACTIVE
    assert AccountRisk.objects.get(account_id=flagged.id).status == RiskStatus.APPROVED
    unblock = flagged.transitions.order_by("-id").first()
    assert unblock is not None and (unblock.transition, unblock.actor_kind) == ("unblock", "operator")
    assert unblock.actor_user_id == ReviewDecision.objects.filter(action="approve").get().analyst_user_id
    messages = [str(m) for m in fraud.get(url).context["messages"]]
    assert f"Account {flagged.public_id} approved and unblocked." in messages, messages


@pytest.mark.django_db
def test_an_account_blocked_while_suspended_for_debt_is_not_unblocked_by_an_approval(
    flagged: BillingAccount,
) -> None:
    """Unblocking can only return to active or pending: an account suspended for an unpaid
    balance before its block is refused with a reason, not silently made active."""
    actor = ANALYST
    account_services.billing_account_transition(account_id=flagged.id, transition="activate", actor=actor)
    account_services.billing_account_transition(account_id=flagged.id, transition="suspend", actor=actor, reason="d")
    account_services.billing_account_transition(account_id=flagged.id, transition="block", actor=actor, reason="b")
    while outbox.drain():
        pass
    fraud = staff("fraud")
    url = f"/admin/antifraud/accountrisk/{flagged.id}/change/"
    press(fraud, url, "Approve and unblock", reason="fine")
    settle(flagged)
    assert flagged.state == AccountState.BLOCKED
    assert AccountRisk.objects.get(account_id=flagged.id).status == RiskStatus.BLOCKED
    assert not ReviewDecision.objects.filter(action="approve").exists()
    messages = [str(m) for m in fraud.get(url).context["messages"]]
    assert any("suspended" in m for m in messages), messages


@pytest.mark.django_db
def test_the_analyst_is_logged_by_user_id_never_by_email(
    flagged: BillingAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: ``"analyst": "fraud@…"`` on ``antifraud.review``. Staff are logged as customers
    are: by id, no email address in any field of any line."""
    from billing_site.common.logs import JsonFormatter

    fraud = staff("fraud")
    with caplog.at_level(logging.INFO):
        press(fraud, f"/admin/antifraud/accountrisk/{flagged.id}/change/", "Approve", reason="fine")
        while outbox.drain():
            pass
        rule = RiskRule.objects.get(code="card_reuse")
        press(fraud, f"/admin/antifraud/riskrule/{rule.pk}/change/", "Save", weight="45")
    lines = {r.getMessage(): JsonFormatter().format(r) for r in caplog.records if r.name.startswith("antifraud")}
    review = json.loads(lines["antifraud.review"])
    analyst = ReviewDecision.objects.get().analyst_user_id
    assert (review["actor_kind"], review["actor_user_id"]) == ("operator", analyst)
    assert "antifraud.rules_changed" in lines
    for line in lines.values():
        assert "ops.test" not in line and "@" not in line, line


@pytest.mark.django_db
def test_the_pages_show_money_as_money_evidence_as_rows_and_waits_in_words(
    flagged: BillingAccount, catalog: None
) -> None:
    """Issue 19: evidence shown as Python dicts, ``43352 EUR``, ``550.514518531333 EUR``,
    ``0:13:13.029383``, pages titled by an internal integer."""
    import datetime as dt
    import re

    from django.utils import timezone

    from antifraud.models import AccountSignal, PaymentOutcome, RiskAssessment
    from invoicing.tests.factories import rated

    PaymentOutcome.objects.create(
        account_id=flagged.id, kind="decline", reference="pay_1", code="declined", amount_minor=43352, currency="EUR"
    )
    AccountSignal.objects.filter(account_id=flagged.id).update(created_at=timezone.now() - dt.timedelta(days=2))
    rated(flagged.id, timezone.now().date().isoformat(), "gpu.a100", "10", "550.514518531333")
    AccountRisk.objects.filter(account_id=flagged.id).update(
        flagged_at=timezone.now() - dt.timedelta(minutes=13, seconds=13, microseconds=29383)
    )
    fraud = staff("fraud")
    page = fraud.get(f"/admin/antifraud/accountrisk/{flagged.id}/change/").content.decode()
    assert "433.52 EUR" in page and "43352" not in page
    assert "550.51 EUR" in page and "550.5145" not in page
    assert "{&#x27;" not in page and "{'" not in page  # no dict's repr
    assert "<li>Domain: mailinator.com</li>" in page
    assert "<li>Countries: IP: US, billing: NL</li>" in page
    title = re.search(r"<title>(.*?)</title>", page, re.S)
    assert title is not None and f"Acme Cloud BV ({flagged.public_id})" in title.group(1)
    assert str(flagged.id) not in title.group(1)
    board = fraud.get("/admin/antifraud/accountrisk/dashboard/").content.decode()
    assert "the oldest has waited 13 min" in board and "0:13:13" not in board
    assessment = RiskAssessment.objects.filter(account_id=flagged.id).first()
    assert assessment is not None
    record = fraud.get(f"/admin/antifraud/riskassessment/{assessment.id}/change/").content.decode()
    assert "{&#x27;" not in record and "<li>Domain: mailinator.com</li>" in record
    assert flagged.public_id in re.search(r"<title>(.*?)</title>", record, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.django_db
def test_an_approval_stands_against_what_the_analyst_saw_and_more_goes_back_to_them_never_to_a_block(
    flagged: BillingAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: the analyst cleared a false positive and the next declines blocked it again.
    Automation never overrules a person: the evidence the analyst approved stays cleared; new
    evidence puts the account back in review (still active), even at a blocking score; only a
    rule that insists on a block (a blocked account's card) still blocks."""
    from antifraud import rules, services

    assert decide(staff("fraud"), flagged, "approve", "real company, called them") == 302
    assert flagged.state == AccountState.ACTIVE

    def decline(n: int) -> services.Outcome:
        outcome = services.payment_outcome_record(
            account_id=flagged.id, kind="decline", reference=f"pay_x{n}", code="card_declined"
        )
        assert outcome is not None
        settle(flagged)
        return outcome

    # The same facts the analyst saw (the disposable address, the foreign IP): still cleared.
    first = decline(1)
    assert (first.decision, first.standing) == ("allow", "approved")
    assert {f["rule"] for f in first.assessment.fired} == {"disposable_email", "country_mismatch"}

    services.risk_rule_update(code="payment_trouble", weight=1000, actor=ANALYST)  # declines alone: a block
    decline(2)
    with caplog.at_level(logging.INFO, logger="antifraud.services"):
        third = decline(3)  # payment_trouble fires: new evidence, at a blocking score
    assert third.assessment.score >= 1000
    assert (third.decision, third.assessment.decision, third.standing) == ("review", "review", "review")
    assert flagged.state == AccountState.ACTIVE  # not blocked
    [line] = [
        r
        for r in caplog.records
        if r.getMessage() == "antifraud.assessed" and r.assessment_id == third.assessment.id  # type: ignore[attr-defined]
    ]
    assert line.after_approval == "review"  # type: ignore[attr-defined]

    # A rule insisting on a block is not held, approval or not.
    assert decide(staff("fraud"), flagged, "approve", "declines explained by the bank") == 302
    insisting = rules.Fired(rule="card_reuse", weight=100, evidence={}, insists="block")
    assert services._after_approval(flagged.id, [insisting], 100, "block") is None
    assert services._after_approval(flagged.id, [], 2000, "block") == "review"
