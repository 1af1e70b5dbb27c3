"""One error shape for the whole API: RFC 9457 ``application/problem+json``.

    {"type": "urn:billing:error:invalid", "title": "Invalid request", "status": 400,
     "detail": "...", "code": "invalid",
     "errors": [{"field": "address.city", "code": "required", "message": "..."}]}

``code`` is stable and machine-readable; ``errors`` names each bad field (dotted path for
nested objects, index for lists). Services raise ``ApplicationError``; views never build
error responses by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponseBase, JsonResponse
from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApplicationError(Exception):
    """A business-rule failure with a stable code, mapped to a 4xx by the API."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 400,
        field: str | None = None,
        errors: list[dict[str, str]] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 the client should retry)
        self.code = code
        self.message = message
        self.status = status
        self.errors = errors or ([{"field": field, "code": code, "message": message}] if field else [])


class NotFound(ApplicationError):
    def __init__(self, message: str = "Not found.") -> None:
        super().__init__("not_found", message, status=404)


class Forbidden(ApplicationError):
    def __init__(self, message: str = "You do not have permission to perform this action.") -> None:
        super().__init__("permission_denied", message, status=403)


class Conflict(ApplicationError):
    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(code, message, status=409, field=field)


def problem(status: int, code: str, detail: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:billing:error:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    return body


def flatten_validation_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """DRF's nested ``{field: [ErrorDetail]}`` → a flat list naming each field by path."""
    out: list[dict[str, str]] = []
    if isinstance(detail, Mapping):
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else (f"{prefix}.{key}" if prefix else str(key))
            out.extend(flatten_validation_errors(value, name))
    elif isinstance(detail, Iterable) and not isinstance(detail, str):
        items = list(detail)
        if items and all(isinstance(i, str) for i in items):
            for item in items:
                out.append(
                    {"field": prefix, "code": getattr(item, "code", "invalid") or "invalid", "message": str(item)}
                )
        else:
            for index, item in enumerate(items):
                if item:
                    out.extend(flatten_validation_errors(item, f"{prefix}.{index}" if prefix else str(index)))
    else:
        out.append({"field": prefix, "code": getattr(detail, "code", "invalid") or "invalid", "message": str(detail)})
    return out


_DRF_CODES: list[tuple[type[exceptions.APIException], str]] = [
    (exceptions.NotAuthenticated, "not_authenticated"),
    (exceptions.AuthenticationFailed, "authentication_failed"),
    (exceptions.PermissionDenied, "permission_denied"),
    (exceptions.NotFound, "not_found"),
    (exceptions.MethodNotAllowed, "method_not_allowed"),
    (exceptions.NotAcceptable, "not_acceptable"),
    (exceptions.UnsupportedMediaType, "unsupported_media_type"),
    (exceptions.Throttled, "throttled"),
    (exceptions.ParseError, "malformed_request"),
]


class ProblemResponse(Response):
    """A problem rendered as JSON whatever renderer the view negotiated: the schema view's
    YAML or the docs' HTML renderer would otherwise write a problem+json header over a body
    that is not JSON."""

    @property
    def rendered_content(self) -> Any:
        self.accepted_renderer = JSONRenderer()
        self.accepted_media_type = PROBLEM_CONTENT_TYPE
        return super().rendered_content


def api_exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    headers: dict[str, str] = {}
    if isinstance(exc, ApplicationError):
        body = problem(exc.status, exc.code, exc.message, exc.errors)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return ProblemResponse(body, status=exc.status, headers=headers, content_type=PROBLEM_CONTENT_TYPE)
    if isinstance(exc, RequestDataTooBig):  # Django's DATA_UPLOAD_MAX_MEMORY_SIZE (a 400 by default)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = problem(413, "payload_too_large", f"The request body is larger than {limit} bytes.")
        return ProblemResponse(body, status=413, content_type=PROBLEM_CONTENT_TYPE)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None  # a bug: Django's 500 handler answers (see server_error below)
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
    wait = getattr(exc, "wait", None)
    if isinstance(exc, exceptions.Throttled) and wait is not None:
        headers["Retry-After"] = str(int(wait))
    status = exc.status_code
    if isinstance(exc, exceptions.ValidationError):
        errors = flatten_validation_errors(exc.detail)
        fields = sorted({e["field"] for e in errors if e["field"]})
        detail = "Invalid input" + (f": {', '.join(fields)}." if fields else ".")
        if len(errors) == 1 and not errors[0]["field"]:
            detail = errors[0]["message"]
        body = problem(status, "invalid", detail, errors)
    else:
        code = next((c for cls, c in _DRF_CODES if isinstance(exc, cls)), "error")
        body = problem(status, code, str(exc.detail))
    return ProblemResponse(body, status=status, headers=headers, content_type=PROBLEM_CONTENT_TYPE)


def _json_problem(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse(problem(status, code, detail), status=status, content_type=PROBLEM_CONTENT_TYPE)


def is_api_request(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


# What an error that did not come from our exception handler says: by status.
_FALLBACK: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Bad request."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    413: ("payload_too_large", "Request body too large."),
    500: ("internal_error", "Internal server error. It has been logged."),
}
# Headers of the original response that describe its old body: everything else (Allow,
# WWW-Authenticate, Retry-After, and the security headers the inner middleware set) is kept.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "content-language", "etag"})


def fallback_problem(status: int) -> JsonResponse:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        status, phrase = 500, HTTPStatus(500).phrase
    code, detail = _FALLBACK.get(status, (phrase.lower().replace(" ", "_").replace("-", "_"), f"{phrase}."))
    return _json_problem(status, code, detail)


class ProblemJsonMiddleware:
    """The last word on errors under ``/api/``: any 4xx/5xx that is not already problem+json
    (Django's debug 404 and 500 pages, which bypass ``handler404``/``handler500`` when
    ``DEBUG`` is on; the 400 of a disallowed host; a view that answers HTML) is replaced by
    the problem of its status. First in ``MIDDLEWARE``, so it sees every other layer's answer.
    Pages outside ``/api/`` (the admin) keep Django's HTML errors."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if response.status_code < 400 or not is_api_request(request):
            return response
        if response.get("Content-Type", "").split(";")[0].strip() == PROBLEM_CONTENT_TYPE:
            return response
        replacement = fallback_problem(response.status_code)
        for header, value in response.items():
            if header.lower() not in _BODY_HEADERS:
                replacement[header] = value
        replacement.cookies = response.cookies
        response.close()
        return replacement


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> Any:
    if is_api_request(request):
        return fallback_problem(404)
    from django.views.defaults import page_not_found as default

    return default(request, exception)


def server_error(request: HttpRequest) -> Any:
    if is_api_request(request):
        return fallback_problem(500)
    from django.views.defaults import server_error as default

    return default(request)


# --- OpenAPI: the documented error responses.


class ProblemFieldErrorSerializer(serializers.Serializer):
    field = serializers.CharField(help_text="Dotted path of the offending field, e.g. `address.city`.")
    code = serializers.CharField()
    message = serializers.CharField()


# A declared field named ``errors`` would shadow ``Serializer.errors``: build it inline.
ProblemSerializer = inline_serializer(
    name="Problem",
    fields={
        "type": serializers.CharField(),
        "title": serializers.CharField(),
        "status": serializers.IntegerField(),
        "detail": serializers.CharField(),
        "code": serializers.CharField(help_text="Stable machine-readable error code."),
        "errors": ProblemFieldErrorSerializer(many=True, required=False),
    },
)


_DESCRIPTIONS = {
    400: "Invalid input (`code`: `invalid`, `malformed_request`, …); `errors` names each field.",
    401: "Missing, malformed, unknown or revoked API key.",
    403: "Authenticated, but the caller's role or scopes do not allow this.",
    404: "No such resource, or not one of the caller's.",
    405: "Method not allowed.",
    406: "Not acceptable.",
    409: "Conflicts with the resource's current state.",
    413: "Request body too large.",
    415: "Unsupported media type: send application/json.",
    402: "The card was declined (`code`: `card_declined`).",
    429: "Too many requests.",
    503: (
        "A service we depend on is not reachable; nothing was done, try again after `Retry-After` seconds "
        "(`code`: `gateway_unavailable`, the payment gateway; `log_unavailable`, the usage event log)."
    ),
}


def error_responses(*statuses: int) -> dict[Any, Any]:
    """``extend_schema(responses=…)`` entries for the given error statuses."""
    out: dict[Any, Any] = {}
    for status in sorted({*statuses, 406}):
        out[(status, PROBLEM_CONTENT_TYPE)] = OpenApiResponse(ProblemSerializer, description=_DESCRIPTIONS[status])
    return out
