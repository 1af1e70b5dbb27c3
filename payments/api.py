"""The customer's payments API: card binding, payment methods, paying an invoice, payments,
refunds and the dunning state. Members read (any role; service keys with ``accounts:read``);
owners and admins bind cards, change the default, remove cards and pay. Another tenant's
ids answer 404."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from accounts import selectors as account_selectors
from accounts.authentication import caller_of
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, NotFound, error_responses
from billing_site.common.views import StrictQueryMixin
from payments import charging, selectors, services
from payments.models import Payment, PaymentMethod, PaymentTrigger, Refund
from payments.serializers import (
    BindingCompleteSerializer,
    BindingStartSerializer,
    DunningStateSerializer,
    NoBodySerializer,
    PaymentMethodSerializer,
    PaymentSerializer,
    RefundSerializer,
)

WRITERS = ("owner", "admin")


def _account(request: Request, account_id: int, *, write: bool = False) -> Any:
    return account_selectors.billing_account_get_for_caller(
        caller=caller_of(request), account_id=account_id, roles=WRITERS if write else None
    )


def _no_body(request: Request) -> None:
    """Endpoints that take no body refuse one: malformed JSON is a 400 ``malformed_request``
    (the parser), any field a 400 ``unknown_field`` naming it, before anything is started. An
    empty body is no body, whatever its declared content type (a form post with nothing in it)."""
    if request.META.get("CONTENT_LENGTH") in (None, "", "0"):
        return
    NoBodySerializer(data=request.data).is_valid(raise_exception=True)


def _actor(request: Request) -> Actor:
    caller = caller_of(request)
    assert caller.user_id is not None
    return Actor.user(caller.user_id, caller.name)


# --- Card testing is an abuse: binding attempts are throttled per account, user and IP.


class _BindingThrottle(SimpleRateThrottle):
    setting = ""

    def get_rate(self) -> str | None:
        return str(getattr(settings, self.setting))

    def allow_request(self, request: Request, view: Any) -> bool:
        if request.method != "POST":
            return True
        return super().allow_request(request, view)


class BindingAccountThrottle(_BindingThrottle):
    """The account's budget, spent only by callers who may bind cards on it (owners and
    admins): a stranger's attempts (404) or a reader's (403) never lock the owner out. They
    still spend their own user's and IP's budgets."""

    scope = "binding_account"
    setting = "PAYMENTS_BINDING_RATE_ACCOUNT"

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        account_id = view.kwargs.get("account_id")
        try:
            _account(request, account_id, write=True)
        except ApplicationError:
            return None  # not throttled here; the view answers 404 / 403
        return self.cache_format % {"scope": self.scope, "ident": account_id}


class BindingUserThrottle(_BindingThrottle):
    scope = "binding_user"
    setting = "PAYMENTS_BINDING_RATE_USER"

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        key = request.auth
        ident = getattr(key, "user_id", None) or getattr(key, "id", None)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class BindingIpThrottle(_BindingThrottle):
    scope = "binding_ip"
    setting = "PAYMENTS_BINDING_RATE_IP"

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


BINDING_THROTTLES = [BindingAccountThrottle, BindingUserThrottle, BindingIpThrottle]


# --- Paying an invoice may call the gateway (a shared 100 calls/s): throttled per invoice and
# per user, counting only callers allowed to pay it (a stranger's 404s use up nothing).


class PayInvoiceThrottle(_BindingThrottle):  # a rate from the settings, POSTs only, as binding's
    scope = "pay_invoice"
    setting = "PAYMENTS_PAY_RATE_INVOICE"

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        return self.cache_format % {"scope": self.scope, "ident": view.kwargs.get("invoice_id")}


class PayUserThrottle(_BindingThrottle):
    scope = "pay_user"
    setting = "PAYMENTS_PAY_RATE_USER"

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        return self.cache_format % {"scope": self.scope, "ident": caller_of(request).user_id}


class PaymentMethodSetupView(StrictQueryMixin, APIView):
    throttle_classes = BINDING_THROTTLES

    @extend_schema(
        summary="Start binding a card: a SetupIntent for the browser to confirm",
        request=None,
        responses={201: BindingStartSerializer, **error_responses(400, 401, 403, 404, 409, 429, 503)},
    )
    def post(self, request: Request, account_id: int) -> Response:
        _no_body(request)
        account = _account(request, account_id, write=True)
        caller = caller_of(request)
        start = services.binding_start(
            account_id=account.id, user_id=caller.user_id, client_ip=BindingIpThrottle().get_ident(request)
        )
        return Response(BindingStartSerializer(start).data, status=status.HTTP_201_CREATED)


class PaymentMethodListCreateView(StrictQueryMixin, generics.ListAPIView[PaymentMethod]):
    serializer_class = PaymentMethodSerializer
    throttle_classes = BINDING_THROTTLES
    pagination_class = None

    def get_queryset(self) -> QuerySet[PaymentMethod]:
        account = _account(self.request, self.kwargs["account_id"])
        return selectors.payment_method_list(account_id=account.id)

    @extend_schema(
        summary="Cards bound to a billing account (brand, last four digits, expiry, default)",
        responses={200: PaymentMethodSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Complete a card binding the browser confirmed",
        request=BindingCompleteSerializer,
        responses={201: PaymentMethodSerializer, **error_responses(400, 401, 402, 403, 404, 409, 429, 503)},
    )
    def post(self, request: Request, account_id: int) -> Response:
        account = _account(request, account_id, write=True)
        body = BindingCompleteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        profile = services.profile_ensure(account_id=account.id)
        method = services.binding_complete(
            account_id=account.id,
            setup_intent_id=body.validated_data["setup_intent_id"],
            gateway_name=profile.gateway,
            test_payment_method=body.validated_data.get("test_payment_method", ""),
        )
        method.refresh_from_db()
        return Response(PaymentMethodSerializer(method).data, status=status.HTTP_201_CREATED)


class PaymentMethodDefaultView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Make a card the default (what is outstanding is charged to it at once)",
        request=None,
        responses={200: PaymentMethodSerializer, **error_responses(400, 401, 403, 404)},
    )
    def post(self, request: Request, account_id: int, payment_method_id: int) -> Response:
        _no_body(request)
        account = _account(request, account_id, write=True)
        method = services.payment_method_set_default(account_id=account.id, payment_method_id=payment_method_id)
        return Response(PaymentMethodSerializer(method).data)


class PaymentMethodDetailView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Remove a card (detached at the gateway)",
        responses={204: None, **error_responses(400, 401, 403, 404, 409, 503)},
    )
    def delete(self, request: Request, account_id: int, payment_method_id: int) -> Response:
        _no_body(request)
        account = _account(request, account_id, write=True)
        services.payment_method_remove(account_id=account.id, payment_method_id=payment_method_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvoicePayView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Pay an invoice now with the default card",
        description=(
            "Charges what is outstanding. If a payment of the invoice is already under way (being "
            "charged, or waiting for the customer's authentication on the default card), that "
            "payment is returned (200) instead of starting another. `requires_action`: the customer "
            "authenticates with `client_secret` / `next_action_url`, or pays again later (a new "
            "attempt, after `PAYMENTS_AUTHENTICATION_WINDOW_SECONDS`). Throttled per invoice and "
            "per user (429 `throttled`)."
        ),
        request=None,
        responses={
            201: PaymentSerializer,
            200: PaymentSerializer,
            **error_responses(400, 401, 403, 404, 409, 429, 503),
        },
    )
    def post(self, request: Request, account_id: int, invoice_id: int) -> Response:
        _no_body(request)
        account = _account(request, account_id, write=True)
        for throttle in (PayInvoiceThrottle(), PayUserThrottle()):
            if not throttle.allow_request(request, self):
                self.throttled(request, throttle.wait() or 1.0)
        start = charging.payment_create(
            invoice_id=invoice_id, trigger=PaymentTrigger.CUSTOMER, actor=_actor(request), account_id=account.id
        )
        payment = start.payment
        if start.created:
            payment = charging.payment_execute(payment_id=payment.id)
        return Response(PaymentSerializer(payment).data, status=201 if start.created else 200)


class PaymentListView(StrictQueryMixin, generics.ListAPIView[Payment]):
    serializer_class = PaymentSerializer

    def get_queryset(self) -> QuerySet[Payment]:
        account = _account(self.request, self.kwargs["account_id"])
        return selectors.payment_list(account_id=account.id)

    @extend_schema(
        summary="Payments of a billing account, newest first",
        responses={200: PaymentSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class PaymentDetailView(StrictQueryMixin, APIView):
    @extend_schema(summary="A payment", responses={200: PaymentSerializer, **error_responses(400, 401, 404)})
    def get(self, request: Request, account_id: int, payment_id: int) -> Response:
        account = _account(request, account_id)
        payment = selectors.payment_list(account_id=account.id).filter(id=payment_id).first()
        if payment is None:
            raise NotFound("No such payment.")
        return Response(PaymentSerializer(payment).data)


class RefundListView(StrictQueryMixin, generics.ListAPIView[Refund]):
    serializer_class = RefundSerializer

    def get_queryset(self) -> QuerySet[Refund]:
        account = _account(self.request, self.kwargs["account_id"])
        return selectors.refund_list(account_id=account.id)

    @extend_schema(
        summary="Refunds of a billing account, newest first",
        responses={200: RefundSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class DunningStateView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Where the account stands in dunning: unpaid invoices being chased and what comes next",
        responses={200: DunningStateSerializer, **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, account_id: int) -> Response:
        account = _account(request, account_id)
        return Response(DunningStateSerializer(selectors.dunning_state(account_id=account.id)).data)
