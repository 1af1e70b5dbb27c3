"""Staff access to the back office, in one place: the gate that keeps every page under /admin/
behind the second factor, the exception a view raises when the operator lacks a permission, and
the refusal page that says which operator group has it.

- ``SecondFactorMiddleware`` (after django-otp's ``OTPMiddleware``): any request under the admin's
  prefix from a session that has not passed the second factor is sent to the sign-in page (or,
  for a signed-in operator with no device yet, to enrolment), whatever the view, so a page added
  later cannot escape it. Only the sign-in, enrolment and QR-code pages and the logout are open.
- ``require_permission(request, "app.codename")`` raises ``PermissionRequired`` (a
  ``PermissionDenied``) naming the permission; ``permission_denied`` (the project's
  ``handler403``) answers it with a 403 page in the admin's look that names the groups granting
  it. Django's own refusals of an admin page (no view/change/add/delete permission) get the same
  page: the permission is read from the URL's name.
- ``ActionPermissionsMixin``: a ModelAdmin's bulk action posted by someone without its permission
  is refused with that page (Django's default silently drops it and says "No action selected").

The groups are read from the database (``auth.Group``, kept equal to ``accounts.services.
OPERATOR_GROUPS`` by ``operator_groups_sync`` after every migrate): this module imports no app.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django_otp import user_has_device


class PermissionRequired(PermissionDenied):
    """Refused: the operator lacks ``permissions`` (``"app_label.codename"``) for ``action``."""

    def __init__(self, *permissions: str, action: str = "") -> None:
        self.permissions = tuple(permissions)
        self.action = action
        super().__init__(f"{action or 'This'} needs {', '.join(permissions)}.")


def require_permission(request: HttpRequest, *permissions: str, action: str = "") -> None:
    """Raise ``PermissionRequired`` unless the request's user has every one of ``permissions``."""
    missing = [p for p in permissions if not request.user.has_perm(p)]
    if missing:
        raise PermissionRequired(*missing, action=action)


def groups_granting(permission: str) -> list[str]:
    """The operator groups that hold ``permission`` ("app_label.codename"), by name."""
    app_label, _, codename = permission.partition(".")
    return sorted(
        Group.objects.filter(
            permissions__content_type__app_label=app_label, permissions__codename=codename
        ).values_list("name", flat=True)
    )


# --- The second factor's gate


@cache
def _admin_prefix() -> str:
    return reverse("admin:index")


@cache
def _open_paths() -> frozenset[str]:
    """What a session without the second factor may still reach under the admin's prefix."""
    return frozenset(
        reverse(name) for name in ("two_factor:login", "two_factor:setup", "two_factor:qr", "admin:logout")
    )


def second_factor_refusal(request: HttpRequest) -> HttpResponse | None:
    """None if ``request`` may go on; else where it is sent: the sign-in page (with ``next``), or
    enrolment for an operator signed in with a password who has no device yet."""
    path = request.path_info
    if not path.startswith(_admin_prefix()) or path in _open_paths():
        return None
    user = request.user
    if user.is_authenticated and user.is_verified():  # type: ignore[attr-defined]  # OTPMiddleware adds it
        return None
    query = urlencode({"next": request.get_full_path()})
    if user.is_authenticated and user.is_staff and not user_has_device(user, confirmed=True):
        return HttpResponseRedirect(f"{reverse('two_factor:setup')}?{query}")
    return HttpResponseRedirect(f"{reverse('two_factor:login')}?{query}")


class SecondFactorMiddleware:
    """No page or action under /admin/ without the second factor (see the module's docstring).
    After ``django_otp.middleware.OTPMiddleware`` in ``MIDDLEWARE``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return second_factor_refusal(request) or self.get_response(request)


# --- The refusal page

# An admin page's URL name: "<app>_<model>_<view>".
_ADMIN_URL = re.compile(r"^(?P<app>[a-z0-9_]+?)_(?P<model>[a-z0-9]+)_(?P<view>changelist|add|change|delete|history)$")


def _stock_admin_permissions(request: HttpRequest) -> tuple[str, ...]:
    """What a stock admin page refused for: the model's permission its view asks for."""
    match = request.resolver_match
    named = _ADMIN_URL.match(match.url_name or "") if match is not None and match.namespace == "admin" else None
    if named is None:
        return ()
    view = named["view"]
    verb = {"add": "add", "delete": "delete"}.get(view) or ("change" if request.method == "POST" else "view")
    return (f"{named['app']}.{verb}_{named['model']}",)


def _described(permissions: Iterable[str]) -> list[dict[str, Any]]:
    from django.contrib.auth.models import Permission

    described = []
    for permission in permissions:
        app_label, _, codename = permission.partition(".")
        row = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
        described.append(
            {"codename": permission, "name": row.name if row else permission, "groups": groups_granting(permission)}
        )
    return described


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """The project's ``handler403``: under /api/, the API's problem+json; elsewhere a page in the
    admin's look saying what was refused and which operator group(s) may do it."""
    from billing_site.common.errors import fallback_problem, is_api_request

    if is_api_request(request):
        return fallback_problem(403)
    permissions = getattr(exception, "permissions", ()) or _stock_admin_permissions(request)
    reason = str(exception) if exception is not None and not getattr(exception, "permissions", ()) else ""
    if permissions and all(request.user.has_perm(p) for p in permissions):
        # Refused to someone who holds the permission (a superuser deleting a ledger entry): the
        # page is closed to everyone; what it would do happens another way, or not at all.
        permissions = ()
        reason = reason or "Nobody does this here: these records are kept, or changed only through their actions."
    needed = _described(permissions)
    groups = sorted({group for item in needed for group in item["groups"]})
    context = {
        **admin.site.each_context(request),
        "title": "Not allowed",
        "action": getattr(exception, "action", ""),
        "reason": reason,
        "needed": needed,
        "groups": groups,
        "your_groups": sorted(request.user.groups.values_list("name", flat=True))
        if request.user.is_authenticated
        else [],
    }
    return render(request, "admin/refused.html", context, status=403)


class ActionPermissionsMixin:
    """For a ModelAdmin with bulk actions: ``action_permissions`` maps an action's name to the
    permission it needs; posting it without that permission gets the refusal page (403)."""

    action_permissions: dict[str, str] = {}

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        if request.method == "POST" and "action" in request.POST:
            name = request.POST["action"]
            if name in self.action_permissions:
                require_permission(request, self.action_permissions[name], action=f"The action “{name}”")
        return super().changelist_view(request, extra_context)  # type: ignore[misc]
