"""Thin views: validate, call one service or selector, shape the output."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle
from rest_framework.views import APIView

from accounts import selectors, services, signals
from accounts.authentication import caller_of
from accounts.models import ApiKey, BillingAccount, BillingAccountTransition, Membership, User
from accounts.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeySerializer,
    BillingAccountSerializer,
    BillingAccountUpdateSerializer,
    HistoryEntrySerializer,
    MemberAddSerializer,
    MemberSerializer,
    SignupResponseSerializer,
    SignupSerializer,
    TransitionRequestSerializer,
)
from billing_site.common.actors import Actor
from billing_site.common.errors import error_responses
from billing_site.common.views import StrictQueryMixin, client_ip


class IsUserKey(permissions.BasePermission):
    """Endpoints that act as a person: service keys are refused (403)."""

    message = "This endpoint needs a user's API key, not a service key."

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.auth is not None and getattr(request.auth, "user_id", None) is not None)


def _user(request: Request) -> User:
    """The person behind a user key (views that call this are guarded by ``IsUserKey``)."""
    user = request.user
    if not isinstance(user, User):
        raise PermissionDenied(IsUserKey.message)
    return user


def _actor(request: Request) -> Actor:
    user = _user(request)
    return Actor.user(user.id, user.email)


# --- Users and keys


class SignupThrottle(AnonRateThrottle):
    """Sign-ups per client IP (``SIGNUP_RATE``): slows account farming and email probing."""

    scope = "signup"


class MemberAddThrottle(UserRateThrottle):
    """Member additions per user (``MEMBER_ADD_RATE``): adding answers whether an email has
    signed up, so it must not become a fast way to probe emails."""

    scope = "member_add"


class SignupView(StrictQueryMixin, APIView):
    authentication_classes: list[Any] = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = [SignupThrottle]

    @extend_schema(
        operation_id="users_create",
        summary="Sign up",
        request=SignupSerializer,
        responses={201: SignupResponseSerializer, **error_responses(400, 409, 415, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = SignupSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user, issued = services.user_signup(
            email=data.validated_data["email"], password=data.validated_data["password"]
        )
        signals.user_signed_up.send(sender=SignupView, user_id=user.id, client_ip=client_ip(request))
        body = {"id": user.public_id, "email": user.email, "api_key": issued.raw}
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyListCreateView(StrictQueryMixin, generics.ListCreateAPIView[ApiKey]):
    permission_classes = [permissions.IsAuthenticated, IsUserKey]
    serializer_class = ApiKeySerializer

    def get_queryset(self) -> QuerySet[ApiKey]:
        return selectors.api_key_list_for_user(user_id=_user(self.request).id)

    @extend_schema(
        summary="List your API keys", responses={200: ApiKeySerializer(many=True), **error_responses(400, 401, 403)}
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Create an API key",
        request=ApiKeySerializer,
        responses={201: ApiKeyCreatedSerializer, **error_responses(400, 401, 403, 415)},
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = ApiKeySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = services.api_key_create(user_id=_user(request).id, name=data.validated_data["name"])
        body = {**ApiKeySerializer(issued.key).data, "api_key": issued.raw}
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyDetailView(StrictQueryMixin, APIView):
    permission_classes = [permissions.IsAuthenticated, IsUserKey]

    @extend_schema(summary="Revoke an API key", responses={204: None, **error_responses(401, 403, 404)})
    def delete(self, request: Request, key_id: int) -> Response:
        services.api_key_revoke(key_id=key_id, user_id=_user(request).id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Billing accounts


class BillingAccountListCreateView(StrictQueryMixin, generics.ListCreateAPIView[BillingAccount]):
    serializer_class = BillingAccountSerializer

    def get_queryset(self) -> QuerySet[BillingAccount]:
        return selectors.billing_account_list_for_caller(caller=caller_of(self.request))

    @extend_schema(
        summary="List the billing accounts you are a member of",
        responses={200: BillingAccountSerializer(many=True), **error_responses(400, 401)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Open a billing account",
        description="The caller becomes its owner. It starts `pending`.",
        request=BillingAccountSerializer,
        responses={201: BillingAccountSerializer, **error_responses(400, 401, 403, 415)},
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = BillingAccountSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        profile = dict(data.validated_data)
        currency = profile.pop("currency")
        owner = _user(request)
        account = services.billing_account_create(owner_id=owner.id, profile=profile, currency=currency)
        # Committed: the signup checkpoint (antifraud) assesses it before it can be activated.
        signals.billing_account_opened.send(
            sender=BillingAccountListCreateView, account_id=account.id, user_id=owner.id, client_ip=client_ip(request)
        )
        account.refresh_from_db(fields=["state"])  # a block is applied through the outbox
        return Response(BillingAccountSerializer(account).data, status=status.HTTP_201_CREATED)


class BillingAccountDetailView(StrictQueryMixin, APIView):
    @extend_schema(summary="A billing account", responses={200: BillingAccountSerializer, **error_responses(401, 404)})
    def get(self, request: Request, account_id: int) -> Response:
        account = selectors.billing_account_get_for_caller(caller=caller_of(request), account_id=account_id)
        return Response(BillingAccountSerializer(account).data)

    @extend_schema(
        summary="Update a billing account's profile",
        description="Owners and admins. Only profile fields; `state`, `currency`, `credit_limit` are refused.",
        request=BillingAccountUpdateSerializer,
        responses={200: BillingAccountSerializer, **error_responses(400, 401, 403, 404, 409, 415)},
    )
    def patch(self, request: Request, account_id: int) -> Response:
        account = selectors.billing_account_get_for_caller(
            caller=caller_of(request), account_id=account_id, roles=selectors.WRITERS
        )
        data = BillingAccountUpdateSerializer(account, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        account = services.billing_account_update(
            account_id=account.id, changes=dict(data.validated_data), actor=_actor(request)
        )
        return Response(BillingAccountSerializer(account).data)


class BillingAccountCloseView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Close a billing account",
        description=(
            "Owner only. Terminal. Not possible while the account is blocked, nor while it owes money: "
            "409 `outstanding_balance`, with what is owed per currency (`errors[].currency`, `errors[].amount` "
            "as a money string), until the debt is paid, credited or written off."
        ),
        request=TransitionRequestSerializer,
        responses={200: BillingAccountSerializer, **error_responses(400, 401, 403, 404, 409, 415)},
    )
    def post(self, request: Request, account_id: int) -> Response:
        selectors.billing_account_get_for_caller(
            caller=caller_of(request), account_id=account_id, roles=selectors.OWNERS
        )
        data = TransitionRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        account = services.billing_account_transition(
            account_id=account_id, transition="close", actor=_actor(request), reason=data.validated_data["reason"]
        )
        return Response(BillingAccountSerializer(account).data)


class BillingAccountHistoryView(StrictQueryMixin, generics.ListAPIView[BillingAccountTransition]):
    serializer_class = HistoryEntrySerializer

    def get_queryset(self) -> QuerySet[BillingAccountTransition]:
        account_id = self.kwargs["account_id"]
        selectors.billing_account_get_for_caller(caller=caller_of(self.request), account_id=account_id)
        return selectors.billing_account_history(account_id=account_id)

    @extend_schema(
        summary="A billing account's lifecycle history",
        responses={200: HistoryEntrySerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class MemberListCreateView(StrictQueryMixin, generics.ListCreateAPIView[Membership]):
    serializer_class = MemberSerializer

    def get_queryset(self) -> QuerySet[Membership]:
        account_id = self.kwargs["account_id"]
        selectors.billing_account_get_for_caller(caller=caller_of(self.request), account_id=account_id)
        return selectors.member_list(account_id=account_id)

    def get_throttles(self) -> list[Any]:
        return [MemberAddThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        summary="Members of a billing account",
        responses={200: MemberSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Add a member",
        description="Owner only. The user must already have signed up.",
        request=MemberAddSerializer,
        responses={201: MemberSerializer, **error_responses(400, 401, 403, 404, 409, 415, 429)},
    )
    def post(self, request: Request, account_id: int) -> Response:
        selectors.billing_account_get_for_caller(
            caller=caller_of(request), account_id=account_id, roles=selectors.OWNERS
        )
        data = MemberAddSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.member_add(account_id=account_id, **data.validated_data)
        return Response(MemberSerializer(membership).data, status=status.HTTP_201_CREATED)


class MemberDetailView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Remove a member",
        description="The owner removes anyone but themselves; any other member may remove themselves (leave).",
        responses={204: None, **error_responses(401, 403, 404, 409)},
    )
    def delete(self, request: Request, account_id: int, user_id: int) -> Response:
        caller = caller_of(request)
        leaving = caller.user_id == user_id
        selectors.billing_account_get_for_caller(
            caller=caller, account_id=account_id, roles=None if leaving else selectors.OWNERS
        )
        services.member_remove(account_id=account_id, user_id=user_id)
        return Response(status=status.HTTP_204_NO_CONTENT)
