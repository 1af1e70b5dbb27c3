"""Staff sign-in to the admin: failed passwords are throttled and lock the login out (django-axes),
and an idle admin session expires (issue 19: 30 wrong passwords in 16 s, then the right one
logged in; sessions lasted 14 days and survived a browser restart). The sign-in is the second
factor's two-step page (password, then a TOTP code); the throttle counts its password step."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
import time_machine
from django.conf import settings
from django.test import Client
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import services
from billing_site.common.logs import JsonFormatter
from tests.pages import form_of

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]

EMAIL = "support.person@ops.test"
PASSWORD = "the-right-passphrase"
LOGIN = "/admin/account/login/?next=/admin/"


@pytest.fixture
def staff() -> None:
    user = services.operator_create(email=EMAIL, password=PASSWORD, groups=["support"])
    TOTPDevice.objects.create(user=user, name="default", confirmed=True)


def sign_in(client: Client, password: str, *, email: str = EMAIL) -> Any:
    """Post the sign-in page's own forms, as a browser would: the password, then (if the page
    asks for it) the code the staff member's authenticator app shows now."""
    page = client.get(LOGIN)
    fields = form_of(page.content).fields if page.status_code == 200 else {}
    response = client.post(LOGIN, {**fields, "auth-username": email, "auth-password": password})
    if response.status_code != 200 or 'name="token-otp_token"' not in response.content.decode():
        return response
    device = TOTPDevice.objects.get(user__email=email)
    code = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits)
    fields = form_of(response.content).fields
    return client.post(LOGIN, {**fields, "token-otp_token": f"{code:0{device.digits}d}"})


def test_thirty_wrong_passwords_then_the_right_one_is_still_refused_with_a_clear_message(staff: None) -> None:
    client = Client()
    for _ in range(30):
        sign_in(client, "wrong-guess")
    response = sign_in(client, PASSWORD)

    assert response.status_code == 429
    text = response.content.decode()
    assert "Too many failed sign-ins" in text
    assert f"{settings.ADMIN_LOGIN_LOCKOUT_MINUTES} minutes" in text
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/").status_code == 302  # not signed in


def test_the_lockout_starts_at_the_limit_and_ends_after_the_cool_off(
    staff: None, clock: time_machine.Traveller
) -> None:
    client = Client()
    for _ in range(settings.ADMIN_LOGIN_FAILURE_LIMIT - 1):
        assert sign_in(client, "wrong-guess").status_code == 200  # the login page again, with its error
    assert sign_in(client, "wrong-guess").status_code == 429
    assert sign_in(Client(REMOTE_ADDR="10.9.8.7"), PASSWORD).status_code == 429  # the login, from anywhere

    clock.shift(dt.timedelta(minutes=settings.ADMIN_LOGIN_LOCKOUT_MINUTES, seconds=1))
    assert sign_in(client, PASSWORD).status_code == 302
    assert client.get("/admin/").status_code == 200


def test_an_idle_admin_session_expires_and_an_active_one_does_not(staff: None, clock: time_machine.Traveller) -> None:
    client = Client()
    signed_in = sign_in(client, PASSWORD)
    assert signed_in.status_code == 302
    cookie = signed_in.cookies[settings.SESSION_COOKIE_NAME]  # type: ignore[attr-defined]
    assert cookie["max-age"] == "" and cookie["expires"] == ""  # gone when the browser closes
    idle = dt.timedelta(minutes=settings.ADMIN_SESSION_IDLE_MINUTES)

    for _ in range(3):  # used every 20 minutes: the session slides along
        clock.shift(idle - dt.timedelta(minutes=10))
        assert client.get("/admin/").status_code == 200

    clock.shift(idle + dt.timedelta(seconds=1))
    response = client.get("/admin/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/account/login/")


def test_failed_sign_ins_are_logged_without_the_staff_email(staff: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(settings.ADMIN_LOGIN_FAILURE_LIMIT + 1):
        sign_in(Client(), "wrong-guess")
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("s***@ops.test" in line for line in lines)
    assert not [line for line in lines if "support.person" in line]
