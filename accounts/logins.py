"""Staff sign-in to the admin, as django-axes sees it (settings ``AXES_*``): the login name it
counts failures under, and how a client is named in its log lines (the staff email masked as
customers' are, ``billing_site.common.logs.mask_email``)."""

from __future__ import annotations

from typing import Any

from axes.helpers import get_cool_off  # type: ignore[import-untyped]  # no stubs
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from billing_site.common.logs import mask_email


def username(request: HttpRequest, credentials: dict[str, Any] | None) -> str:
    """The email as the user model stores it (lower case, trimmed): ``Ops@X`` and ``ops@x`` are
    one login, and so one count of failures."""
    posted = (
        (credentials or {}).get("username")
        or request.POST.get("auth-username")  # the sign-in page's password step (django-two-factor-auth)
        or request.POST.get("username", "")
    )
    return str(posted).strip().lower()


def client_str(username: str, ip_address: str, user_agent: str, path_info: str, request: HttpRequest) -> str:
    """``{username: "s***@ops.test", ip_address: "10.0.0.1", path_info: "/admin/login/"}``: who
    failed, for axes' log lines, never a full email address."""
    if isinstance(path_info, tuple | list):
        path_info = path_info[0]
    return f'{{username: "{mask_email(username)}", ip_address: "{ip_address}", path_info: "{path_info}"}}'


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict[str, Any] | None = None
) -> HttpResponse:
    """What a locked-out sign-in gets, the right password included: a 429 page that says so,
    for how long, and who can unlock it."""
    cool_off = get_cool_off(request)
    context = {
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "cooloff_minutes": round(cool_off.total_seconds() / 60) if cool_off else None,
        "site_header": "Billing back office",
    }
    return render(request, "admin/login_locked_out.html", context, status=429)
