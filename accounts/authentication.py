"""``Authorization: Bearer <api key>`` for the whole API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from accounts import keys, services
from accounts.models import ApiKey, Scope

__all__ = ["Caller", "Scope", "caller_of"]  # what other apps' API views use (Scope: a key's scopes)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a user (through one of their keys) or a service key with scopes."""

    key_id: int
    user_id: int | None
    name: str
    scopes: frozenset[str]

    @property
    def is_service(self) -> bool:
        return self.user_id is None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class ServicePrincipal:
    """``request.user`` for a service key: authenticated, but no user behind it."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None
    id = None

    def __init__(self, key: ApiKey) -> None:
        self.key = key
        self.email = f"service:{key.name}"

    def __str__(self) -> str:
        return self.email


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = get_authorization_header(request).split()
        if not header:
            return None
        if header[0].lower() != b"bearer" or len(header) != 2:
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid API key.") from exc
        prefix = keys.parse_prefix(raw)
        key = ApiKey.objects.select_related("user").filter(prefix=prefix).first() if prefix else None
        if key is None or not keys.matches(raw, key.secret_hash):
            raise exceptions.AuthenticationFailed("Invalid API key.")
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key has been revoked.")
        if key.user is not None and not key.user.is_active:
            raise exceptions.AuthenticationFailed("This user is deactivated.")
        services.api_key_touch(key=key, interval_seconds=settings.API_KEY_TOUCH_INTERVAL_SECONDS)
        return (key.user if key.user is not None else ServicePrincipal(key)), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


def caller_of(request: Request) -> Caller:
    key = request.auth
    if not isinstance(key, ApiKey):
        raise exceptions.NotAuthenticated()
    return Caller(
        key_id=key.id,
        user_id=key.user_id,
        name=key.user.email if key.user is not None else f"service:{key.name}",
        scopes=frozenset(key.scopes),
    )


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer bku_…`."}
