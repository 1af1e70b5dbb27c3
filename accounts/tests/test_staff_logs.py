"""No accounts log line names a staff member by their full email (issue 19: operator emails
appeared unmasked in logs): an operator created, signing in (failing, then succeeding), changing
a profile and moving an account are logged with ids, the email at most masked."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from django.test import Client

from accounts import services
from accounts.models import AccountState, BillingAccount
from accounts.tests.test_second_factor import SECRET, current_code, sign_in
from billing_site.common.logs import JsonFormatter, TextFormatter
from conftest import Customer
from tests.pages import form_of

pytestmark = pytest.mark.django_db

EMAIL = "finance.person@ops.test"


def test_what_staff_do_in_accounts_is_logged_without_their_email(
    caplog: pytest.LogCaptureFixture, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)
    caplog.set_level(logging.DEBUG)

    staff = services.operator_create(email=EMAIL, password="a-finance-passphrase", groups=["finance", "support"])
    services.operator_second_factor_set(user_id=staff.id, totp_key=SECRET)
    client = Client()
    sign_in(client, EMAIL, "not-it")
    assert sign_in(client, EMAIL, "a-finance-passphrase", code=current_code()).status_code == 302
    change = f"/admin/accounts/billingaccount/{account.public_id}/change/"
    assert client.post(change, {**form_of(client.get(change).content).fields, "name": "Renamed"}).status_code == 302
    transition = f"/admin/accounts/billingaccount/{account.public_id}/transition/suspend/"
    assert client.post(transition, {"reason": "leaked credential"}).status_code == 302

    events = {r.getMessage() for r in caplog.records}
    assert {"operator.create", "account.update", "account.transition"} <= events
    lines = [f(r) for r in caplog.records for f in (JsonFormatter().format, TextFormatter().format)]
    assert not [line for line in lines if "finance.person" in line]
    assert any("f***@ops.test" in line for line in lines)  # masked, as customers' are
    assert any(str(staff.id) in line for line in lines if "account.transition" in line)  # by id
