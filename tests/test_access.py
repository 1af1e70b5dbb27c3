"""Who may do what in the back office, through the server (issue 21, Access): every operator
group (support, finance, fraud, read-only, and staff in no group) against every sensitive admin
action: the allowed ones change the state, the refused ones change nothing and answer the refusal
page (403) naming the group(s) that may. Pages are posted as a browser would (no page-level
hiding is trusted)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.admin import helpers
from django.test import Client

from accounts import services as account_services
from accounts.models import AccountState, ApiKey, BillingAccount
from antifraud.models import AccountRisk, CreditLimitPolicy, RiskRule, RiskStatus
from conftest import Customer, operator
from invoicing.models import ContractDiscount, CreditGrant, Invoice, InvoiceStatus, TaxRate
from payments import charging
from payments import services as payment_services
from payments.models import DunningPolicy, PaymentStatus, Refund, WebhookEvent, WebhookStatus
from payments.tests.helpers import NOW, bind, issue_invoice

pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]

GROUPS = ("support", "finance", "fraud", "read-only", "none")


@dataclass
class World:
    customer: Customer
    make_account: Callable[..., BillingAccount]

    def account(self, **fields: Any) -> BillingAccount:
        fields = {"currency": "EUR", "country": "NL", "state": AccountState.ACTIVE, **fields}
        return self.make_account(self.customer.user, **fields)


@pytest.fixture
def world(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> World:
    return World(customer, make_account)


def client_of(group: str) -> Client:
    return operator([] if group == "none" else [group])[1]


def refusal_names(response: Any, groups: set[str]) -> None:
    """The refusal page: 403, in the admin's look, naming every group that may."""
    assert response.status_code == 403, response.status_code
    page = response.content.decode()
    assert "Not allowed" in page and 'id="header"' in page  # the admin's own page, not a bare 403
    for group in groups:
        assert f'<strong class="needed-group">{group}</strong>' in page, (group, page[-2000:])


# Each sensitive action: (name, groups allowed, attempt). ``attempt(client, world)`` builds its own
# target, posts the action and returns (response, whether the state changed).


def suspend(client: Client, world: World) -> tuple[Any, bool]:
    account = world.account()
    response = client.post(f"/admin/accounts/billingaccount/{account.pk}/transition/suspend/", {"reason": "matrix"})
    account.refresh_from_db()
    return response, account.state == AccountState.SUSPENDED


def reactivate(client: Client, world: World) -> tuple[Any, bool]:
    account = world.account()
    account_services.billing_account_transition(
        account_id=account.id, transition="suspend", actor=account_services.UPDATE_ACTOR, reason="set-up"
    )
    response = client.post(f"/admin/accounts/billingaccount/{account.pk}/transition/reactivate/", {"reason": "paid"})
    account.refresh_from_db()
    return response, account.state == AccountState.ACTIVE


def block(client: Client, world: World) -> tuple[Any, bool]:
    account = world.account()
    response = client.post(f"/admin/accounts/billingaccount/{account.pk}/transition/block/", {"reason": "matrix"})
    account.refresh_from_db()
    return response, account.state == AccountState.BLOCKED


def revoke_key(client: Client, world: World) -> tuple[Any, bool]:
    key = account_services.api_key_create(user_id=world.customer.user.id, name="matrix").key
    response = client.post(
        "/admin/accounts/apikey/", {"action": "revoke", helpers.ACTION_CHECKBOX_NAME: [key.pk], "index": 0}
    )
    return response, ApiKey.objects.get(pk=key.pk).revoked_at is not None


def pause_dunning(client: Client, world: World) -> tuple[Any, bool]:
    profile = payment_services.profile_ensure(account_id=world.account().id)
    response = client.post(
        "/admin/payments/paymentprofile/",
        {helpers.ACTION_CHECKBOX_NAME: [profile.pk], "action": "pause_dunning", "apply": "yes", "reason": "matrix"},
    )
    profile.refresh_from_db()
    return response, profile.dunning_paused


