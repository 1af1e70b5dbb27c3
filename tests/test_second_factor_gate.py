"""No admin page or action without the second factor (issue 21, Access): every URL pattern under
/admin/, whoever registered it (the admin site, the apps' get_urls, the back office's pages,
django-two-factor-auth's), walked from the resolver with its path parameters filled with real
objects: refused to a session that signed in with a password only, and to no session at all;
reachable, or refused by a permission, once the second factor is passed."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.converters import IntConverter, PathConverter, StringConverter

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount, User
from conftest import Customer, staff_login
from payments.tests.helpers import NOW, issue_invoice
from tests.pages import form_of

pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]

LOGIN = "/admin/account/login/"
SETUP = "/admin/account/two_factor/setup/"
# Open without the second factor: signing in, enrolling (and its QR code), signing out.
OPEN = {LOGIN, SETUP, "/admin/account/two_factor/qrcode/", "/admin/logout/"}


def admin_patterns() -> Iterator[tuple[str, URLPattern, dict[str, Any]]]:
    """(route, pattern, converters) of every URL pattern under admin/, includes followed."""

    def walk(patterns: list[Any], prefix: str, converters: dict[str, Any]) -> Iterator[Any]:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            found = {**converters, **getattr(pattern.pattern, "converters", {})}
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, route, found)
            else:
                yield route, pattern, found

    for route, pattern, converters in walk(get_resolver().url_patterns, "", {}):
        if route.startswith("admin/") or route.startswith("^admin/"):
            yield route, pattern, converters


def first_pk(app_label: str, model_name: str) -> Any:
    try:
        model = apps.get_model(app_label, model_name)
    except LookupError:
        return None
    return model._default_manager.order_by("pk").values_list("pk", flat=True).first()


# Values for parameters that are not object ids.
NAMED = {"name": "suspend", "action": "approve", "app_label": "accounts", "url": "nowhere/"}


def fill(route: str, converters: dict[str, Any]) -> str:
    """A concrete path for ``route``: ids of real objects of the route's model, the rest from NAMED."""
    model = re.match(r"\^?admin/(?P<app>[a-z_]+)/(?P<model>[a-z_]+)/", route)

    def value(name: str, converter: Any) -> str:
        if name in NAMED:
            return NAMED[name]
        if name == "content_type_id":
            return str(ContentType.objects.get_for_model(BillingAccount).pk)
        pk = None
        if name == "note_id":
            pk = first_pk("invoicing", "creditnote")
        elif name == "object_id" and route.startswith("admin/r/"):
            pk = BillingAccount.objects.order_by("pk").values_list("pk", flat=True).first()
        elif model:
            pk = first_pk(model["app"], model["model"])
        if pk is None:
            pk = BillingAccount.objects.order_by("pk").values_list("pk", flat=True).first()
        if converter is not None and not isinstance(converter, IntConverter | StringConverter | PathConverter):
            return str(converter.to_url(pk))  # a public id converter (acc_…)
        return str(pk)

    def substitute(match: re.Match[str]) -> str:
        name = match["name"]
        return value(name, converters.get(name))

    path = re.sub(r"<(?:[a-z_]+:)?(?P<name>[a-z_]+)>", substitute, route)
    path = re.sub(r"\(\?P<(?P<name>[a-z_]+)>[^)]*\)", substitute, path)
    path = path.replace("^", "").replace("$", "").replace("\\", "")
    return "/" + path


@pytest.fixture
def paths(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> list[str]:
    """Every admin path, with real rows behind its ids (an account, a key, an invoice...)."""
    for email, superuser in (("root@ops.test", True), ("none@ops.test", False)):  # and their devices
        staff = account_services.operator_create(email=email, password="pw-long-enough", groups=[], superuser=superuser)
        staff_login(Client(), staff)
    account = make_account(customer.user, currency="EUR", country="NL", state=AccountState.ACTIVE)
    account_services.api_key_create(user_id=customer.user.id, name="walk")
    issue_invoice(account)
    walked = sorted({fill(route, converters) for route, _, converters in admin_patterns()})
    assert len(walked) > 100 and "/admin/" in walked  # the walk found the admin, not an empty list
    return walked


def password_only(email: str = "walker@ops.test") -> Client:
    """A staff superuser with no device yet, signed in through the real page with the password
    only: logged in, not verified."""
    account_services.operator_create(email=email, password="pw-long-enough", groups=[], superuser=True)
    client = Client()
    page = client.get(LOGIN)
    response = client.post(
        LOGIN, {**form_of(page.content).fields, "auth-username": email, "auth-password": "pw-long-enough"}
    )
    assert response.status_code == 302 and "_auth_user_id" in client.session
    return client


def refused_to_second_factor(response: Any) -> bool:
    return response.status_code == 302 and response["Location"].split("?")[0] in (LOGIN, SETUP)


def test_every_admin_url_is_refused_without_the_second_factor(paths: list[str]) -> None:
    for who, client in (("password only", password_only()), ("nobody", Client())):
        for path in paths:
            if path in OPEN:
                continue
            for method in ("get", "post"):
                response = getattr(client, method)(path)
                assert refused_to_second_factor(response), (who, method, path, response.status_code)
    # The admin's own sign-in form is one of them: a password posted there signs nobody in.
    nobody = Client()
    posted = nobody.post("/admin/login/", {"username": "walker@ops.test", "password": "pw-long-enough"})
    assert refused_to_second_factor(posted) and "_auth_user_id" not in nobody.session


def test_every_admin_url_is_reachable_or_refused_by_a_permission_with_the_second_factor(paths: list[str]) -> None:
    root, nobody = User.objects.get(email="root@ops.test"), User.objects.get(email="none@ops.test")
    for who, client in (("superuser", staff_login(Client(), root)), ("no group", staff_login(Client(), nobody))):
        # The admin's own sign-in page always sends to the one with the second factor (two_factor
        # patches AdminSite.login), verified or not.
        assert client.get("/admin/login/")["Location"] == f"{LOGIN}?next=/admin/"
        for path in paths:
            if path in ("/admin/logout/", "/admin/login/"):
                continue
            response = client.get(path)
            assert not refused_to_second_factor(response), (who, path)
            assert response.status_code in (200, 302, 403, 404, 405), (who, path, response.status_code)
            if response.status_code == 403:
                assert b"Not allowed" in response.content, (who, path)  # the refusal page, not a bare 403
                if who == "superuser":  # closed to everyone (deleting records that are kept), not a group
                    assert b"needed-group" not in response.content, path


def test_a_new_operator_is_sent_to_enrol_before_any_page() -> None:
    client = password_only("new@ops.test")
    response = client.get("/admin/accounts/billingaccount/")
    assert response.status_code == 302
    assert response["Location"] == f"{SETUP}?next=%2Fadmin%2Faccounts%2Fbillingaccount%2F"
    assert client.get(SETUP).status_code == 200
    assert User.objects.get(email="new@ops.test").is_staff
