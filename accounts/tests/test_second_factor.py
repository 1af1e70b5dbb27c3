"""Staff sign in with a password and a second factor (issue 21, Access): a code from their
authenticator app (TOTP, django-otp) or a backup code, on django-two-factor-auth's pages; a new
operator enrols a device before any admin page; a lost device is reset by a command."""

from __future__ import annotations

import datetime as dt
import json
import logging
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.test import Client
from django_otp.oath import TOTP, totp
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import services
from accounts.models import User
from billing_site.common.logs import JsonFormatter
from conftest import staff_login
from tests.pages import form_of

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]

LOGIN = "/admin/account/login/"
PASSWORD = "the-right-passphrase"
SECRET = "3132333435363738393031323334353637383930"  # RFC 6238's test secret, hex


def current_code(key_hex: str = SECRET) -> str:
    return f"{totp(bytes.fromhex(key_hex)):06d}"


def sign_in(client: Client, email: str, password: str, *, code: str | None = None, backup: str | None = None) -> Any:
    """The sign-in page as a browser posts it: the password, then a code (or, through "Use a
    backup code", a backup code). Returns the last response."""
    page = client.get(f"{LOGIN}?next=/admin/")
    response = client.post(
        f"{LOGIN}?next=/admin/",
        {**form_of(page.content).fields, "auth-username": email, "auth-password": password},
    )
    if backup is not None:
        response = client.post(f"{LOGIN}?next=/admin/", {"wizard_goto_step": "backup"})
        fields = form_of(response.content).fields
        return client.post(f"{LOGIN}?next=/admin/", {**fields, "backup-otp_token": backup})
    if code is not None:
        fields = form_of(response.content).fields
        return client.post(f"{LOGIN}?next=/admin/", {**fields, "token-otp_token": code})
    return response


@pytest.fixture
def staff() -> User:
    user = services.operator_create(email="ops.person@ops.test", password=PASSWORD, groups=["support"])
    services.operator_second_factor_set(user_id=user.id, totp_key=SECRET, backup_codes=("backup01", "backup02"))
    return user


def test_the_password_alone_does_not_sign_in_and_the_code_does(staff: User) -> None:
    client = Client()
    asked = sign_in(client, staff.email, PASSWORD)
    assert asked.status_code == 200 and 'name="token-otp_token"' in asked.content.decode()
    assert "_auth_user_id" not in client.session  # not signed in with the password alone
    assert client.get("/admin/").status_code == 302

    right = Client()
    done = sign_in(right, staff.email, PASSWORD, code=current_code())
    assert done.status_code == 302 and done["Location"] == "/admin/"
    assert right.get("/admin/").status_code == 200
    # The same code again (a replay, within its 30 s) signs nobody else in; nor does a wrong one.
    again = sign_in(Client(), staff.email, PASSWORD, code=current_code())
    assert again.status_code == 200 and 'name="token-otp_token"' in again.content.decode()
    wrong = Client()
    sign_in(wrong, staff.email, PASSWORD, code=f"{(int(current_code()) + 1) % 1_000_000:06d}")
    assert "_auth_user_id" not in wrong.session and wrong.get("/admin/").status_code == 302


def test_a_backup_code_signs_in_once(staff: User) -> None:
    client = Client()
    response = sign_in(client, staff.email, PASSWORD, backup="backup01")
    assert response.status_code == 302 and client.get("/admin/").status_code == 200
    assert not StaticToken.objects.filter(token="backup01").exists()  # used up
    other = Client()
    assert sign_in(other, staff.email, PASSWORD, backup="backup01").status_code == 200
    assert other.get("/admin/").status_code == 302


def test_a_new_operator_enrols_an_authenticator_at_first_sign_in() -> None:
    services.operator_create(email="new.person@ops.test", password=PASSWORD, groups=["finance"])
    client = Client()
    first = sign_in(client, "new.person@ops.test", PASSWORD)
    assert first.status_code == 302
    sent = client.get(first["Location"])  # /admin/ → enrolment
    assert sent.status_code == 302 and sent["Location"].startswith("/admin/account/two_factor/setup/")
    welcome = client.get(sent["Location"])
    assert welcome.status_code == 200 and "Set up your second factor" in welcome.content.decode()
    generator = client.post(sent["Location"], form_of(welcome.content).fields)
    page = generator.content.decode()
    assert 'name="generator-token"' in page and "/admin/account/two_factor/qrcode/" in page
    secret = page.split("Or enter the secret by hand: <code>")[1].split("</code>")[0]
    assert client.get("/admin/account/two_factor/qrcode/")["Content-Type"].startswith("image/svg+xml")
    code = f"{TOTP(_b32decode(secret)).token():06d}"
    done = client.post(sent["Location"], {**form_of(generator.content).fields, "generator-token": code})
    assert done.status_code == 302
    assert client.get("/admin/accounts/billingaccount/").status_code == 200  # verified by the enrolment
    assert TOTPDevice.objects.filter(user__email="new.person@ops.test", confirmed=True).count() == 1


def _b32decode(secret: str) -> bytes:
    import base64

    return base64.b32decode(secret + "=" * (-len(secret) % 8))


def test_a_lost_device_is_reset_by_a_command_and_the_operator_enrols_again(
    staff: User, caplog: pytest.LogCaptureFixture, clock: time_machine.Traveller
) -> None:
    client = staff_login(Client(), staff)
    assert client.get("/admin/").status_code == 200
    caplog.set_level(logging.INFO)
    out = StringIO()
    call_command("operator_reset_second_factor", "--email", staff.email, "--reason", "phone lost, T-1", stdout=out)
    assert "2 device(s) deleted" in out.getvalue()  # the authenticator and the backup codes
    # The open session lost its second factor at once: back to enrolment, not the admin.
    response = client.get("/admin/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/account/two_factor/setup/")
    (line,) = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.msg == "operator.second_factor_reset"]
    assert line["user_id"] == staff.public_id and line["devices"] == 2 and line["reason"] == "phone lost, T-1"
    assert line["email"] == "o***@ops.test" and staff.email not in json.dumps(line)
    # Signed in again: the password, then enrolment (no code asked: there is no device).
    fresh = Client()
    assert sign_in(fresh, staff.email, PASSWORD).status_code == 302
    assert fresh.get("/admin/")["Location"].startswith("/admin/account/two_factor/setup/")
    with pytest.raises(CommandError, match="No staff user"):
        call_command("operator_reset_second_factor", "--email", "nobody@ops.test", "--reason", "x")


def test_operator_totp_prints_the_code_an_authenticator_would_show(staff: User) -> None:
    out = StringIO()
    call_command("operator_totp", "--email", staff.email, "--force", stdout=out)
    assert out.getvalue().strip() == current_code()
    with pytest.raises(CommandError, match="DEBUG"):
        call_command("operator_totp", "--email", staff.email)
