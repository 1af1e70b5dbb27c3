"""The gateway interface: what the payments app asks of a card gateway, in our own terms.

Frozen dataclasses in and out, money in integer minor units with ISO 4217 currency codes
(upper case), and our own errors. Implementations: ``sandbox`` (deterministic, offline, the
demo's default) and ``stripe`` (the only module that imports the ``stripe`` SDK). Nothing
here touches the database: callers persist their intent before a call and record the
outcome after it, never inside a transaction.

Errors:

- ``PaymentDeclined(code, retryable)``: the gateway answered and refused (a card decline,
  an authentication the customer must complete is *not* a decline: see ``ChargeResult``).
- ``GatewayUnavailable``: the request certainly did not take effect (refused connection,
  the gateway said so); safe to try again later with the same idempotency key.
- ``OutcomeUnknown``: the request may or may not have taken effect (timeout, reset after
  sending, a 5xx): the caller must ask the gateway (reconcile) before charging again.
- ``RateLimited``: the gateway kept answering 429 after our back-off.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol


class GatewayError(Exception):
    """Base of every error a gateway raises; callers never see the SDK's own."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class PaymentDeclined(GatewayError):
    """Refused by the gateway or the issuer. ``retryable``: a later attempt may succeed
    (insufficient funds, a generic decline); not: it will not (lost or stolen card, fraud)."""

    def __init__(self, code: str, *, retryable: bool, message: str = "", intent_id: str = "") -> None:
        super().__init__(message or code)
        self.code = code
        self.retryable = retryable
        self.intent_id = intent_id  # the gateway's PaymentIntent, when one was created


class GatewayUnavailable(GatewayError):
    """Nothing happened at the gateway; try again later."""


class OutcomeUnknown(GatewayError):
    """It may have happened: reconcile before doing anything else."""


class RateLimited(GatewayError):
    """Too many requests, still after backing off."""


class InvalidRequest(GatewayError):
    """The gateway refused the request as malformed or about an unknown object (a bug or a
    stale id, never a decline): ``code`` is the gateway's own."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


@dataclass(frozen=True, slots=True)
class CardFacts:
    brand: str  # visa, mastercard, amex …
    last4: str
    exp_month: int
    exp_year: int
    fingerprint: str  # the same card number gives the same fingerprint (antifraud reads it)
    country: str  # issuing country, ISO 3166-1 alpha-2 ("" if unknown)
    funding: str  # credit | debit | prepaid | unknown


@dataclass(frozen=True, slots=True)
class PaymentMethodInfo:
    id: str
    customer_id: str  # "" when not attached
    card: CardFacts


class SetupStatus:
    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class SetupIntentInfo:
    id: str
    status: str  # SetupStatus
    customer_id: str
    client_secret: str
    payment_method_id: str = ""  # set once succeeded
    metadata: dict[str, str] = field(default_factory=dict)
    decline_code: str = ""  # why the last confirmation failed, if it did


class ChargeStatus:
    SUCCEEDED = "succeeded"
    REQUIRES_ACTION = "requires_action"  # the customer must authenticate (3-D Secure)
    PROCESSING = "processing"  # the gateway has not decided yet; ask again later
    FAILED = "failed"  # declined (as seen when retrieving an intent; a live call raises PaymentDeclined)
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    customer_id: str
    payment_method_id: str
    amount_minor: int
    currency: str  # ISO 4217, upper case
    idempotency_key: str
    metadata: dict[str, str]  # carries our payment id ("payment_id") for reconciliation
    description: str = ""


@dataclass(frozen=True, slots=True)
class ChargeResult:
    intent_id: str
    status: str  # ChargeStatus
    amount_minor: int
    currency: str
    charge_id: str = ""
    amount_refunded_minor: int = 0
    client_secret: str = ""  # requires_action: for the browser to authenticate
    next_action_url: str = ""
    decline_code: str = ""
    decline_message: str = ""
    retryable: bool = True  # of a decline
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class RefundRequest:
    intent_id: str
    amount_minor: int
    currency: str
    idempotency_key: str
    metadata: dict[str, str]  # carries our refund id ("refund_id")
    reason: str = ""  # requested_by_customer | duplicate | fraudulent | ""


@dataclass(frozen=True, slots=True)
class RefundResult:
    refund_id: str
    status: str  # succeeded | pending | failed
    amount_minor: int
    currency: str
    intent_id: str = ""


class Gateway(Protocol):
    """What every gateway implements. ``name`` is stored on every row it touches."""

    name: str
    test_mode: bool  # test keys: flows may be driven server-side with test payment methods
    publishable_key: str

    def customer_create(self, *, account_ref: str, email: str, name: str, idempotency_key: str) -> str:
        """A customer at the gateway for one billing account; returns its id."""
        ...

    def setup_intent_create(
        self, *, customer_id: str, metadata: dict[str, str], idempotency_key: str
    ) -> SetupIntentInfo:
        """A SetupIntent for an off-session card (``usage=off_session``)."""
        ...

    def setup_intent_retrieve(self, intent_id: str) -> SetupIntentInfo: ...

    def setup_intent_confirm_test(self, *, intent_id: str, test_payment_method: str) -> SetupIntentInfo:
        """Test mode only: confirm server-side with a test payment method (``pm_card_visa``)
        instead of the browser. A card declined at binding raises ``PaymentDeclined``."""
        ...

    def payment_method_retrieve(self, payment_method_id: str) -> PaymentMethodInfo: ...

    def payment_method_detach(self, payment_method_id: str) -> None: ...

    def charge(self, request: ChargeRequest) -> ChargeResult:
        """An off-session PaymentIntent, confirmed at once. Returns succeeded, requires_action
        or processing; raises ``PaymentDeclined`` on a decline."""
        ...

    def payment_intent_retrieve(self, intent_id: str) -> ChargeResult: ...

    def payment_intents_for_customer(self, *, customer_id: str, created_since: dt.datetime) -> list[ChargeResult]:
        """The customer's PaymentIntents created since then (for reconciling a payment whose
        intent id we never learnt: match ``metadata["payment_id"]``)."""
        ...

    def payment_intent_cancel(self, intent_id: str) -> ChargeResult:
        """Cancel an intent awaiting the customer's authentication (before a new attempt)."""
        ...

    def refund(self, request: RefundRequest) -> RefundResult: ...