def write_off(client: Client, world: World) -> tuple[Any, bool]:
    invoice = issue_invoice(world.account())
    response = client.post(f"/admin/invoicing/invoice/{invoice.pk}/action/write_off/", {"reason": "matrix"})
    return response, Invoice.objects.get(pk=invoice.pk).status == InvoiceStatus.UNCOLLECTIBLE


def void(client: Client, world: World) -> tuple[Any, bool]:
    invoice = issue_invoice(world.account())
    response = client.post(f"/admin/invoicing/invoice/{invoice.pk}/action/void/", {"reason": "matrix"})
    return response, Invoice.objects.get(pk=invoice.pk).status == InvoiceStatus.VOID


def refund(client: Client, world: World) -> tuple[Any, bool]:
    account = world.account()
    assert bind(world.customer.client, account).status_code == 201
    paid = charging.invoice_charge(invoice_id=issue_invoice(account).id, trigger="operator")
    assert paid.status == PaymentStatus.SUCCEEDED
    response = client.post(f"/admin/payments/payment/{paid.pk}/refund/", {"amount": "1.00", "reason": "matrix"})
    return response, Refund.objects.filter(payment_id=paid.pk).exists()


def withdraw_tax_rate(client: Client, world: World) -> tuple[Any, bool]:
    year = 2030 + TaxRate.objects.filter(country="ZZ").count()  # one future year per group: no overlap
    rate = TaxRate.objects.create(
        country="ZZ", rate=Decimal("17.00"), valid_from=dt.date(year, 1, 1), valid_until=dt.date(year + 1, 1, 1)
    )
    response = client.post(f"/admin/invoicing/taxrate/{rate.pk}/delete/", {"reason": "matrix"})
    return response, not TaxRate.objects.filter(pk=rate.pk).exists()


def review_approve(client: Client, world: World) -> tuple[Any, bool]:
    account = world.account()
    AccountRisk.objects.update_or_create(account_id=account.id, defaults={"status": RiskStatus.REVIEW})
    response = client.post(f"/admin/antifraud/accountrisk/{account.id}/decide/approve/", {"reason": "matrix"})
    return response, AccountRisk.objects.get(account_id=account.id).status == RiskStatus.APPROVED


def rerun_webhook(client: Client, world: World) -> tuple[Any, bool]:
    event = WebhookEvent.objects.create(
        gateway="stripe",
        event_id=f"evt_matrix_{WebhookEvent.objects.count()}",
        type="customer.updated",
        payload={"id": "evt_matrix", "type": "customer.updated", "data": {"object": {"id": "cus_1"}}},
        status=WebhookStatus.FAILED,
        attempts=1,
    )
    response = client.post(
        "/admin/payments/webhookevent/", {"action": "rerun", helpers.ACTION_CHECKBOX_NAME: [event.pk], "index": 0}
    )
    return response, WebhookEvent.objects.get(pk=event.pk).attempts > 1


def period_close(client: Client, world: World) -> tuple[Any, bool]:
    """The close page itself (starting a close is invoicing's tests' business)."""
    response = client.get("/admin/invoicing/invoice/period-close/")
    return response, response.status_code == 200 and b'name="period"' in response.content


