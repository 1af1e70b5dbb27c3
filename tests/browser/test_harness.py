"""The harness itself: staff sign in through the real sign-in pages (password, then the
authenticator's code), a wrong password or a wrong code does not get in, screenshots land
where ``BILLING_SCREENSHOTS`` says, and a page that asks another host for anything is caught
(the guard that proves the admin needs no internet can fail)."""

from __future__ import annotations

import struct
from pathlib import Path
from urllib.parse import unquote

import pytest
from playwright.sync_api import Page, expect

from tests.browser.harness import (
    LOGIN,
    PASSWORD,
    SCREENSHOTS_ENV,
    VIEWPORT,
    admin_login,
    authenticator_code,
    new_operator,
    screenshot,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_staff_sign_in_with_password_and_code_and_a_wrong_one_does_not_get_in(
    page: Page, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = new_operator("support")
    page.goto("/admin/")  # the admin's own pages send a stranger to the sign-in page
    assert unquote(page.url).endswith(f"{LOGIN}?next=/admin/"), page.url
    page.locator("#id_auth-username").fill(agent.email)
    page.locator("#id_auth-password").fill(PASSWORD + "-wrong")
    page.get_by_role("button", name="Next: second factor").click()
    expect(page.locator(".errornote")).to_be_visible()
    expect(page.locator("#id_token-otp_token")).to_have_count(0)  # no code asked: the password was wrong

    page.locator("#id_auth-password").fill(PASSWORD)
    page.get_by_role("button", name="Next: second factor").click()
    right = authenticator_code(agent)
    page.locator("#id_token-otp_token").fill(f"{(int(right) + 1) % 1_000_000:06d}")  # one digit off
    page.get_by_role("button", name="Continue").click()
    expect(page.locator(".errornote")).to_be_visible()
    page.goto("/admin/")
    assert unquote(page.url).endswith(f"{LOGIN}?next=/admin/"), page.url  # the password alone: not in

    admin_login(page, agent)
    expect(page.locator("#user-tools")).to_contain_text(agent.email)

    monkeypatch.setenv(SCREENSHOTS_ENV, str(tmp_path / "docs"))
    shot = screenshot(page, "admin-home")
    assert shot == tmp_path / "docs" / "admin-home.png"
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])  # the IHDR chunk
    assert width == VIEWPORT["width"] and height >= VIEWPORT["height"]  # the whole page, not less


def test_a_request_to_another_host_is_aborted_and_recorded(page: Page, off_host_requests: list[str]) -> None:
    page.goto("/admin/login/")
    page.set_content('<img src="https://assets.example.com/logo.png"><script src="http://203.0.113.9/x.js"></script>')
    assert sorted(off_host_requests) == ["http://203.0.113.9/x.js", "https://assets.example.com/logo.png"]
    off_host_requests.clear()  # caught, as it should be: the test passes; left in, it would fail
