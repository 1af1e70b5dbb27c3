"""The signup and card-binding checkpoints end to end, through the API: each decision reaching
the account (allow activates, review keeps it pending, block blocks), a blocked account's card
blocking a new account (the sandbox's stable test-card fingerprints), rules versions, and no
network call during evaluation."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount
from antifraud import services
from antifraud.models import AccountRisk, RiskAssessment, RiskRule, RiskStatus, RulesVersion
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.outbox import services as outbox
from conftest import Customer

NL_IP, US_IP = "145.14.1.1", "8.8.8.8"
ACCOUNT = {
    "name": "Acme Cloud BV",
    "email": "billing@acme.test",
    "kind": "business",
    "country": "NL",
    "currency": "EUR",
    "address": {"line1": "Herengracht 1", "city": "Amsterdam", "postal_code": "1015 BA"},
}
ANALYST = Actor.system("tests")


def open_account(customer: Customer, ip: str, **profile: Any) -> BillingAccount:
    response = customer.client.post("/api/v1/billing-accounts", {**ACCOUNT, **profile}, format="json", REMOTE_ADDR=ip)
    assert response.status_code == 201, response.content
    return BillingAccount.objects.get(id=ids.decode("acc", response.json()["id"]))


def bind(customer: Customer, account: BillingAccount, card: str, ip: str = NL_IP) -> Any:
    base = f"/api/v1/billing-accounts/{account.public_id}/payment-methods"
    setup = customer.client.post(f"{base}/setup", REMOTE_ADDR=ip)
    assert setup.status_code == 201, setup.content
    response = customer.client.post(
        base,
        {"setup_intent_id": setup.json()["setup_intent_id"], "test_payment_method": card},
        format="json",
        REMOTE_ADDR=ip,
    )
    while outbox.drain():  # what the outbox's periodic task does: activations, blocks
        pass
    account.refresh_from_db()
    return response


def latest(account: BillingAccount, checkpoint: str) -> RiskAssessment:
    return RiskAssessment.objects.filter(account_id=account.id, checkpoint=checkpoint).order_by("-id").first()  # type: ignore[return-value]


@pytest.mark.django_db
def test_an_honest_account_is_allowed_at_signup_and_activated_by_its_card(customer: Customer) -> None:
    account = open_account(customer, NL_IP)
    signup = latest(account, "signup")
    assert (signup.decision, signup.score, signup.fired) == ("allow", 0, [])
    assert signup.rules_version == 2
    assert account.state == AccountState.PENDING
    assert bind(customer, account, "pm_card_visa").status_code == 201
    assert latest(account, "card_binding").decision == "allow"
    assert account.state == AccountState.ACTIVE


@pytest.mark.django_db
def test_a_risky_signup_is_reviewed_and_its_card_does_not_activate_it(customer: Customer) -> None:
    # A throwaway address (40) from an IP in another country than the billing one (20): 60.
    account = open_account(customer, US_IP, email="x@mailinator.com")
    signup = latest(account, "signup")
    assert signup.decision == "review" and signup.score == 60
    assert {f["rule"] for f in signup.fired} == {"disposable_email", "country_mismatch"}
    evidence = {f["rule"]: f["evidence"] for f in signup.fired}
    assert evidence["disposable_email"]["domain"] == "mailinator.com"
    assert evidence["country_mismatch"]["countries"] == {"billing": "NL", "ip": "US"}
    assert AccountRisk.objects.get(account_id=account.id).status == RiskStatus.REVIEW
    assert bind(customer, account, "pm_card_visa").status_code == 201
    assert account.state == AccountState.PENDING  # stays pending until an analyst decides
    assert services.account_standing(account_id=account.id) == "review"


@pytest.mark.django_db
def test_a_blocked_accounts_card_blocks_a_new_account(
    customer: Customer, make_customer: Callable[..., Customer]
) -> None:
    fraudster = open_account(customer, NL_IP, name="First Shell BV")
    bind(customer, fraudster, "pm_card_mastercard")
    assert fraudster.state == AccountState.ACTIVE
    account_services.billing_account_transition(
        account_id=fraudster.id,
        transition="block",
        actor=Actor.operator(customer.user.id, "fraud@example.test"),
        reason="chargebacks",
    )
    while outbox.drain():  # antifraud learns of the block (and reviews the accounts linked to it)
        pass
    other = make_customer()
    second = open_account(other, "203.0.113.50", name="Second Shell BV", email="ap@second.test")
    assert bind(other, second, "pm_card_mastercard").status_code == 201  # the same card: same fingerprint
    assessment = latest(second, "card_binding")
    assert assessment.decision == "block"
    reuse = next(f for f in assessment.fired if f["rule"] == "card_reuse")
    assert reuse["evidence"]["blocked_accounts"] == [fraudster.public_id]
    assert reuse["insists"] == "block"
    assert second.state == AccountState.BLOCKED
    transition = second.transitions.order_by("-id").first()
    assert transition is not None and transition.actor_name == "antifraud"
    assert f"risk assessment {assessment.id}" in transition.reason


@pytest.mark.django_db
def test_a_rule_switched_off_does_not_fire_and_the_assessment_names_the_new_version(customer: Customer) -> None:
    RiskRule.objects.filter(code="disposable_email").update(enabled=False)
    version = services.rules_changed(actor=ANALYST)
    assert version == 3
    assert RulesVersion.objects.get(version=3).snapshot["rules"]["disposable_email"]["enabled"] is False
    account = open_account(customer, NL_IP, email="x@mailinator.com")
    signup = latest(account, "signup")
    assert (signup.decision, signup.rules_version, signup.fired) == ("allow", 3, [])


@pytest.mark.django_db
def test_evaluation_opens_no_network_connection(customer: Customer, monkeypatch: pytest.MonkeyPatch) -> None:
    account = open_account(customer, NL_IP)  # the database connection is open already

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a network call during evaluation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    outcome = services.signup_assess(account_id=account.id, user_id=customer.user.id, ip=US_IP)
    assert outcome.decision == "allow"
    card = services.Card(fingerprint="fp_1", brand="visa", last4="4242", country="US", funding="prepaid")
    outcome = services.card_binding_assess(account_id=account.id, user_id=customer.user.id, ip=US_IP, card=card)
    assert {f["rule"] for f in outcome.assessment.fired} == {"country_mismatch", "prepaid_card"}


@pytest.mark.django_db
def test_declines_and_a_dispute_reach_the_payment_checkpoint_and_the_review_queue(
    customer: Customer,
    catalog: None,
) -> None:
    import time_machine

    from payments import disputes
    from payments.models import Payment, PaymentStatus
    from payments.tests.helpers import NOW, issue_invoice, pay

    with time_machine.travel(NOW, tick=False):
        account = open_account(customer, NL_IP)
        bind(customer, account, "pm_card_chargeCustomerFail")
        invoice = issue_invoice(account)
        for _ in range(3):  # three declined pay calls
            assert pay(customer.client, account, invoice).json()["status"] == "failed"
        assessment = latest(account, "payment")
        assert assessment is not None
        trouble = next(f for f in assessment.fired if f["rule"] == "payment_trouble")
        assert trouble["evidence"]["declines"] == 3
        assert assessment.decision == "allow"  # 30 alone stays under the review band

        card = bind(customer, account, "pm_card_visa").json()
        customer.client.post(f"/api/v1/billing-accounts/{account.public_id}/payment-methods/{card['id']}/default")
        while outbox.drain():
            pass
        paid = Payment.objects.get(invoice_id=invoice.id, status=PaymentStatus.SUCCEEDED)
        disputes.dispute_opened(
            gateway="sandbox",
            gateway_dispute_id="dp_test_1",
            intent_id=paid.gateway_intent_id or "",
            amount_minor=paid.amount_minor,
            currency=paid.currency,
            reason="fraudulent",
        )
        flagged = latest(account, "payment")
        assert flagged.decision == "review"
        assert AccountRisk.objects.get(account_id=account.id).status == RiskStatus.REVIEW


@pytest.mark.django_db
def test_blocking_an_account_raises_the_accounts_linked_to_it_for_review(
    customer: Customer, make_customer: Callable[..., Customer]
) -> None:
    first = open_account(customer, "203.0.113.20", name="Ring One BV")
    bind(customer, first, "pm_card_amex")
    other = make_customer()
    second = open_account(other, "198.51.100.99", name="Ring Two BV", email="ap@ring2.test")
    bind(other, second, "pm_card_amex")  # the same card: linked
    unrelated = open_account(make_customer(), "192.0.2.44", name="Unrelated BV", email="ap@unrelated.test")
    assert second.state == AccountState.ACTIVE
    account_services.billing_account_transition(
        account_id=first.id,
        transition="block",
        actor=Actor.operator(customer.user.id, "fraud@example.test"),
        reason="stolen card",
    )
    while outbox.drain():
        pass
    linked = latest(second, "linked")
    assert linked is not None and linked.decision == "review"
    (link,) = next(f for f in linked.fired if f["rule"] == "linked_accounts")["evidence"]["linked_blocked_accounts"]
    assert link["account"] == first.public_id and link["shared"][0].startswith("card amex •••• ")
    assert AccountRisk.objects.get(account_id=second.id).status == RiskStatus.REVIEW
    assert latest(unrelated, "linked") is None


@pytest.mark.django_db
def test_a_new_account_with_a_blocked_accounts_phone_is_raised_for_review(
    customer: Customer, make_customer: Callable[..., Customer]
) -> None:
    first = open_account(customer, "203.0.113.20", name="Ring One BV", phone="+31 20 123 4567")
    account_services.billing_account_transition(
        account_id=first.id, transition="block", actor=ANALYST, reason="stolen card"
    )
    while outbox.drain():
        pass
    other = make_customer()
    second = open_account(other, "198.51.100.99", name="Ring Two BV", email="ap@ring2.test", phone="020-1234567")
    signup = latest(second, "signup")
    assert signup.decision == "review"
    (link,) = next(f for f in signup.fired if f["rule"] == "linked_accounts")["evidence"]["linked_blocked_accounts"]
    assert link == {"account": first.public_id, "shared": ["phone +31201234567"]}
    bind(other, second, "pm_card_visa")
    assert second.state == AccountState.PENDING  # in review: the card does not activate it


@pytest.mark.django_db
def test_a_block_reassesses_the_newest_linked_accounts_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """An IP behind a carrier's NAT can be shared by tens of thousands of accounts: a block
    re-assesses the newest of them, up to the cap, and says how many it left out."""
    import datetime as dt

    from django.utils import timezone

    from accounts.tests.factories import BillingAccountFactory
    from antifraud.models import AccountSignal

    monkeypatch.setattr(services, "REASSESS_CAP", 2)
    blocked, *sharing = (BillingAccountFactory(state=AccountState.ACTIVE) for _ in range(5))
    closed = BillingAccountFactory(state=AccountState.CLOSED)
    start = timezone.now() - dt.timedelta(days=30)
    for day, account in enumerate([blocked, *sharing, closed]):  # signed up a day apart, in this order
        AccountSignal.objects.create(account_id=account.id, ip="100.64.0.1", created_at=start + dt.timedelta(days=day))
    AccountRisk.objects.create(account_id=blocked.id, status=RiskStatus.BLOCKED)

    assert services.linked_accounts_reassess(account_id=blocked.id) == 2
    reassessed = set(RiskAssessment.objects.filter(checkpoint="linked").values_list("account_id", flat=True))
    assert reassessed == {sharing[-1].id, sharing[-2].id}  # the newest open ones (the closed one is newer)
    assert RiskAssessment.objects.get(account_id=sharing[-1].id, checkpoint="linked").decision == "review"


@pytest.mark.django_db
def test_one_owners_accounts_sharing_a_card_are_not_card_reuse(
    customer: Customer, make_customer: Callable[..., Customer]
) -> None:
    """Issue 19: Alice owns Acme and Globex; the standard test card, already on a stranger's
    account, bound on Globex fired card_reuse (three accounts: the stranger's, Acme, Globex),
    put Globex in review and cut its limit. Her own accounts are not strangers sharing a card:
    only the stranger's counts. A second stranger's account with it still is card reuse."""
    stranger = make_customer()
    first = open_account(stranger, "203.0.113.50", name="Other BV", email="ap@other.test")
    assert bind(stranger, first, "pm_card_visa").status_code == 201
    acme = open_account(customer, NL_IP, name="Acme Cloud BV")
    globex = open_account(customer, NL_IP, name="Globex BV", email="ap@globex.test")
    assert bind(customer, acme, "pm_card_visa").status_code == 201
    assert bind(customer, globex, "pm_card_visa").status_code == 201
    binding = latest(globex, "card_binding")
    assert "card_reuse" not in {f["rule"] for f in binding.fired}, binding.fired
    assert binding.decision == "allow" and globex.state == AccountState.ACTIVE
    assert AccountRisk.objects.get(account_id=globex.id).status == RiskStatus.CLEAR

    third = make_customer()
    other = open_account(third, "198.51.100.7", name="Third BV", email="ap@third.test")
    bind(third, other, "pm_card_visa")
    reuse = next(f for f in latest(other, "card_binding").fired if f["rule"] == "card_reuse")
    assert reuse["evidence"]["accounts"] == 4
    assert sorted(reuse["evidence"]["shared_with"]) == sorted([first.public_id, acme.public_id, globex.public_id])