def credit_limit(client: Client, world: World) -> tuple[Any, bool]:
    """The credit limit on the account's form: posted as the page offers it (the field is absent
    for those who may not set it: whatever they post for it is never read)."""
    account = world.account()
    url = f"/admin/accounts/billingaccount/{account.public_id}/change/"
    page = client.get(url)
    if page.status_code != 200:
        return page, False
    form = page.context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    for prefix in ("transitions", "memberships", "profile_changes"):
        data.update({f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0"})
    response = client.post(url, {**data, "credit_limit": "999.00"})
    account.refresh_from_db()
    return response, account.credit_limit == 999


def adds(model: type, url: str) -> Callable[[Client, World], tuple[Any, bool]]:
    """An add page: offered (a form) to those who may; refused, GET and POST, to the others."""

    def attempt(client: Client, world: World) -> tuple[Any, bool]:
        before = model.objects.count()  # type: ignore[attr-defined]
        page = client.get(url)
        if page.status_code != 200:
            posted = client.post(url, {})
            assert model.objects.count() == before  # type: ignore[attr-defined]
            return posted, False
        return page, b"<form" in page.content

    return attempt


def rule_change(client: Client, world: World) -> tuple[Any, bool]:
    """A rule's form: editable (its fields offered) or refused on POST."""
    rule = RiskRule.objects.order_by("pk").first()
    assert rule is not None
    url = f"/admin/antifraud/riskrule/{rule.pk}/change/"
    page = client.get(url)
    if page.status_code == 200 and 'name="weight"' in page.content.decode():
        return page, True
    before = (rule.enabled, rule.weight)
    posted = client.post(url, {"enabled": "", "weight": "0", "params": "{}"})
    rule.refresh_from_db()
    assert (rule.enabled, rule.weight) == before
    return posted, False


ACTIONS: list[tuple[str, set[str], Callable[[Client, World], tuple[Any, bool]]]] = [
    ("suspend", {"support"}, suspend),
    ("reactivate", {"support"}, reactivate),
    ("block", {"fraud"}, block),
    ("revoke an API key", {"support", "fraud"}, revoke_key),
    ("pause dunning", {"support", "finance"}, pause_dunning),
    ("write off", {"finance"}, write_off),
    ("void", {"finance"}, void),
    ("refund", {"finance"}, refund),
    ("period close", {"finance"}, period_close),
    ("re-run a webhook", {"finance"}, rerun_webhook),
    ("approve a review", {"fraud"}, review_approve),
    ("credit limit", {"fraud"}, credit_limit),
    ("risk rule", {"fraud"}, rule_change),
    ("add a tax rate", {"finance"}, adds(TaxRate, "/admin/invoicing/taxrate/add/")),
    ("withdraw a tax rate", {"finance"}, withdraw_tax_rate),
    ("add a credit grant", {"finance"}, adds(CreditGrant, "/admin/invoicing/creditgrant/add/")),
    ("add a discount", {"finance"}, adds(ContractDiscount, "/admin/invoicing/contractdiscount/add/")),
    ("add a dunning policy", {"finance"}, adds(DunningPolicy, "/admin/payments/dunningpolicy/add/")),
    ("add a credit limit policy", {"fraud"}, adds(CreditLimitPolicy, "/admin/antifraud/creditlimitpolicy/add/")),
]


@pytest.mark.parametrize(("name", "allowed", "attempt"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_every_group_against_every_sensitive_action(
    world: World, name: str, allowed: set[str], attempt: Callable[[Client, World], tuple[Any, bool]]
) -> None:
    for group in GROUPS:
        response, changed = attempt(client_of(group), world)
        if group in allowed:
            assert changed, (name, group, response.status_code)
            assert response.status_code in (200, 302), (name, group)
        else:
            assert not changed, (name, group)
            if name == "credit limit" and group in ("support", "finance"):
                # Their form has no credit limit: the rest saves, the limit posted is ignored.
                assert response.status_code == 302, (name, group)
                continue
            refusal_names(response, allowed if name != "credit limit" else set())


def test_the_refusal_page_names_the_group_and_what_was_refused(world: World) -> None:
    account = world.account()
    response = client_of("read-only").post(
        f"/admin/accounts/billingaccount/{account.pk}/transition/suspend/", {"reason": "x"}
    )
    refusal_names(response, {"support"})
    page = response.content.decode()
    assert "The transition “suspend” is not allowed for you." in page
    assert "accounts.transition_billingaccount" in page
    assert "Your groups: <strong>read-only</strong>" in page


def test_read_only_sees_every_list_and_changes_nothing(world: World) -> None:
    from django.contrib import admin

    reader = client_of("read-only")
    ours = {"accounts", "metering", "invoicing", "payments", "antifraud", "outbox"}
    for model in admin.site._registry:
        opts = model._meta
        if opts.app_label not in ours:
            continue  # Django's groups, axes' attempts, django-otp's devices: administrators' only
        url = f"/admin/{opts.app_label}/{opts.model_name}/"
        listed = reader.get(url, follow=True)  # the review queue opens on its default filter
        assert listed.status_code == 200 and listed.redirect_chain in ([], [(f"{url}?status__exact=review", 302)]), url
        assert reader.get(f"{url}add/").status_code == 403, url
