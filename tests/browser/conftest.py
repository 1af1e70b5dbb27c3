"""The browser tests' fixtures: the worker's one headless Chromium (Debian's, driven by
Playwright's sync API) and ``page``, a fresh browser context on the live Django server
(pytest-django's ``live_server``: the real app in a thread of this process, on the test
database) that may not leave this machine.

One Chromium per worker process, kept from one browser test to the next and stopped before
any other test runs on the worker. Playwright's sync API runs its asyncio loop in this
thread, where it stays "running" between calls for as long as Playwright is started: an
``asyncio.run`` would then be refused, and Django would take the test's own ORM calls for
calls from async code. So the browser is never left running under another test, and while it
runs Django's async-safety check is off (``DJANGO_ALLOW_ASYNC_UNSAFE``: the loop it would see is
Playwright's, not ours).

Every request a page makes to a host other than this machine is aborted and fails the test:
the admin works offline (no CDN), proven by a real browser."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route, expect, sync_playwright

from tests.browser.harness import DEFAULT_SCREENSHOTS, VIEWPORT, chromium_path, is_loopback

ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"

# How long a page action or an ``expect`` waits for the page: patience, not a measure. Two shared
# cores with another suite beside this one took longer than Playwright's 5 s for ``expect``.
PATIENCE_MS = 30_000
expect.set_options(timeout=PATIENCE_MS)


class _WorkerChromium:
    """The worker process's one Chromium, started on first use."""

    def __init__(self) -> None:
        self.playwright: Playwright | None = None
        self.browser: Browser | None = None
        self.saved_env: tuple[str | None] | None = None  # DJANGO_ALLOW_ASYNC_UNSAFE before we set it

    def get(self) -> Browser:
        if self.browser is not None and self.browser.is_connected():
            return self.browser
        self.stop()  # a browser that crashed is started afresh
        executable = chromium_path()
        if executable is None:
            pytest.skip("needs Chromium: no chromium on PATH nor /usr/bin/chromium (Debian: apt-get install chromium)")
        self.saved_env = (os.environ.get(ASYNC_UNSAFE),)
        os.environ[ASYNC_UNSAFE] = "true"
        try:
            self.playwright = sync_playwright().start()
            self.browser = self.playwright.chromium.launch(executable_path=executable, headless=True)
        except BaseException:
            self.stop()
            raise
        return self.browser

    def stop(self) -> None:
        try:
            if self.browser is not None and self.browser.is_connected():
                self.browser.close()
        finally:
            try:
                if self.playwright is not None:
                    self.playwright.stop()
            finally:
                self.browser = self.playwright = None
                if self.saved_env is not None:
                    (before,) = self.saved_env
                    if before is None:
                        os.environ.pop(ASYNC_UNSAFE, None)
                    else:
                        os.environ[ASYNC_UNSAFE] = before
                    self.saved_env = None


_chromium = _WorkerChromium()
_call_failed = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the test's own fixtures are torn down (their database flush with the browser still
    up): the browser stays only if the next test on this worker uses it too."""
    if nextitem is None or "browser" not in getattr(nextitem, "fixturenames", ()):
        _chromium.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _chromium.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_call_failed] = True
    return report


@pytest.fixture
def browser() -> Browser:
    """The worker's headless Chromium (skipped, saying why, only when none is installed)."""
    return _chromium.get()


@pytest.fixture
def off_host_requests() -> list[str]:
    """The URLs of other hosts the test's pages tried to load (each aborted)."""
    return []


@pytest.fixture
def new_page(
    request: pytest.FixtureRequest, browser: Browser, live_server: Any, off_host_requests: list[str]
) -> Iterator[Callable[[], Page]]:
    """Opens a new browser window of its own (its own cookies: another member of staff) at the
    live server's address (``page.goto("/admin/")``), 1280 by 900, every request off this machine
    aborted and the test failed for it. When the test fails, each window leaves a screenshot of
    where it was in .data/screenshots/failed/ (never in docs/)."""
    marker = request.node.get_closest_marker("django_db")
    assert marker is not None and marker.kwargs.get("transaction"), (
        "browser tests commit (the live server reads what they write): mark them django_db(transaction=True)"
    )
    contexts: list[BrowserContext] = []

    def guard(route: Route) -> None:
        if is_loopback(route.request.url):
            route.continue_()
        else:
            off_host_requests.append(route.request.url)
            route.abort("blockedbyclient")

    def open_window() -> Page:
        context = browser.new_context(base_url=live_server.url, viewport=VIEWPORT, locale="en-GB", timezone_id="UTC")
        contexts.append(context)
        context.set_default_timeout(PATIENCE_MS)
        context.route("**/*", guard)
        return context.new_page()

    try:
        yield open_window
        if request.node.stash.get(_call_failed, False):
            failed = DEFAULT_SCREENSHOTS / "failed"
            failed.mkdir(parents=True, exist_ok=True)
            for number, context in enumerate(contexts, start=1):
                for opened in context.pages:
                    opened.screenshot(path=str(failed / f"{request.node.name}-{number}.png"), full_page=True)
    finally:
        for context in contexts:
            context.close()
    assert not off_host_requests, f"pages asked another host (a CDN?) for: {off_host_requests}"


@pytest.fixture
def page(new_page: Callable[[], Page]) -> Page:
    """A new browser window on the live server (see ``new_page``): the test's member of staff."""
    return new_page()
