"""What every browser test uses: the staff it signs in as (``new_operator``), the one way it
signs in (``admin_login``), screenshots (``screenshot``), and what a refusal looks like
(``assert_refused``). The fixtures (the worker's Chromium, a fresh ``page`` on the live server
with no way off this machine) are in ``conftest.py`` beside this module."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

from django.utils import timezone
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Page, Response, expect

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount, BillingAccountTransition, User

ROOT = Path(__file__).resolve().parents[2]

# Where screenshots go: .data/screenshots/ (git-ignored) unless BILLING_SCREENSHOTS names a
# directory (relative to the checkout, e.g. docs/screenshots to refresh the README's images).
SCREENSHOTS_ENV = "BILLING_SCREENSHOTS"
DEFAULT_SCREENSHOTS = ROOT / ".data" / "screenshots"

# One size for every page and screenshot, so that the images in docs/ compare across refreshes.
VIEWPORT = {"width": 1280, "height": 900}

# The staff password of the browser tests (test settings hash it with MD5: fast).
PASSWORD = "browser-pw-long-enough"

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def chromium_path() -> str | None:
    """Debian's ``chromium`` (Playwright's own browser download does not work on these
    machines): the one on PATH, else /usr/bin/chromium; None when neither exists."""
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def is_loopback(url: str) -> bool:
    """Whether ``url`` stays on this machine (data: and blob: URLs never leave the page)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return (parts.hostname or "") in LOOPBACK_HOSTS


# Staff sign in here: the password, then the code of their authenticator (django-two-factor-auth).
LOGIN = "/admin/account/login/"


def new_operator(*groups: str, email: str | None = None) -> User:
    """A staff member in ``groups`` who signs in with ``PASSWORD`` and an authenticator app (a
    confirmed TOTP device with a secret of its own): the one place the browser tests create
    staff, ready for ``admin_login``."""
    user = account_services.operator_create(
        email=email or f"{'-'.join(groups) or 'nogroup'}@ops.test", password=PASSWORD, groups=list(groups)
    )
    account_services.operator_second_factor_set(user_id=user.id, totp_key=secrets.token_hex(20))
    return user


def authenticator_code(user: User) -> str:
    """The code ``user``'s authenticator app shows now, zero-padded, as a person would type it.

    A code is accepted once (django-otp remembers the last time step used): when this step's
    code was already used (the same person signed in twice within 30 s), the next step's code,
    which the device accepts as clock drift; beyond that, the wait until the step has passed.
    After a wrong code, the device refuses any code for a while (django-otp's throttling): the
    wait a person would sit out too."""
    device = TOTPDevice.objects.get(user=user, confirmed=True)
    allowed, locked = device.verify_is_allowed()
    if not allowed and locked and locked.get("locked_until"):
        time.sleep(max(0.0, (locked["locked_until"] - timezone.now()).total_seconds()) + 0.1)
    step = int((time.time() - device.t0) // device.step) + device.drift
    ahead = max(0, device.last_t + 1 - step)
    if ahead > device.tolerance:  # more sign-ins within one step than drift allows: wait
        time.sleep(device.step * (ahead - device.tolerance))
        return authenticator_code(user)
    code = totp(device.bin_key, device.step, device.t0, device.digits, device.drift + ahead)
    return f"{code:0{device.digits}d}"


def admin_login(page: Page, user: User, password: str = PASSWORD, *, next_url: str = "/admin/") -> None:
    """Sign ``user`` in to the admin through its sign-in pages, as staff do: email and password,
    then the authenticator's code; lands on ``next_url``. Every browser test signs in through
    here and nowhere else."""
    page.goto(f"{LOGIN}?next={quote(next_url)}")
    page.locator("#id_auth-username").fill(user.email)
    page.locator("#id_auth-password").fill(password)
    page.get_by_role("button", name="Next: second factor").click()
    code = page.locator("#id_token-otp_token")
    expect(code).to_be_visible()  # the password was right: the second step asks for the code
    code.fill(authenticator_code(user))
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("#login-form")).to_have_count(0)  # no error: the form is gone
    assert urlsplit(page.url).path == urlsplit(next_url).path, page.url


def screenshot(page: Page, name: str) -> Path:
    """The whole page (not just the viewport) as ``<name>.png`` in the screenshot directory
    (``BILLING_SCREENSHOTS``, else .data/screenshots/); the file's path."""
    directory = Path(os.environ.get(SCREENSHOTS_ENV) or DEFAULT_SCREENSHOTS)
    if not directory.is_absolute():
        directory = ROOT / directory
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_refused(page: Page, response: Response | None, *, needs: Iterable[str]) -> None:
    """The server refused the signed-in staff member the page or action ``response`` answered
    (a 403), and the refusal page ``page`` shows says why: exactly the operator groups ``needs``
    hold what was refused (none: only an administrator may)."""
    assert response is not None, "no response: the page was not loaded"
    assert response.status == 403, f"{response.url} answered {response.status}, not a refusal (403)"
    refusal = page.locator("#content-main.refusal")
    expect(refusal).to_contain_text("not allowed")
    named = sorted(set(refusal.locator(".needed-group").all_inner_texts()))
    assert named == sorted(set(needs)), f"the refusal of {response.url} names {named}, not {sorted(set(needs))}"
    if not named:
        expect(refusal).to_contain_text("held by no operator group")


def assert_suspended(account: BillingAccount, *, by: User, reason: str) -> None:
    """What a suspension through the pages left in the database: ``account`` suspended, and its
    one ``suspend`` transition from active, by the operator ``by``, with ``reason``."""
    account.refresh_from_db()
    assert account.state == AccountState.SUSPENDED
    done = BillingAccountTransition.objects.get(account=account, transition="suspend")
    assert (done.from_state, done.to_state, done.actor_user_id, done.reason) == (
        AccountState.ACTIVE,
        AccountState.SUSPENDED,
        by.id,
        reason,
    )
