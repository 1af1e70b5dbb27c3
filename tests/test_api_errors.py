"""Every error under ``/api/`` is ``application/problem+json`` (RFC 9457, the shape in
``billing_site/common/errors.py``), whether DRF, Django's URL resolver, a middleware or a bug
produced it, and with ``DEBUG`` on (``make demo``) as well as off: Django's debug 404 and 500
pages would otherwise answer HTML."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import include, path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import BillingAccount
from billing_site.common.errors import PROBLEM_CONTENT_TYPE
from conftest import Customer


def _explode(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("a bug")


class _ExplodingApiView(APIView):
    authentication_classes = ()
    permission_classes = ()
    schema = None  # not part of the API's schema

    def get(self, request: Request) -> Response:
        raise RuntimeError("a bug")


# A URLconf with views that fail, to see what a bug under /api/ answers.
urlpatterns = [
    path("api/v1/explode", _explode),
    path("api/v1/explode-drf", _ExplodingApiView.as_view()),
    path("", include("billing_site.urls")),
]


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = json.loads(response.content)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:billing:error:{code}"
    assert body["title"] and isinstance(body["detail"], str)
    return body


both_debug_modes = pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])


@both_debug_modes
@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/billing-accounts/notanid",  # malformed id: the converter does not match
        "/api/v1/billing-accounts/acc_0000000000000",  # well-formed, out of range
        "/api/v1/billing-accounts/",  # a trailing slash the API does not use
        "/api/v1/users/",
        "/api/v1/billing-accounts/{account}/",
        "/api/v1/billing-accounts/{account}/invoices/",
        "/api/v1/billing-accounts/{account}/invoices/inv_nope",
        "/api/v1/no-such-route",  # unknown routes
        "/api/v2/billing-accounts",
        "/api/",
        "/api/v1",
    ],
)
def test_unmatched_urls_are_problem_404s(
    url: str, debug: bool, customer: Customer, account: BillingAccount, settings: Any
) -> None:
    settings.DEBUG = debug
    url = url.format(account=account.public_id)
    assert_problem(customer.client.get(url), 404, "not_found")
    assert_problem(customer.client.post(url, {}, format="json"), 404, "not_found")


@both_debug_modes
def test_a_missing_slash_on_the_docs_redirects_and_an_extra_one_is_a_problem_404(
    debug: bool, db: None, settings: Any
) -> None:
    settings.DEBUG = debug
    client = Client()
    redirect = client.get("/api/docs")
    assert redirect.status_code == 301
    assert redirect["Location"] == "/api/docs/"
    assert_problem(client.get("/api/docs//"), 404, "not_found")


@both_debug_modes
def test_someone_elses_account_is_a_problem_404(
    debug: bool, customer: Customer, make_customer: Any, make_account: Any, settings: Any
) -> None:
    settings.DEBUG = debug
    theirs = make_account(make_customer().user)
    assert_problem(customer.client.get(f"/api/v1/billing-accounts/{theirs.public_id}"), 404, "not_found")


@both_debug_modes
@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("delete", "/api/v1/users", {"POST", "OPTIONS"}),
        ("put", "/api/v1/billing-accounts", {"GET", "POST", "HEAD", "OPTIONS"}),
        ("post", "/api/v1/billing-accounts/{account}/history", {"GET", "HEAD", "OPTIONS"}),
        ("post", "/api/schema/", {"GET", "HEAD", "OPTIONS"}),
        ("delete", "/api/docs/", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_a_wrong_method_is_a_problem_405_with_allow(
    method: str, url: str, allowed: set[str], debug: bool, customer: Customer, account: BillingAccount, settings: Any
) -> None:
    settings.DEBUG = debug
    response = getattr(customer.client, method)(url.format(account=account.public_id))
    assert_problem(response, 405, "method_not_allowed")
    assert {m.strip() for m in response["Allow"].split(",")} == allowed


@both_debug_modes
def test_no_key_is_a_problem_401(debug: bool, db: None, settings: Any) -> None:
    settings.DEBUG = debug
    response = Client().get("/api/v1/billing-accounts")
    assert_problem(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"]


@both_debug_modes
def test_a_host_not_allowed_is_a_problem_400(debug: bool, db: None, settings: Any) -> None:
    settings.DEBUG = debug
    assert_problem(Client().get("/api/v1/billing-accounts", HTTP_HOST="evil.example"), 400, "bad_request")


@both_debug_modes
@pytest.mark.parametrize("url", ["/api/v1/explode", "/api/v1/explode-drf"])
def test_a_bug_is_a_problem_500_that_says_nothing_of_it(url: str, debug: bool, db: None, settings: Any) -> None:
    # Both through the settings fixture: mixed with override_settings, its undo would restore
    # this URLconf for the rest of the session.
    settings.ROOT_URLCONF = __name__
    settings.DEBUG = debug
    response = Client(raise_request_exception=False).get(url)
    body = assert_problem(response, 500, "internal_error")
    assert "a bug" not in body["detail"]


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_pages_outside_the_api_keep_their_html_errors(debug: bool, db: None, settings: Any) -> None:
    settings.DEBUG = debug
    response = Client().get("/no-such-page")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@both_debug_modes
def test_a_replaced_error_keeps_the_security_headers(debug: bool, customer: Customer, settings: Any) -> None:
    settings.DEBUG = debug
    response = customer.client.get("/api/v1/no-such-route")
    assert_problem(response, 404, "not_found")
    # Set by SecurityMiddleware and XFrameOptionsMiddleware on the response the problem replaced.
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"]
