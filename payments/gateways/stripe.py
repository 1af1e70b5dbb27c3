"""The Stripe gateway: ``base.Gateway`` over the official SDK. The only module that imports ``stripe``.

One ``stripe.StripeClient`` per gateway, built from explicit arguments (no module globals such
as ``stripe.api_key`` are set), with the API version pinned (``STRIPE_API_VERSION``) so a
dashboard upgrade cannot change what we parse, and the SDK's own network retries off: retries
are ours, because only we know which failures are safe to repeat.

Every HTTP request goes through ``StripeGateway._call``, the one place where (a) the rate
limiter is asked first (``payments.ratelimit``, also before each retry and each page of a
list), (b) a 429 is retried with full-jitter exponential back-off, the *same* request with the
*same* idempotency key (one is generated per logical call when the caller gave none, so even a
detach is retried as one request), and (c) the SDK's errors become ours (``_translate``, after
Zulip's ``catch_stripe_errors``):

======================================  ==================================================
SDK error                               ours
======================================  ==================================================
``CardError`` (402)                     ``PaymentDeclined(decline_code or code, retryable)``
``RateLimitError`` (429), still after   ``RateLimited``
``rate_limit_retries`` back-offs
``APIConnectionError``, never connected ``GatewayUnavailable`` (refused, DNS, connect timeout)
``APIConnectionError``, otherwise       ``OutcomeUnknown`` (read timeout, reset, dropped answer)
``APIError``, 5xx, 409, anything else   ``OutcomeUnknown``
``AuthenticationError``,                ``GatewayUnavailable`` (our key: nothing happened)
``PermissionError``
``InvalidRequestError``,                ``InvalidRequest(code)`` (404 without a code:
``IdempotencyError``                    ``resource_missing``)
======================================  ==================================================

"Never connected" is decided by walking the exception chain (``__cause__``, ``__context__``,
urllib3's ``reason``, exception ``args``) for a connection that was never established:
``ConnectionRefusedError``, urllib3's ``NewConnectionError``/``ConnectTimeoutError`` (DNS
failures included), requests' ``ConnectTimeout``, httpx's ``ConnectError``/``ConnectTimeout``.
By class name, so it holds whichever HTTP library the SDK uses and needs no import of it.
Only then had no byte of the request left this process. Anything that fails after the
connection was made is ``OutcomeUnknown``, even a reset that came before the server read the
request: from the client's side a reset before and after processing look the same, so the
honest answer is "ask before charging again".

Retryable declines: everything except ``HARD_DECLINES``, the codes for which the issuer will
never approve this card (Visa's category 1, Mastercard's "do not try again": lost, stolen,
pick up, fraud, closed or invalid account, expired, wrong number, revoked authorisation).
``do_not_honor`` stays retryable: it is the issuer's generic refusal, and Visa and Mastercard
both allow it to be retried later. An off-session charge refused with
``authentication_required`` is no decline: ``charge`` returns ``requires_action`` with the
intent's client secret, so the customer can authenticate (``base``: not a decline).

Intent statuses: ``succeeded``; ``requires_action``, and ``requires_payment_method`` after an
``authentication_required`` decline, are ``requires_action`` (the client secret is handed out
then only); ``processing`` and ``requires_capture`` are ``processing``; ``requires_payment_method``
and ``requires_confirmation`` are ``failed`` (our intents are confirmed when created, so they
got there by a decline, whose code is in ``last_payment_error``); ``canceled``; anything new is
``processing`` (ask again later, never guess an outcome).

It speaks Stripe only, whatever ``api_base`` says: a server that answers differently is
made to answer as Stripe does on its side (the tests' localstripe sits behind
``payments/tests/stripe_harness.LocalStripeAdapter``), never by a mode here.

Webhooks: ``webhook_event_construct`` checks the ``Stripe-Signature`` header with the SDK and
returns the event as a plain dict, or raises ``InvalidSignature``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import stripe

from billing_site.common.transactions import forbid_transaction
from payments.gateways.base import (
    CardFacts,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayError,
    GatewayUnavailable,
    InvalidRequest,
    OutcomeUnknown,
    PaymentDeclined,
    PaymentMethodInfo,
    RateLimited,
    RefundRequest,
    RefundResult,
    SetupIntentInfo,
    SetupStatus,
)

if TYPE_CHECKING:
    from stripe.params import (
        CustomerCreateParams,
        PaymentIntentCreateParams,
        PaymentIntentListParams,
        RefundCreateParams,
        SetupIntentCreateParams,
    )

    from payments.ratelimit import CallRateLimiter

log = logging.getLogger(__name__)

# The API version every request is made with: the SDK's own (stripe==16.1.0). Upgrade the SDK and
# this together, after reading Stripe's changelog for the objects parsed below.
STRIPE_API_VERSION = "2026-10-28.endive"
DEFAULT_API_BASE = "https://api.stripe.com"
PAYMENT_INTENT_PAGE_SIZE = 100  # Stripe's maximum

# Decline codes after which no later attempt with the same card can succeed (see the docstring).
HARD_DECLINES = frozenset(
    {
        "lost_card",
        "stolen_card",
        "pickup_card",
        "fraudulent",
        "restricted_card",
        "merchant_blacklist",
        "invalid_account",
        "card_not_supported",
        "incorrect_number",
        "invalid_number",
        "expired_card",
        "revocation_of_authorization",
        "revocation_of_all_authorizations",
        "security_violation",
        "stop_payment_order",
        "transaction_not_allowed",
    }
)

# CARD_ONLY: SetupIntents and PaymentIntents are limited to cards (``allowed_payment_method_types``,
# the pinned version's name for the older ``payment_method_types``): with the dashboard's
# automatic payment methods instead, a server-side confirmation could also need a return_url for
# redirect-based methods we never bind.
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

_CHARGE_STATUSES = {
    "succeeded": ChargeStatus.SUCCEEDED,
    "requires_action": ChargeStatus.REQUIRES_ACTION,
    "processing": ChargeStatus.PROCESSING,
    "requires_capture": ChargeStatus.PROCESSING,  # authorised, capture pending (we capture automatically)
    # Our intents are confirmed when created: one that needs a payment method or a confirmation
    # again has failed (the decline is in last_payment_error).
    "requires_payment_method": ChargeStatus.FAILED,
    "requires_confirmation": ChargeStatus.FAILED,
    "canceled": ChargeStatus.CANCELED,
}
_REFUND_STATUSES = {
    "succeeded": "succeeded",
    "pending": "pending",
    "requires_action": "pending",
    "failed": "failed",
    "canceled": "failed",
}

# Exception class names meaning "the connection was never established" (see the docstring).
_NEVER_CONNECTED = frozenset(
    {
        "ConnectionRefusedError",  # builtin
        "NewConnectionError",  # urllib3: refused, unreachable, DNS (NameResolutionError is one)
        "ConnectTimeoutError",  # urllib3
        "NameResolutionError",  # urllib3
        "ConnectTimeout",  # requests, httpx
        "ConnectError",  # httpx
        "gaierror",  # socket: DNS
    }
)


class InvalidSignature(GatewayError):
    """A webhook whose ``Stripe-Signature`` does not verify (wrong secret, altered body, a
    timestamp outside the tolerance either way): answer 400, process nothing."""


class InvalidEvent(GatewayError):
    """A webhook whose body is not an event we can read (not UTF-8, not JSON, nested too
    deeply): answer 400 with the reason, store nothing."""


class StripeGateway:
    """``base.Gateway`` over Stripe. Thread-safe: the SDK's HTTP client keeps one session per thread."""

    def __init__(
        self,
        *,
        secret_key: str,
        publishable_key: str = "",
        api_base: str = DEFAULT_API_BASE,
        timeout: float = 30.0,
        name: str = "stripe",
        limiter: CallRateLimiter | None = None,
        rate_limit_retries: int = 5,
        backoff_base_seconds: float = 0.25,
        backoff_cap_seconds: float = 8.0,
    ) -> None:
        self.name = name
        self.publishable_key = publishable_key
        self.api_base = api_base.rstrip("/")
        self.timeout = timeout
        self.limiter = limiter
        self.rate_limit_retries = rate_limit_retries
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.test_mode = secret_key.startswith(("sk_test_", "rk_test_"))
        self._client = stripe.StripeClient(
            secret_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": self.api_base},
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    @classmethod
    def from_settings(cls) -> StripeGateway:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        from payments.ratelimit import limiter_for

        if not settings.STRIPE_SECRET_KEY:
            raise ImproperlyConfigured("STRIPE_SECRET_KEY is not set: the stripe gateway cannot be used.")
        return cls(
            secret_key=settings.STRIPE_SECRET_KEY,
            publishable_key=settings.STRIPE_PUBLISHABLE_KEY,
            api_base=settings.STRIPE_API_BASE,
            timeout=settings.STRIPE_TIMEOUT_SECONDS,
            limiter=limiter_for("stripe"),
        )

    def __repr__(self) -> str:  # never the key
        mode = "test" if self.test_mode else "live"
        return f"StripeGateway(name={self.name!r}, {mode}, api_base={self.api_base!r})"

    # --- customers and cards

    def customer_create(self, *, account_ref: str, email: str, name: str, idempotency_key: str) -> str:
        params: CustomerCreateParams = {"metadata": {"account_id": account_ref}}
        if email:  # "" would not mean "none" to Stripe
            params["email"] = email
        if name:
            params["name"] = name
        customer = self._call(
            "customer_create",
            lambda options: self._client.v1.customers.create(params=params, options=options),
            idempotency_key=idempotency_key,
        )
        return str(customer["id"])

    def setup_intent_create(
        self, *, customer_id: str, metadata: dict[str, str], idempotency_key: str
    ) -> SetupIntentInfo:
        params: SetupIntentCreateParams = {
            "customer": customer_id,
            "usage": "off_session",
            "metadata": dict(metadata),
            "allowed_payment_method_types": ["card"],  # see CARD_ONLY
        }
        intent = self._call(
            "setup_intent_create",
            lambda options: self._client.v1.setup_intents.create(params=params, options=options),
            idempotency_key=idempotency_key,
        )
        return _setup_info(intent)

    def setup_intent_retrieve(self, intent_id: str) -> SetupIntentInfo:
        intent = self._call(
            "setup_intent_retrieve",
            lambda options: self._client.v1.setup_intents.retrieve(intent_id, options=options),
        )
        return _setup_info(intent)

    def setup_intent_confirm_test(self, *, intent_id: str, test_payment_method: str) -> SetupIntentInfo:
        """Confirm server-side with a Stripe test payment method, test mode only. An intent that
        already succeeded is returned as it is, so a repeated call is harmless."""
        if not self.test_mode:
            raise InvalidRequest("test_mode_only", "Test payment methods are accepted with test keys only.")
        current = self.setup_intent_retrieve(intent_id)
        if current.status == SetupStatus.SUCCEEDED:
            return current
        intent = self._call(
            "setup_intent_confirm",
            lambda options: self._client.v1.setup_intents.confirm(
                intent_id, params={"payment_method": test_payment_method}, options=options
            ),
        )
        return _setup_info(intent)

    def payment_method_retrieve(self, payment_method_id: str) -> PaymentMethodInfo:
        method = self._call(
            "payment_method_retrieve",
            lambda options: self._client.v1.payment_methods.retrieve(payment_method_id, options=options),
        )
        card = method.get("card") or {}
        if not card:
            raise InvalidRequest("not_a_card", f"Payment method {method.get('id')} is not a card.")
        return PaymentMethodInfo(
            id=str(method["id"]),
            customer_id=_id_of(method.get("customer")),
            card=CardFacts(
                brand=str(card.get("brand") or "unknown"),
                last4=str(card.get("last4") or ""),
                exp_month=int(card.get("exp_month") or 0),
                exp_year=int(card.get("exp_year") or 0),
                fingerprint=str(card.get("fingerprint") or ""),
                country=str(card.get("country") or ""),
                funding=str(card.get("funding") or "unknown"),
            ),
        )

    def payment_method_detach(self, payment_method_id: str) -> None:
        self._call(
            "payment_method_detach",
            lambda options: self._client.v1.payment_methods.detach(payment_method_id, options=options),
        )

    # --- charges

    def charge(self, request: ChargeRequest) -> ChargeResult:
        params: PaymentIntentCreateParams = {
            "customer": request.customer_id,
            "payment_method": request.payment_method_id,
            "amount": request.amount_minor,
            "currency": request.currency.lower(),
            "off_session": True,
            "confirm": True,
            "metadata": dict(request.metadata),
            "expand": ["latest_charge"],
            "allowed_payment_method_types": ["card"],  # see CARD_ONLY
        }
        if request.description:
            params["description"] = request.description
        try:
            intent = self._call(
                "charge",
                lambda options: self._client.v1.payment_intents.create(params=params, options=options),
                idempotency_key=request.idempotency_key,
            )
        except PaymentDeclined as exc:
            error = _error_body(exc.__cause__)
            pending = error.get("payment_intent")
            if exc.code == "authentication_required" and isinstance(pending, dict) and pending.get("id"):
                # The issuer wants 3-D Secure, which off-session cannot give: the customer must
                # authenticate (on-session, with the intent's client secret). Not a decline.
                return _charge_result(pending, authentication_required=True)
            raise
        result = _charge_result(intent)
        if result.status == ChargeStatus.FAILED:
            raise PaymentDeclined(
                result.decline_code,
                retryable=result.retryable,
                message=result.decline_message,
                intent_id=result.intent_id,
            )
        return result

    def payment_intent_retrieve(self, intent_id: str) -> ChargeResult:
        intent = self._call(
            "payment_intent_retrieve",
            lambda options: self._client.v1.payment_intents.retrieve(
                intent_id, params={"expand": ["latest_charge"]}, options=options
            ),
        )
        return _charge_result(intent)

    def payment_intents_for_customer(self, *, customer_id: str, created_since: dt.datetime) -> list[ChargeResult]:
        """The customer's intents created since then, oldest first: Stripe's list filtered by
        ``customer`` and ``created[gte]``, page by page (a customer has a handful). Never a walk
        through the whole account's intents. Stripe lists newest first and stamps ``created`` in
        whole seconds: the list is reversed, then sorted stably, so intents created within one
        second keep the order they were made in."""
        since = int(created_since.timestamp())
        found = [_charge_result(intent) for intent in self._payment_intent_pages(customer_id=customer_id, since=since)]
        found.reverse()
        return sorted(found, key=lambda result: result.created_at or dt.datetime.min.replace(tzinfo=dt.UTC))

    def _payment_intent_pages(self, *, customer_id: str, since: int) -> Iterator[dict[str, Any]]:
        starting_after = ""
        while True:
            params: PaymentIntentListParams = {
                "customer": customer_id,
                "created": {"gte": since},
                "limit": PAYMENT_INTENT_PAGE_SIZE,
                "expand": ["data.latest_charge"],
            }
            if starting_after:
                params["starting_after"] = starting_after
            page = self._list_page(params)
            data: list[dict[str, Any]] = list(page.get("data") or [])
            yield from data
            if not page.get("has_more") or not data:
                return
            starting_after = str(data[-1]["id"])

    def _list_page(self, params: PaymentIntentListParams) -> dict[str, Any]:
        return self._call(
            "payment_intent_list",
            lambda options: self._client.v1.payment_intents.list(params=params, options=options),
        )

    def payment_intent_cancel(self, intent_id: str) -> ChargeResult:
        intent = self._call(
            "payment_intent_cancel",
            lambda options: self._client.v1.payment_intents.cancel(
                intent_id, params={"expand": ["latest_charge"]}, options=options
            ),
        )
        return _charge_result(intent)

    def refund(self, request: RefundRequest) -> RefundResult:
        if request.reason and request.reason not in REFUND_REASONS:
            raise InvalidRequest("invalid_refund_reason", f"Unknown refund reason {request.reason!r}.")
        params: RefundCreateParams = {
            "payment_intent": request.intent_id,
            "amount": request.amount_minor,
            "metadata": dict(request.metadata),
        }
        if request.reason:
            params["reason"] = cast(Any, request.reason)
        refund = self._call(
            "refund",
            lambda options: self._client.v1.refunds.create(params=params, options=options),
            idempotency_key=request.idempotency_key,
        )
        return RefundResult(
            refund_id=str(refund["id"]),
            status=_REFUND_STATUSES.get(str(refund.get("status")), "pending"),
            amount_minor=int(refund["amount"]),
            currency=str(refund["currency"]).upper(),
            intent_id=_id_of(refund.get("payment_intent")) or request.intent_id,
        )

    # --- the one door to the network

    def _call(
        self,
        operation: str,
        send: Callable[[stripe.RequestOptions], stripe.StripeObject],
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """One logical request: limiter, the request, 429s retried with the same idempotency key,
        errors translated. Returns the response as a plain dict (SDK objects are not dicts)."""
        forbid_transaction("A Stripe call")
        # Every request carries a key, the caller's or one made here, the same on every retry
        # (Stripe ignores it on a GET).
        options: stripe.RequestOptions = {"idempotency_key": idempotency_key or f"{operation}-{uuid.uuid4().hex}"}
        attempt = 0
        while True:
            if self.limiter is not None:
                self.limiter.acquire()
            try:
                return send(options).to_dict()
            except stripe.RateLimitError as exc:
                if attempt >= self.rate_limit_retries:
                    log.warning("payments.stripe_rate_limited", extra={"operation": operation, "attempts": attempt + 1})
                    raise RateLimited(f"stripe: {operation} still rate limited after {attempt + 1} attempts") from exc
                delay = self._backoff(attempt)
                log.info(
                    "payments.stripe_backoff",
                    extra={"operation": operation, "attempt": attempt + 1, "delay_ms": round(delay * 1000)},
                )
                time.sleep(delay)
                attempt += 1
            except stripe.StripeError as exc:
                raise _translate(exc, operation) from exc

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (spreads retrying callers apart)."""
        ceiling = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2**attempt)
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret


# --- errors


def _translate(exc: stripe.StripeError, operation: str) -> GatewayError:
    """The SDK's error as ours (the table in the module docstring)."""
    error = _error_body(exc)
    message = exc.user_message or type(exc).__name__
    if isinstance(exc, stripe.CardError):
        code = str(error.get("decline_code") or exc.code or "card_declined")
        return PaymentDeclined(
            code,
            retryable=code not in HARD_DECLINES,
            message=message,
            intent_id=_id_of(error.get("payment_intent")),
        )
    if isinstance(exc, stripe.APIConnectionError):
        if _never_connected(exc):
            return GatewayUnavailable(f"stripe: {operation}: could not connect")
        return OutcomeUnknown(f"stripe: {operation}: the answer was lost (timeout or broken connection)")
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return GatewayUnavailable(f"stripe: {operation}: refused our key ({exc.http_status})")
    if isinstance(exc, stripe.IdempotencyError):
        return InvalidRequest("idempotency_error", message)
    if isinstance(exc, stripe.InvalidRequestError):
        code = exc.code or ("resource_missing" if exc.http_status == 404 else "invalid_request")
        return InvalidRequest(str(code), message)
    if isinstance(exc, stripe.RateLimitError):  # only when not retried (never, today)
        return RateLimited(f"stripe: {operation}: rate limited")
    return OutcomeUnknown(f"stripe: {operation}: {exc.http_status or 'error'} {message}")


def _error_body(exc: BaseException | None) -> dict[str, Any]:
    """The ``error`` object of a Stripe error response, or {}."""
    if isinstance(exc, stripe.StripeError) and isinstance(exc.json_body, dict):
        error = exc.json_body.get("error")
        if isinstance(error, dict):
            return error
    return {}


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        stack.extend(item for item in linked if isinstance(item, BaseException))


def _never_connected(exc: BaseException) -> bool:
    """Whether the connection was never established (so the request was never sent)."""
    return any(klass.__name__ in _NEVER_CONNECTED for link in _exception_chain(exc) for klass in type(link).__mro__)


# --- shapes


def _id_of(value: Any) -> str:
    """An expandable field's id: the string itself, or the expanded object's ``id``."""
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return str(value or "")


def _setup_info(intent: dict[str, Any]) -> SetupIntentInfo:
    error = intent.get("last_setup_error") or {}
    return SetupIntentInfo(
        id=str(intent["id"]),
        status=str(intent["status"]),
        customer_id=_id_of(intent.get("customer")),
        client_secret=str(intent.get("client_secret") or ""),
        payment_method_id=_id_of(intent.get("payment_method")),
        metadata={str(k): str(v) for k, v in (intent.get("metadata") or {}).items()},
        decline_code=str(error.get("decline_code") or error.get("code") or ""),
    )


def _charge_result(intent: dict[str, Any], *, authentication_required: bool = False) -> ChargeResult:
    raw_status = str(intent.get("status") or "")
    error = intent.get("last_payment_error") or {}
    code = str(error.get("decline_code") or error.get("code") or "")
    if authentication_required:
        code = "authentication_required"
    if raw_status == "requires_payment_method" and code == "authentication_required":
        status = ChargeStatus.REQUIRES_ACTION  # off-session 3-D Secure: the customer confirms on-session
    else:
        status = _CHARGE_STATUSES.get(raw_status, ChargeStatus.PROCESSING)  # unknown: ask again later
    charge = intent.get("latest_charge")
    next_action = intent.get("next_action") or {}
    redirect = (next_action.get("redirect_to_url") or {}) if next_action.get("type") == "redirect_to_url" else {}
    created = intent.get("created")
    return ChargeResult(
        intent_id=str(intent["id"]),
        status=status,
        amount_minor=int(intent.get("amount") or 0),
        currency=str(intent.get("currency") or "").upper(),
        charge_id=_id_of(charge),
        amount_refunded_minor=int(charge.get("amount_refunded") or 0) if isinstance(charge, dict) else 0,
        client_secret=str(intent.get("client_secret") or "") if status == ChargeStatus.REQUIRES_ACTION else "",
        next_action_url=str(redirect.get("url") or ""),
        decline_code=(code or raw_status) if status == ChargeStatus.FAILED else code,
        decline_message=str(error.get("message") or ""),
        retryable=code not in HARD_DECLINES,
        metadata={str(k): str(v) for k, v in (intent.get("metadata") or {}).items()},
        created_at=dt.datetime.fromtimestamp(int(created), tz=dt.UTC) if created else None,
    )


# --- webhooks


def webhook_event_construct(*, payload: bytes, signature_header: str, secret: str, tolerance_seconds: int = 300) -> Any:
    """The JSON a webhook carries, once its signature is verified (HMAC-SHA256 of ``<t>.<body>``
    with our endpoint's secret, with the SDK) and its timestamp ``t`` is within
    ``tolerance_seconds`` of our clock, either way (the SDK refuses only the old; a timestamp
    far ahead is a replay waiting to happen). Raises ``InvalidSignature`` otherwise (an empty
    secret verifies nothing, so it is refused), and ``InvalidEvent`` for a verified body that
    is not UTF-8 JSON or is nested too deeply to parse. What the JSON holds is checked by the
    caller (``payments.webhooks.webhook_event_store``)."""
    if not secret:
        raise InvalidSignature("no webhook secret configured")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("the body is not UTF-8 text") from exc
    try:
        stripe.WebhookSignature.verify_header(text, signature_header, secret, tolerance_seconds)
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(f"stripe webhook: {exc.user_message or 'bad signature'}") from exc
    timestamp = _signature_timestamp(signature_header)
    if timestamp is None or abs(timestamp - time.time()) > tolerance_seconds:
        raise InvalidSignature(f"stripe webhook: timestamp {timestamp} outside the tolerance ({tolerance_seconds} s)")
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise InvalidEvent("the body is nested too deeply") from exc
    except ValueError as exc:
        raise InvalidEvent("the body is not JSON") from exc


def _signature_timestamp(header: str) -> int | None:
    """The ``t=`` of a ``Stripe-Signature`` header (the one the SDK verified the signature with)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                return int(value)
            except ValueError:
                return None
    return None
