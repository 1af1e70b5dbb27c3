"""The audit trail records every change, with before/after, who and why: staff edits and
transitions through the admin, the set-based period close, a queryset.update() and raw SQL, and
a task run by a real Celery worker; and shows it on a record's History and the trail page."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client

from accounts.models import AccountState, BillingAccount
from billing_site.audit import selectors
from billing_site.common.actors import Actor
from billing_site.common.audit import audit_context
from conftest import operator

pytestmark = pytest.mark.django_db


def change_url(account: BillingAccount) -> str:
    return f"/admin/accounts/billingaccount/{account.public_id}/change/"


def updates(account: BillingAccount) -> list[selectors.TrailEntry]:
    return [e for e in selectors.object_trail(account) if e.action == "update"]


def test_a_staff_edit_in_the_admin_is_recorded_with_old_and_new_values_and_the_operator(
    customer: object, make_account: Callable
) -> None:
    account = make_account(customer.user, email="old@example.test")  # type: ignore[attr-defined]
    user, finance = operator(["finance", "fraud"])  # the email is finance's field, the credit limit fraud's
    form = finance.get(change_url(account)).context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update({"credit_limit": "2500.00", "country": "NL"})
    data.update(
        {
            f"{p}-{n}": "0"
            for p in ("transitions", "memberships", "profile_changes")
            for n in ("TOTAL_FORMS", "INITIAL_FORMS")
        }
    )
    data["email"] = "new@example.test"
    response = finance.post(change_url(account), data)
    assert response.status_code == 302, response.content[:2000]

    [edit] = updates(account)
    assert edit.changes["credit_limit"] == (Decimal("0.0000"), Decimal("2500.0000"))
    assert edit.changes["email"] == ("old@example.test", "new@example.test")
    assert (edit.actor_kind, edit.actor) == ("operator", user.email)
    assert edit.context["url"] == change_url(account) and edit.context["method"] == "POST"
    assert edit.public_id == account.public_id

    history = finance.get(f"/admin/accounts/billingaccount/{account.public_id}/history/")
    assert history.status_code == 200
    page = history.content.decode()
    assert "credit_limit" in page and "2,500.00 EUR" in page and user.email in page
    assert "2500.0000" not in page  # money as money, never the column's 4 places


def test_a_suspend_with_a_reason_in_the_admin_is_recorded_with_the_reason(
    customer: object, make_account: Callable
) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    user, support = operator(["support"])
    url = f"/admin/accounts/billingaccount/{account.pk}/transition/suspend/"
    assert support.post(url, {"reason": "chargeback on the last invoice"}).status_code == 302

    [suspend] = [e for e in updates(account) if "state" in e.changes]
    assert suspend.changes["state"] == ("active", "suspended")
    assert (suspend.actor_kind, suspend.actor, suspend.reason) == (
        "operator",
        user.email,
        "chargeback on the last invoice",
    )
    page = support.get(f"/admin/accounts/billingaccount/{account.public_id}/history/").content.decode()
    assert "chargeback on the last invoice" in page and "suspended" in page


def test_queryset_update_and_raw_sql_are_recorded_but_a_no_op_update_is_not(
    customer: object, make_account: Callable
) -> None:
    account = make_account(customer.user, name="Before BV")  # type: ignore[attr-defined]
    with audit_context(actor=Actor.system("tests.bulk"), reason="data fix"):
        BillingAccount.objects.filter(pk=account.pk).update(name="After BV")
        BillingAccount.objects.filter(pk=account.pk).update(name="After BV")  # nothing changes: no event
        with connection.cursor() as cur:
            cur.execute("UPDATE accounts_billingaccount SET payment_terms_days = 30 WHERE id = %s", [account.pk])

    raw, orm = updates(account)
    assert orm.changes == {"name": ("Before BV", "After BV")}
    assert raw.changes == {"payment_terms_days": (14, 30)}
    assert {(e.actor_kind, e.actor, e.reason) for e in (orm, raw)} == {("system", "tests.bulk", "data fix")}


@pytest.mark.clock("2026-11-03T09:00:00Z")
def test_the_period_close_is_recorded_as_the_set_based_writer_for_whom_it_ran(
    catalog: None, customer: object, make_account: Callable
) -> None:
    from invoicing import services
    from invoicing.models import Invoice
    from invoicing.tests.factories import rated
    from invoicing.tests.support import FINANCE, OCTOBER

    account = make_account(customer.user, currency="EUR")  # type: ignore[attr-defined]
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "10")
    report = services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)
    assert report.issued == 1
    invoice = Invoice.objects.get(account_id=account.id)

    trail = selectors.object_trail(invoice)
    assert trail and all(e.context.get("writer") == "invoicing.period_close" for e in trail)
    assert {(e.actor_kind, e.actor) for e in trail} == {("system", FINANCE.name)}
    issued = next(e for e in trail if e.changes.get("status", (None, None))[1] == "issued")
    assert issued.changes["number"][1] == invoice.number

    _, finance = operator(["finance"])
    history = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/history/")
    assert history.status_code == 200
    assert invoice.number in history.content.decode() and "invoicing.period_close" in history.content.decode()

    # The account's trail holds the account and its invoice, newest first.
    timeline = selectors.account_trail(account_id=account.id)
    assert {e.model for e in timeline} >= {"accounts.BillingAccount", "invoicing.Invoice"}
    assert [e.at for e in timeline] == sorted((e.at for e in timeline), reverse=True)


def test_the_trail_page_searches_by_object_actor_and_date(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    other = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    user, support = operator(["support"])
    support.post(f"/admin/accounts/billingaccount/{account.pk}/transition/suspend/", {"reason": "fraud ring"})
    with audit_context(actor=Actor.system("tests.other"), reason="other change"):
        BillingAccount.objects.filter(pk=other.pk).update(name="Renamed")

    admin, client = operator([])
    admin.is_superuser = True  # the trail's permission (audit.view_auditevent) is not in a group yet
    admin.save()
    page = client.get("/admin/audit/auditevent/", {"object": account.public_id}).content.decode()
    assert "fraud ring" in page and "other change" not in page
    page = client.get("/admin/audit/auditevent/", {"actor": "tests.other"}).content.decode()
    assert "other change" in page and "fraud ring" not in page
    old = client.get("/admin/audit/auditevent/", {"actor": user.email, "from": "2000-01-01", "to": "2000-01-02"})
    assert old.status_code == 200 and "fraud ring" not in old.content.decode()
    assert Client().get("/admin/audit/auditevent/").status_code == 302  # staff only: to the login


def test_a_customers_change_through_the_api_names_the_customer_and_the_key(
    customer: object, make_account: Callable
) -> None:
    from accounts.models import ApiKey

    account = make_account(customer.user, name="Before BV")  # type: ignore[attr-defined]
    response = customer.client.patch(  # type: ignore[attr-defined]
        f"/api/v1/billing-accounts/{account.public_id}", {"name": "After BV"}, format="json"
    )
    assert response.status_code == 200, response.content
    [rename] = updates(account)
    assert rename.changes["name"] == ("Before BV", "After BV")
    key = ApiKey.objects.get(user=customer.user)  # type: ignore[attr-defined]
    assert (rename.actor_kind, rename.actor) == ("user", customer.user.public_id)  # type: ignore[attr-defined]
    assert rename.context["api_key"] == key.public_id
    assert customer.user.email not in str(rename.context) + rename.actor  # type: ignore[attr-defined]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_change_made_by_a_task_in_a_real_worker_names_the_task(
    celery_worker: object, customer: object, make_account: Callable
) -> None:
    from billing_site.celery import app

    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    result = app.send_task(
        "payments.account_suspend", kwargs={"account_id": account.id, "reason": "invoice 30 days overdue"}
    )
    assert result.get(timeout=30) is True

    [suspend] = [e for e in updates(account) if "state" in e.changes]
    assert suspend.changes["state"] == ("active", "suspended")
    assert suspend.context["task"] == "payments.account_suspend"
    assert suspend.context["task_id"] == result.id
    assert (suspend.actor_kind, suspend.reason) == ("system", "invoice 30 days overdue")


def test_a_statement_without_parameters_keeps_its_literal_percents_inside_an_audit_context(
    customer: object, make_account: Callable
) -> None:
    """pghistory sends the context as parameters: a statement that had none (a migration's DDL,
    format('%I') in a DO block, LIKE 'x%') must not have its '%' read as placeholders
    (`manage.py migrate` runs inside a context and failed on metering.0007 that way)."""
    account = make_account(customer.user)  # type: ignore[attr-defined]
    with audit_context(actor=Actor.system("test:percents")), connection.cursor() as cursor:
        cursor.execute("SELECT format('%I', 'x'), 'a%' LIKE 'a%%', 100 % 7")
        assert cursor.fetchone() == ("x", True, 2)
        cursor.execute(f"UPDATE accounts_billingaccount SET name = 'Fifty %' WHERE id = {int(account.id)}")  # noqa: S608
    account.refresh_from_db()
    assert account.name == "Fifty %"
    (entry,) = [e for e in selectors.account_trail(account_id=account.id) if e.actor == "test:percents"]
    assert entry.changes["name"][1] == "Fifty %"


def test_an_analyst_s_review_decisions_and_rule_changes_carry_the_reason_in_the_trail(
    customer: object, make_account: Callable
) -> None:
    from antifraud import services as antifraud_services
    from antifraud.models import AccountRisk, RiskRule, RiskStatus

    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    AccountRisk.objects.update_or_create(account_id=account.id, defaults={"status": RiskStatus.REVIEW})
    analyst = Actor.system("tests.analyst")
    antifraud_services.review_block(account_id=account.id, actor=analyst, reason="stolen card, confirmed by issuer")
    risk = AccountRisk.objects.get(account_id=account.id)
    [blocked] = [e for e in selectors.object_trail(risk) if e.action == "update" and "status" in e.changes]
    assert (blocked.actor, blocked.reason) == ("tests.analyst", "stolen card, confirmed by issuer")

    rule = RiskRule.objects.order_by("pk").first()
    assert rule is not None
    antifraud_services.risk_rule_update(code=rule.code, weight=rule.weight + 1, actor=analyst)
    [changed] = [e for e in selectors.object_trail(rule) if e.action == "update"]
    assert changed.actor == "tests.analyst"
