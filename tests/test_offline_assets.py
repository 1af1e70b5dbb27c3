"""The API docs and the admin work on a machine with no internet: every script, stylesheet,
icon and image their pages reference is served by this project (whitenoise), none comes from
another host (a CDN)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from django.test import Client

from accounts.models import User
from conftest import staff_login

_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)""")
_SWAGGER_SCHEMA_URL = re.compile(r"""\burl:\s*"([^"]+)\"""")


class _References(HTMLParser):
    """Collects what a browser would fetch: script src, link href, img/source src and srcset."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in {"script", "img", "source", "iframe", "embed", "audio", "video"} and found.get("src"):
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href"):
            self.urls.append(found["href"] or "")
        for candidate in (found.get("srcset") or "").split(","):
            if candidate.strip():
                self.urls.append(candidate.split()[0])


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc  # relative or /absolute-path: this server


def _assets(client: Client, page: str) -> tuple[str, list[str]]:
    response = client.get(page)
    assert response.status_code == 200, page
    html = response.content.decode()
    parser = _References()
    parser.feed(html)
    return html, [urljoin(page, url) if _is_local(url) else url for url in parser.urls]


def _fetch_all(client: Client, urls: list[str]) -> dict[str, int]:
    """Fetch every asset (and what stylesheets reference in ``url(...)``); status per URL."""
    statuses: dict[str, int] = {}
    pending = list(urls)
    while pending:
        url = pending.pop()
        if url in statuses or url.startswith("data:"):
            continue
        assert _is_local(url), f"{url} is loaded from another host"
        response = client.get(url)
        statuses[url] = response.status_code
        if response.status_code == 200 and url.split("?")[0].endswith(".css"):
            css = b"".join(response.streaming_content if response.streaming else [response.content]).decode()
            pending.extend(urljoin(url, ref) for ref in _CSS_URL.findall(css) if not ref.startswith("data:"))
    return statuses


@pytest.mark.django_db
def test_api_docs_and_every_asset_they_reference_are_served_from_here() -> None:
    client = Client()
    html, urls = _assets(client, "/api/docs/")
    assert any(url.endswith("swagger-ui-bundle.js") for url in urls)
    assert any(url.endswith("swagger-ui.css") for url in urls)
    # The page then loads the schema it documents: also from here.
    schema_urls = _SWAGGER_SCHEMA_URL.findall(html)
    assert schema_urls == ["/api/schema/"]
    statuses = _fetch_all(client, urls + schema_urls)
    assert statuses, "the docs page references no assets"
    assert {url: status for url, status in statuses.items() if status != 200} == {}
    # No validator badge fetched from validator.swagger.io.
    assert '"validatorUrl": null' in html


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/admin/account/login/", "/admin/", "/admin/accounts/billingaccount/"])
def test_admin_pages_load_nothing_from_another_host(page: str) -> None:
    client = Client()
    if page != "/admin/account/login/":
        staff_login(client, User.objects.create_superuser("root@example.test", "correct-horse-battery-staple"))
    _, urls = _assets(client, page)
    statuses = _fetch_all(client, urls)
    assert statuses
    assert {url: status for url, status in statuses.items() if status != 200} == {}
