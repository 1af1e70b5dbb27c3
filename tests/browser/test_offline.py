"""The API docs work with no internet in a real browser: Swagger UI's scripts run, fetch the
schema from here and render it, and nothing is asked of another host (the admin's pages are
held to the same by every browser test: ``new_page`` fails a test whose pages tried)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.harness import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_api_docs_render_the_schema_from_this_server_alone(page: Page) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto("/api/docs/")
    expect(page.locator(".swagger-ui .information-container .title")).to_be_visible()
    expect(page.locator(".swagger-ui .opblock-tag-section").first).to_be_visible()  # the API's operations
    assert any(url.endswith("/api/schema/") for url in requested), requested
    screenshot(page, "api-docs")
