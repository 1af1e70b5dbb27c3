"""What every browser test uses: the staff it signs in as (``new_operator``), the one way it
signs in (``admin_login``), screenshots (``screenshot``), and what a refusal looks like
(``assert_refused``). The fixtures (the worker's Chromium, a fresh ``page`` on the live server
with no way off this machine) are in ``conftest.py`` beside this module."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

from playwright.sync_api import Page, Response, expect

from accounts import services as account_services
from accounts.models import User

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


def new_operator(*groups: str, email: str | None = None) -> User:
    """A staff member in ``groups`` who signs in with ``PASSWORD`` (the one place the browser
    tests create staff: what a sign-in needs besides the password is set up here)."""
    return account_services.operator_create(
        email=email or f"{'-'.join(groups) or 'nogroup'}@ops.test", password=PASSWORD, groups=list(groups)
    )


def admin_login(page: Page, user: User, password: str = PASSWORD, *, next_url: str = "/admin/") -> None:
    """Sign ``user`` in to the admin through its login form, as staff do, and land on
    ``next_url``. Every browser test signs in through here and nowhere else."""
    page.goto(f"/admin/login/?next={quote(next_url)}")
    page.locator("#id_username").fill(user.email)
    page.locator("#id_password").fill(password)
    page.locator("#login-form [type=submit]").click()
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


def assert_refused(response: Response | None) -> None:
    """The server refused the signed-in staff member the page or action ``response`` answered:
    a 403 (the admin's refusal, whatever the page then says about it)."""
    assert response is not None, "no response: the page was not loaded"
    assert response.status == 403, f"{response.url} answered {response.status}, not a refusal (403)"
