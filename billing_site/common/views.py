"""Behaviour every API view shares."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.exceptions import ErrorDetail
from rest_framework.request import Request


class StrictQueryMixin:
    """Unknown query parameters are a 400 naming them, not silently ignored (a typo such as
    ``?pagesize=`` should not quietly return the default page); so is one given twice."""

    allowed_query_params: tuple[str, ...] = ()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        if getattr(self, (request.method or "").lower(), None) is None:
            return  # not an allowed method: let DRF answer 405
        allowed = set(self.allowed_query_params)
        paginator = getattr(self, "paginator", None)
        if paginator is not None and request.method == "GET":
            allowed |= {paginator.cursor_query_param, paginator.page_size_query_param}
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise exceptions.ValidationError({name: ["Unknown query parameter."] for name in unknown})
        # ?page_size=10&page_size=500: which one counts would be a guess (Django takes the last).
        repeated = sorted(name for name, values in request.query_params.lists() if len(values) > 1)
        if repeated:
            raise exceptions.ValidationError(
                {name: [ErrorDetail("Given more than once.", code="repeated")] for name in repeated}
            )


def client_ip(request: Request) -> str | None:
    """The client's IP address as the throttles see it: the socket's peer, or the address the
    last of ``NUM_PROXIES`` trusted proxies put in ``X-Forwarded-For`` (never a client's own)."""
    from rest_framework.throttling import BaseThrottle

    return BaseThrottle().get_ident(request) or None
