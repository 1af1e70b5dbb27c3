"""Finance works payments from the admin: every list and page renders with data in it, the
filters and the public-id search find what they should, a refund with a reason makes its
credit note (and more than was paid is refused with a message, not an error page), webhook
events are re-run, dunning is paused and resumed with a reason, the outbox is hurried. Each
of these needs its permission; card fingerprints are the fraud team's alone; nothing secret
is shown."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import time_machine
from django.contrib.admin import helpers
from django.core import mail
from django.test import Client

from accounts import services as account_services
from accounts.models import BillingAccount
from billing_site.outbox.models import OutboxKind, OutboxMessage
from conftest import Customer, staff_login
from invoicing import ledger
from invoicing.models import CreditNote, Invoice

# The price catalog (rated usage needs its SKUs).
from payments import charging, disputes, dunning, refunds
from payments.models import (
    DunningAction,
    DunningCase,
    DunningPolicy,
    Payment,
    PaymentMethod,
    PaymentProfile,
    PaymentStatus,
    Refund,
    RefundStatus,
    WebhookEvent,
    WebhookStatus,
)
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice

pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]


def operator(group: str | None, email: str | None = None) -> Client:
    """A logged-in staff member in ``group`` (None: staff in no group)."""
    user = account_services.operator_create(
        email=email or f"{group or 'nobody'}@ops.test", password="pw-long-enough", groups=[group] if group else []
    )
    return staff_login(Client(), user)


@dataclass
class Book:
    """A paid payment (121.00 EUR) and a declined one in dunning, on two accounts (sandbox)."""

    paid_account: BillingAccount
    paid_invoice: Invoice
    paid: Payment
    debtor: BillingAccount
    declined: Payment


@pytest.fixture
def book(
    catalog: None,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
) -> Book:
    paid_account = make_account(customer.user, currency="EUR", country="NL", name="Paying BV")
    assert bind(customer.client, paid_account).status_code == 201
    paid_invoice = issue_invoice(paid_account)  # the post-issue charge is queued, not run, in these tests
    paid = charging.invoice_charge(invoice_id=paid_invoice.id, trigger="operator")
    assert paid.status == PaymentStatus.SUCCEEDED
    debtor = make_account(customer.user, currency="EUR", country="NL", name="Owing BV", email="ops@owing.test")
    assert bind(customer.client, debtor, "pm_card_chargeCustomerFail").status_code == 201
    declined = charging.invoice_charge(invoice_id=issue_invoice(debtor).id, trigger="operator")
    assert declined.status == PaymentStatus.FAILED and declined.decline_code
    return Book(paid_account, paid_invoice, paid, debtor, declined)


def messages_of(response: object) -> list[str]:
    return [str(m) for m in response.context["messages"]]  # type: ignore[attr-defined]


def failed_webhook_event(event_id: str = "evt_admin_1") -> WebhookEvent:
    """An event stored and failed earlier (a type we do not handle: a re-run ignores it)."""
    return WebhookEvent.objects.create(
        gateway="stripe",
        event_id=event_id,
        type="customer.updated",
        payload={
            "id": event_id,
            "type": "customer.updated",
            "data": {"object": {"id": "cus_1", "object": "customer", "client_secret": "seti_1_secret_abc"}},
        },
        status=WebhookStatus.FAILED,
        attempts=1,
        error="OutcomeUnknown: the gateway did not answer",
    )


def test_every_list_and_page_renders_for_finance(book: Book, clock: time_machine.Traveller) -> None:
    refund = refunds.refund_issue(payment_id=book.paid.id, amount_minor=2100, reason="Outage credit", actor=FINANCE)
    dispute = disputes.dispute_opened(
        gateway=book.paid.gateway,
        gateway_dispute_id="dp_admin_1",
        intent_id=book.paid.gateway_intent_id or "",
        amount_minor=5000,
        currency="EUR",
        reason="fraudulent",
    )
    assert dispute is not None
    case = DunningCase.objects.get(invoice_id=book.declined.invoice_id)
    clock.move_to(case.first_failure_at + dt.timedelta(days=1, minutes=5))
    assert dunning.dunning_run()["retried"] == 1  # its first retry: a DunningAction
    action = DunningAction.objects.get(case=case)
    event = failed_webhook_event()
    message = OutboxMessage.objects.filter(kind=OutboxKind.EMAIL).first()
    assert message is not None
    finance = operator("finance")
    method = PaymentMethod.objects.get(account_id=book.paid_account.id)
    pages = {
        "payment": [book.paid, book.declined],
        "refund": [refund],
        "dispute": [dispute],
        "dunningpolicy": list(DunningPolicy.objects.all()),
        "dunningcase": [case],
        "webhookevent": [event],
        "paymentmethod": [method],
        "paymentprofile": list(PaymentProfile.objects.all()),
    }
    for model, rows in pages.items():
        listing = finance.get(f"/admin/payments/{model}/")
        assert listing.status_code == 200, model
        for row in rows:
            page = finance.get(f"/admin/payments/{model}/{row.pk}/change/")
            assert page.status_code == 200, (model, row.pk)
    assert finance.get("/admin/outbox/outboxmessage/").status_code == 200
    assert finance.get(f"/admin/outbox/outboxmessage/{message.pk}/change/").status_code == 200

    # The list of payments: ids, customer, invoice, money with its currency, decline code.
    listing = finance.get("/admin/payments/payment/").content.decode()
    for text in (book.paid.public_id, book.declined.public_id, "121.00 EUR", book.declined.decline_code, "Owing BV"):
        assert text in listing, text
    # A payment's page: its history, its gateway calls with their ids and keys, its refund;
    # never its client secret; a refund link for finance.
    book.paid.refresh_from_db()
    page = finance.get(f"/admin/payments/payment/{book.paid.pk}/change/").content.decode()
    for text in (
        book.paid.gateway_intent_id or "",
        book.paid.idempotency_key,
        refund.idempotency_key,
        refund.public_id,
        "Outage credit",
        "21.00 EUR",
        "succeeded",
        f"/admin/payments/payment/{book.paid.pk}/refund/",
    ):
        assert text in page, text
    assert "client_secret" not in page
    # The refund, the case's step, the webhook payload with its secret hidden.
    assert "Outage credit" in finance.get("/admin/payments/refund/").content.decode()
    assert action.action in finance.get(f"/admin/payments/dunningcase/{case.pk}/change/").content.decode()
    event_page = finance.get(f"/admin/payments/webhookevent/{event.pk}/change/").content.decode()
    assert "seti_1_secret_abc" not in event_page and "[hidden]" in event_page
    # An account's payment methods, on its payment profile.
    profile_page = finance.get(f"/admin/payments/paymentprofile/{book.paid_account.id}/change/").content.decode()
    assert method.public_id in profile_page and method.last4 in profile_page
    # The outbox masks an email's recipient.
    assert "ops@owing.test" not in finance.get(f"/admin/outbox/outboxmessage/{message.pk}/change/").content.decode()


def test_filters_and_search_by_public_ids(book: Book) -> None:
    finance = operator("finance")
    paid, declined = book.paid.public_id, book.declined.public_id
    book.paid.refresh_from_db()

    def listing(**query: str) -> str:
        response = finance.get("/admin/payments/payment/", query)
        assert response.status_code == 200, query
        return response.content.decode()

    for query, shown, hidden in (
        ({"status__exact": "succeeded"}, paid, declined),
        ({"status__exact": "failed"}, declined, paid),
        ({"q": paid}, paid, declined),
        ({"q": book.paid_invoice.public_id}, paid, declined),
        ({"q": book.debtor.public_id}, declined, paid),
        ({"q": book.paid.gateway_intent_id or ""}, paid, declined),
        ({"trigger__exact": "operator", "gateway__exact": "sandbox", "currency__exact": "EUR", "q": paid}, paid, ""),
        ({"created_at__gte": "2026-11-01 00:00:00+00:00", "created_at__lt": "2026-12-01 00:00:00+00:00"}, paid, ""),
        ({"created_at__gte": "2026-12-01 00:00:00+00:00"}, "0 payments", paid),
    ):
        page = listing(**query)
        assert shown in page, query
        assert not hidden or hidden not in page, query
    assert paid not in listing(currency__exact="JPY") and paid not in listing(q="pay_0000000000001")
    # Dunning cases by status and suspension, webhook events by type and state.
    cases = finance.get("/admin/payments/dunningcase/", {"status__exact": "open", "suspended_account__exact": "0"})
    assert book.debtor.public_id in cases.content.decode()
    closed = finance.get("/admin/payments/dunningcase/", {"status__exact": "resolved"}).content.decode()
    assert book.debtor.public_id not in closed
    failed_webhook_event()
    events = finance.get("/admin/payments/webhookevent/", {"type": "customer.updated", "status__exact": "failed"})
    assert "evt_admin_1" in events.content.decode()
    assert (
        "evt_admin_1"
        not in finance.get("/admin/payments/webhookevent/", {"status__exact": "processed"}).content.decode()
    )
    # An account's cards.
    cards = finance.get("/admin/payments/paymentmethod/", {"q": book.paid_account.public_id}).content.decode()
    assert PaymentMethod.objects.get(account_id=book.paid_account.id).public_id in cards
    assert PaymentMethod.objects.get(account_id=book.debtor.id).public_id not in cards


def test_a_partial_refund_from_the_admin_and_one_too_many(book: Book) -> None:
    finance = operator("finance")
    url = f"/admin/payments/payment/{book.paid.pk}/refund/"
    form = finance.get(url)
    assert form.status_code == 200 and "121.00 EUR" in form.content.decode()
    # No reason, or more places than EUR has: refused on the form, nothing written.
    assert finance.post(url, {"amount": "21.00", "reason": ""}).status_code == 200
    assert b"EUR amounts have at most 2 decimal places" in finance.post(url, {"amount": "2.001", "reason": "x"}).content
    assert not Refund.objects.exists()

    response = finance.post(url, {"amount": "21.00", "reason": "Outage credit"})
    assert response.status_code == 302
    refund = Refund.objects.get()
    assert (refund.amount_minor, refund.reason, refund.status) == (2100, "Outage credit", RefundStatus.SUCCEEDED)
    assert refund.requested_by == "finance@ops.test"
    note = CreditNote.objects.get(id=refund.credit_note_id)
    assert (note.invoice_id, note.total_minor) == (book.paid_invoice.id, 2100)
    done = finance.get(response["Location"])
    assert any("Refunded 21.00 EUR" in m for m in messages_of(done))

    # 100.01 EUR is more than the 100.00 left: a message on the form, no second refund.
    too_much = finance.post(url, {"amount": "100.01", "reason": "Everything"})
    assert too_much.status_code == 200
    assert any("At most 100.00 EUR can be refunded" in m for m in messages_of(too_much))
    assert Refund.objects.count() == 1
    book.paid.refresh_from_db()
    assert book.paid.amount_refunded_minor == 2100
    # A declined payment cannot be refunded: said, not a server error.
    refused = finance.post(f"/admin/payments/payment/{book.declined.pk}/refund/", {"amount": "1", "reason": "x"})
    assert refused.status_code == 200 and any("Only a succeeded payment" in m for m in messages_of(refused))
    assert ledger.check() == []


def test_refunds_need_the_issue_refund_permission(book: Book) -> None:
    url = f"/admin/payments/payment/{book.paid.pk}/refund/"
    support = operator("support")
    page = support.get(f"/admin/payments/payment/{book.paid.pk}/change/")
    assert page.status_code == 200 and url not in page.content.decode()
    assert support.get(url).status_code == 403
    assert support.post(url, {"amount": "1.00", "reason": "x"}).status_code == 403
    assert not Refund.objects.exists()
    # Finance sees no refund link on a payment that took no money.
    finance = operator("finance")
    declined = finance.get(f"/admin/payments/payment/{book.declined.pk}/change/").content.decode()
    assert f"/admin/payments/payment/{book.declined.pk}/refund/" not in declined


def test_nothing_is_added_changed_or_deleted_by_hand(book: Book) -> None:
    finance = operator("finance")
    for model, pk in (("payment", book.paid.pk), ("paymentmethod", book.paid.payment_method_id)):
        assert finance.get(f"/admin/payments/{model}/add/").status_code == 403
        assert finance.post(f"/admin/payments/{model}/{pk}/delete/").status_code == 403
        before = Payment.objects.get(pk=book.paid.pk).status
        finance.post(f"/admin/payments/{model}/{pk}/change/", {"status": "failed"})
        assert Payment.objects.get(pk=book.paid.pk).status == before


def test_a_user_without_the_finance_group_cannot_see_payments(book: Book) -> None:
    nobody = operator(None)
    for model in ("payment", "refund", "dunningpolicy", "dunningcase", "webhookevent", "paymentprofile"):
        assert nobody.get(f"/admin/payments/{model}/").status_code == 403, model
    assert nobody.get("/admin/outbox/outboxmessage/").status_code == 403
    index = nobody.get("/admin/").content.decode()
    assert "/admin/payments/" not in index
    # Fraud sees cards and payments, not refunds or webhooks.
    fraud = operator("fraud")
    assert fraud.get("/admin/payments/payment/").status_code == 200
    assert fraud.get("/admin/payments/refund/").status_code == 403
    assert fraud.get("/admin/payments/webhookevent/").status_code == 403


def test_card_fingerprints_only_for_the_fraud_team(book: Book) -> None:
    method = PaymentMethod.objects.get(account_id=book.paid_account.id)
    assert method.fingerprint
    url = f"/admin/payments/paymentmethod/{method.pk}/change/"
    finance_page = operator("finance").get(url).content.decode()
    assert method.last4 in finance_page and method.fingerprint not in finance_page
    fraud_page = operator("fraud").get(url).content.decode()
    assert method.fingerprint in fraud_page
    assert operator("fraud", "fraud2@ops.test").get("/admin/payments/bindingattempt/").status_code == 200


def test_webhook_events_are_rerun_from_the_list(book: Book) -> None:
    event = failed_webhook_event()
    url = "/admin/payments/webhookevent/"
    post = {"action": "rerun", helpers.ACTION_CHECKBOX_NAME: [event.pk], "index": 0}
    # Support may not (not even see them); finance may.
    assert operator("support").post(url, post).status_code == 403
    event.refresh_from_db()
    assert event.status == WebhookStatus.FAILED
    finance = operator("finance")
    response = finance.post(url, post, follow=True)
    assert response.status_code == 200
    assert any("Re-ran 1 event(s): ignored 1." in m for m in messages_of(response))
    event.refresh_from_db()
    assert (event.status, event.attempts, event.processed_at is not None) == (WebhookStatus.IGNORED, 2, True)


def test_dunning_is_paused_and_resumed_with_a_reason(book: Book) -> None:
    case = DunningCase.objects.get(invoice_id=book.declined.invoice_id)
    url = "/admin/payments/dunningcase/"
    select = {helpers.ACTION_CHECKBOX_NAME: [case.pk]}
    # Read-only sees the cases but is offered no pause, and a pause it posts is refused, naming
    # the groups that may (support and finance both pause dunning).
    reader = operator("read-only")
    assert 'value="pause_dunning"' not in reader.get(url).content.decode()
    refused = reader.post(url, {**select, "action": "pause_dunning", "apply": "yes", "reason": "no"})
    assert refused.status_code == 403
    assert "finance" in refused.content.decode() and "support" in refused.content.decode()
    assert not PaymentProfile.objects.get(account_id=book.debtor.id).dunning_paused
    finance = operator("finance")
    assert 'value="pause_dunning"' in finance.get(url).content.decode()
    # The action asks for a reason first; without one nothing changes.
    asked = finance.post(url, {**select, "action": "pause_dunning", "index": 0})
    assert asked.status_code == 200 and book.debtor.public_id in asked.content.decode()
    assert finance.post(url, {**select, "action": "pause_dunning", "apply": "yes", "reason": " "}).status_code == 200
    profile = PaymentProfile.objects.get(account_id=book.debtor.id)
    assert not profile.dunning_paused
    done = finance.post(
        url, {**select, "action": "pause_dunning", "apply": "yes", "reason": "Disputed invoice"}, follow=True
    )
    assert any(f"Dunning paused for 1 account(s): {book.debtor.public_id}" in m for m in messages_of(done))
    profile.refresh_from_db()
    assert (profile.dunning_paused, profile.dunning_paused_reason) == (True, "Disputed invoice")
    assert dunning.dunning_run()["paused_skipped"] == 1
    paused = finance.get(url, {"q": book.debtor.public_id}).content.decode()
    assert "icon-yes" in paused  # the "dunning paused" column
    # Resumed from the account's payment profile, no reason needed.
    finance.post(
        "/admin/payments/paymentprofile/",
        {helpers.ACTION_CHECKBOX_NAME: [book.debtor.id], "action": "resume_dunning", "apply": "yes", "reason": ""},
    )
    profile.refresh_from_db()
    assert (profile.dunning_paused, profile.dunning_paused_reason) == (False, "")


def test_finance_edits_the_dunning_policy(book: Book) -> None:
    finance = operator("finance")
    policy = DunningPolicy.objects.get(currency="", account_kind="")
    fields = {
        "name": "Default",
        "currency": "",
        "account_kind": "",
        "retry_days": "1,3,5,8",
        "email_on_failure": "on",
        "warn_days_before_suspension": "2",
        "suspend_after_days": "10",
        "write_off_after_days": "90",
        "is_active": "on",
    }
    assert finance.post(f"/admin/payments/dunningpolicy/{policy.pk}/change/", fields).status_code == 302
    policy.refresh_from_db()
    assert (policy.retry_days, policy.suspend_after_days, policy.write_off_after_days) == ([1, 3, 5, 8], 10, 90)
    # A write-off before the suspension, days out of order, or a currency that is not one: refused.
    for bad, error in (
        ({"write_off_after_days": "5"}, "The write-off comes after the suspension."),
        ({"retry_days": "3,1"}, "increasing order"),
        ({"currency": "EUX"}, "not an ISO 4217 currency code"),
    ):
        response = finance.post(f"/admin/payments/dunningpolicy/{policy.pk}/change/", {**fields, **bad})
        assert response.status_code == 200 and error in response.content.decode(), bad
    # A policy for EUR business accounts; a second active one for the same scope is refused.
    scoped = {**fields, "name": "EUR business", "currency": "eur", "account_kind": "business"}
    assert finance.post("/admin/payments/dunningpolicy/add/", scoped).status_code == 302
    assert DunningPolicy.objects.get(name="EUR business").currency == "EUR"
    assert finance.post("/admin/payments/dunningpolicy/add/", {**scoped, "name": "twin"}).status_code == 200
    assert not DunningPolicy.objects.filter(name="twin").exists()
    # Policies are switched off, never deleted.
    assert finance.post(f"/admin/payments/dunningpolicy/{policy.pk}/delete/").status_code == 403


def test_the_outbox_is_delivered_now_from_the_list(book: Book) -> None:
    pending = OutboxMessage.objects.get(kind=OutboxKind.EMAIL, delivered_at__isnull=True, account_id=book.debtor.id)
    finance = operator("finance")
    listing = finance.get("/admin/outbox/outboxmessage/", {"state": "pending", "kind__exact": "email"})
    assert f"/admin/outbox/outboxmessage/{pending.pk}/change/" in listing.content.decode()
    mail.outbox.clear()
    response = finance.post(
        "/admin/outbox/outboxmessage/",
        {"action": "deliver_now", helpers.ACTION_CHECKBOX_NAME: [pending.pk], "index": 0},
        follow=True,
    )
    assert any("Delivered 1 message(s)." in m for m in messages_of(response))
    pending.refresh_from_db()
    assert pending.delivered_at is not None and pending.attempts == 1
    assert [m.to for m in mail.outbox] == [["ops@owing.test"]]
    delivered = finance.get("/admin/outbox/outboxmessage/", {"state": "delivered"}).content.decode()
    assert f"/admin/outbox/outboxmessage/{pending.pk}/change/" in delivered
    assert finance.get("/admin/outbox/outboxmessage/", {"q": book.debtor.public_id}).status_code == 200


def rendered_form_fields(html: str) -> dict[str, str]:
    """The named inputs, textareas and selects of a page's last form, as a browser posts them."""
    from html.parser import HTMLParser

    class Form(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.fields: dict[str, str] = {}
            self._textarea: str | None = None
            self._select: str | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            named = dict(attrs)
            name = str(named.get("name") or "")
            if tag == "form":
                self.fields = {}
            elif tag == "input" and name and named.get("type") not in ("submit", "checkbox"):
                self.fields[name] = named.get("value") or ""
            elif tag == "input" and name and "checked" in named:
                self.fields[name] = named.get("value") or "on"
            elif tag == "textarea" and name:
                self._textarea = name
                self.fields[name] = ""
            elif tag == "select" and name:
                self._select = name
            elif tag == "option" and self._select and (self._select not in self.fields or "selected" in named):
                self.fields[self._select] = named.get("value") or ""

        def handle_data(self, data: str) -> None:
            if self._textarea:
                self.fields[self._textarea] += data.strip()

        def handle_endtag(self, tag: str) -> None:
            if tag == "textarea":
                self._textarea = None
            elif tag == "select":
                self._select = None

    parser = Form()
    parser.feed(html)
    return parser.fields


def test_a_refund_of_100_eur_splits_its_vat_by_the_rule_and_keeps_finance_s_note_off_the_customer_s_papers(
    book: Book, customer: Customer
) -> None:
    """Issue 19: 100.00 of a 121.00 invoice at 21 % is credited as 82.64 + 17.36 (the VAT
    fraction of the gross, rounded half-up; 82.65 + 17.35 had less VAT than 21 % of its net);
    the internal note finance types stays in the admin."""
    from invoicing.pdf import credit_note_html

    finance = operator("finance")
    url = f"/admin/payments/payment/{book.paid.pk}/refund/"
    fields = rendered_form_fields(finance.get(url).content.decode())
    assert {"amount", "reason", "internal_note"} <= fields.keys()
    fields.update(amount="100.00", reason="Service credit", internal_note="ticket #4712, customer angry on the phone")
    assert finance.post(url, fields).status_code == 302
    refund = Refund.objects.get()
    assert (refund.reason, refund.internal_note) == ("Service credit", "ticket #4712, customer angry on the phone")
    assert refund.credit_note_id is not None
    note = CreditNote.objects.get(id=refund.credit_note_id)
    assert (note.subtotal_minor, note.tax_minor, note.total_minor) == (8264, 1736, 10000)
    document = credit_note_html(note)
    assert "Service credit" in document and "4712" not in document
    listed = customer.client.get(f"/api/v1/billing-accounts/{book.paid_account.public_id}/refunds")
    assert listed.status_code == 200
    assert listed.json()["results"][0]["reason"] == "Service credit" and "4712" not in listed.content.decode()
    # Finance sees it on the refund's page.
    assert "ticket #4712" in finance.get(f"/admin/payments/refund/{refund.pk}/change/").content.decode()


def test_a_dunning_ladder_out_of_order_is_refused_on_the_field_that_is_wrong(book: Book) -> None:
    """Issue 19: retries on days 1-1000 were accepted with the write-off at day 60."""
    finance = operator("finance")
    policy = DunningPolicy.objects.get(currency="", account_kind="")
    url = f"/admin/payments/dunningpolicy/{policy.pk}/change/"
    fields = rendered_form_fields(finance.get(url).content.decode())
    assert (fields["retry_days"], fields["is_active"]) == ("1,3,5", "on")
    for bad, field, error in (
        ({"retry_days": ",".join(str(d) for d in range(1, 1001))}, "retry_days", "before the suspension"),
        ({"retry_days": "1,3,7"}, "retry_days", "day 7 does not"),
        ({"warn_days_before_suspension": "8"}, "warn_days_before_suspension", "before the due date"),
        ({"write_off_after_days": "7"}, "write_off_after_days", "after the suspension"),
    ):
        response = finance.post(url, {**fields, **bad})
        assert response.status_code == 200, bad
        errors = response.context["adminform"].form.errors
        assert list(errors) == [field] and error in " ".join(errors[field]), (bad, errors)
    policy.refresh_from_db()
    assert (policy.retry_days, policy.suspend_after_days, policy.write_off_after_days) == ([1, 3, 5], 7, 60)
    # The same rule in the service, whoever calls it.
    from billing_site.common.errors import ApplicationError
    from payments import services

    policy.retry_days = list(range(1, 1001))
    with pytest.raises(ApplicationError) as refused:
        services.dunning_policy_save(policy=policy, changed=["retry_days"], actor=FINANCE)
    assert (refused.value.code, refused.value.errors[0]["field"]) == ("invalid_policy", "retry_days")
    policy.refresh_from_db()
    assert policy.retry_days == [1, 3, 5]
    # A good ladder saves.
    assert finance.post(url, {**fields, "retry_days": "1,2,4,6"}).status_code == 302
    policy.refresh_from_db()
    assert policy.retry_days == [1, 2, 4, 6]


def test_what_finance_does_is_logged_by_user_id_never_by_email(book: Book, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: refund.created named its operator by email. Every payments log line about a
    staff member's action names them by kind and id."""
    finance = operator("finance", "finance.lead@ops.test")
    user_id = account_services_user_id("finance.lead@ops.test")
    case = DunningCase.objects.get(invoice_id=book.declined.invoice_id)
    policy = DunningPolicy.objects.get(currency="", account_kind="")
    with caplog.at_level(logging.INFO):
        refund_url = f"/admin/payments/payment/{book.paid.pk}/refund/"
        assert finance.post(refund_url, {"amount": "1.00", "reason": "Outage credit"}).status_code == 302
        finance.post(
            "/admin/payments/dunningcase/",
            {helpers.ACTION_CHECKBOX_NAME: [case.pk], "action": "pause_dunning", "apply": "yes", "reason": "call"},
        )
        event = failed_webhook_event()
        finance.post(
            "/admin/payments/webhookevent/",
            {"action": "rerun", helpers.ACTION_CHECKBOX_NAME: [event.pk], "index": 0},
        )
        fields = rendered_form_fields(
            finance.get(f"/admin/payments/dunningpolicy/{policy.pk}/change/").content.decode()
        )
        assert finance.post(f"/admin/payments/dunningpolicy/{policy.pk}/change/", fields).status_code == 302
    lines = [r for r in caplog.records if r.name.startswith(("payments", "invoicing", "billing_site"))]
    events = {r.getMessage() for r in lines}
    assert {"refund.created", "dunning.paused", "webhook.rerun_by_operator", "dunning_policy.changed"} <= events
    for record in lines:
        assert "finance.lead@" not in repr(record.__dict__), (record.getMessage(), record.__dict__)
    created = next(r for r in lines if r.getMessage() == "refund.created")
    assert (created.__dict__["actor_kind"], created.__dict__["actor_user_id"]) == ("operator", user_id)


def account_services_user_id(email: str) -> int:
    from django.contrib.auth import get_user_model

    return int(get_user_model().objects.get(email=email).pk)
