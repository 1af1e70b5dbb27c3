"""The sandbox gateway: deterministic, offline, with the meaning of Stripe's test payment
methods, so the demo, the benchmarks and most tests run with nothing configured.

============================================  ==================================================
test payment method                           behaviour
============================================  ==================================================
``pm_card_visa``, ``pm_card_mastercard``,     bind, and every charge succeeds
``pm_card_amex``
``pm_card_chargeCustomerFail``                binds; every charge is declined (retryable)
``pm_card_authenticationRequired``            binds; every charge needs the customer's 3-D Secure
``pm_card_chargeDeclined``                    declined at binding
``pm_card_visa_chargeDeclinedLostCard``       binds; every charge is a hard decline (lost card)
============================================  ==================================================

Fingerprints are stable per test card (the same card on two accounts has the same
fingerprint), as Stripe's are per card number. The sandbox keeps its objects (what Stripe
would keep) in its own table, ``payments.SandboxObject``, written in autocommit outside any of
our transactions; it honours idempotency keys (a repeated key returns the first result).

Knobs (settings, or the constructor): ``latency_ms`` sleeps on every call; ``failure_rate``
makes that share of calls fail, decided by a hash of the idempotency key and the operation so a
run is reproducible; ``failure_mode`` says how: ``unavailable`` raises ``GatewayUnavailable``
before doing anything, ``lost`` does the work and then raises ``OutcomeUnknown`` (the answer
lost), ``mixed`` (the default) does each for half of them — what reconciliation and the fault
tests need.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from billing_site.common.transactions import forbid_transaction
from payments.gateways.base import (
    CardFacts,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayUnavailable,
    InvalidRequest,
    OutcomeUnknown,
    PaymentDeclined,
    PaymentMethodInfo,
    RefundRequest,
    RefundResult,
    SetupIntentInfo,
    SetupStatus,
)
from payments.models import SandboxObject


@dataclass(frozen=True, slots=True)
class TestCard:
    brand: str
    last4: str
    country: str
    funding: str
    binds: bool = True
    charge_decline: str = ""  # a decline code on every charge
    charge_retryable: bool = True
    authentication: bool = False


TEST_CARDS: dict[str, TestCard] = {
    "pm_card_visa": TestCard("visa", "4242", "US", "credit"),
    "pm_card_mastercard": TestCard("mastercard", "4444", "US", "credit"),
    "pm_card_amex": TestCard("amex", "8431", "US", "credit"),
    "pm_card_visa_debit": TestCard("visa", "5556", "US", "debit"),
    "pm_card_chargeCustomerFail": TestCard("visa", "0341", "US", "credit", charge_decline="card_declined"),
    "pm_card_authenticationRequired": TestCard("visa", "3184", "DE", "credit", authentication=True),
    "pm_card_chargeDeclined": TestCard("visa", "0002", "US", "credit", binds=False),
    "pm_card_visa_chargeDeclinedLostCard": TestCard(
        "visa", "9987", "US", "credit", charge_decline="lost_card", charge_retryable=False
    ),
}


def fingerprint_of(test_payment_method: str) -> str:
    """Stable per test card, like Stripe's per card number."""
    return hashlib.sha256(f"sandbox-card:{test_payment_method}".encode()).hexdigest()[:16]


class SandboxGateway:
    name = "sandbox"
    test_mode = True
    publishable_key = "pk_test_sandbox"

    def __init__(
        self, *, latency_ms: int = 0, failure_rate: float = 0.0, failure_mode: str = "mixed", limiter: Any = None
    ) -> None:
        if failure_mode not in ("mixed", "unavailable", "lost"):
            raise ValueError(f"failure_mode must be mixed, unavailable or lost, not {failure_mode!r}")
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.failure_mode = failure_mode
        self.limiter = limiter
        self._arrived = threading.local()  # per calling thread: when its request arrived

    @classmethod
    def from_settings(cls) -> SandboxGateway:
        from django.conf import settings

        from payments.ratelimit import limiter_for

        return cls(
            latency_ms=settings.SANDBOX_LATENCY_MS,
            failure_rate=settings.SANDBOX_FAILURE_RATE,
            failure_mode=settings.SANDBOX_FAILURE_MODE,
            limiter=limiter_for("sandbox"),
        )

    # --- the network, simulated

    def _call(self, operation: str, key: str) -> bool:
        """Before each call: rate limit, latency, and whether this call fails after doing its
        work (True: raise OutcomeUnknown once done). Raises GatewayUnavailable up front."""
        forbid_transaction("A gateway call")
        # The request leaves when the limiter lets it through and reaches the gateway a latency
        # later: that is when a gateway counts it (its rate limit). Not when this thread wakes
        # from the simulated latency, which on a busy machine is later by our own scheduling,
        # a delay a real request (in the network by then) does not take.
        # (The limiter's moment is on its own clock, Redis's; with no limit, the wall clock,
        # which a test may freeze.)
        limited = self.limiter is not None and self.limiter.per_second > 0
        left_at = self.limiter.acquire() if limited else timezone.now().timestamp()
        left = time.monotonic()
        if self.latency_ms:
            time.sleep(max(0.0, left + self.latency_ms / 1000 - time.monotonic()))
        self._arrived.at = dt.datetime.fromtimestamp(left_at + self.latency_ms / 1000, tz=dt.UTC)
        if not self.failure_rate or not key:
            return False
        draw = int.from_bytes(hashlib.sha256(f"{operation}:{key}".encode()).digest()[:8], "big") / 2**64
        if draw >= self.failure_rate:
            return False
        unavailable = {"mixed": draw < self.failure_rate / 2, "unavailable": True, "lost": False}[self.failure_mode]
        if unavailable:
            raise GatewayUnavailable(f"sandbox: {operation} unavailable (simulated)")
        return True

    # --- storage

    def _put(
        self,
        prefix: str,
        kind: str,
        data: dict[str, Any],
        *,
        customer_id: str = "",
        key: str | None = None,
        finish: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Store a new object (``finish`` completes it once its id is known, before the one
        insert); with an idempotency key seen before, return the first one."""
        object_id = f"{prefix}_sbx{secrets.token_hex(8)}"
        arrived = getattr(self._arrived, "at", None) or timezone.now()
        data = {**data, "id": object_id, "created": int(arrived.timestamp())}
        if finish is not None:
            finish(data)
        # One statement (its own transaction, in autocommit): the idempotency key decides.
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO payments_sandboxobject (object_id, kind, customer_id, idempotency_key, data, created_at) "
                "VALUES (%s, %s, %s, %s, %s::jsonb, %s) ON CONFLICT (idempotency_key) DO NOTHING RETURNING object_id",
                [object_id, kind, customer_id, key, json.dumps(data), arrived],
            )
            if cursor.fetchone() is not None:
                return data
            cursor.execute("SELECT data FROM payments_sandboxobject WHERE idempotency_key = %s", [key])
            row = cursor.fetchone()
        if row is None:  # pragma: no cover - the first one's row is gone
            raise InvalidRequest("idempotency_key_in_use", f"Idempotency key {key} was used and is gone.")
        return _json(row[0])

    def _get(self, object_id: str, kind: str) -> dict[str, Any]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT data FROM payments_sandboxobject WHERE object_id = %s AND kind = %s", [object_id, kind]
            )
            row = cursor.fetchone()
        if row is None:
            raise InvalidRequest("resource_missing", f"No such {kind}: {object_id}")
        return _json(row[0])

    def _save(self, data: dict[str, Any]) -> None:
        SandboxObject.objects.filter(object_id=data["id"]).update(data=data)

    # --- customers and cards

    def customer_create(self, *, account_ref: str, email: str, name: str, idempotency_key: str) -> str:
        lost = self._call("customer", idempotency_key)
        data = self._put("cus", "customer", {"account": account_ref, "name": name}, key=idempotency_key)
        if lost:
            raise OutcomeUnknown("sandbox: answer lost (simulated)")
        return str(data["id"])

    def setup_intent_create(
        self, *, customer_id: str, metadata: dict[str, str], idempotency_key: str
    ) -> SetupIntentInfo:
        self._call("setup_intent", "")
        data = self._put(
            "seti",
            "setup_intent",
            {
                "customer": customer_id,
                "status": SetupStatus.REQUIRES_PAYMENT_METHOD,
                "metadata": metadata,
                "client_secret": f"seti_secret_{secrets.token_hex(12)}",
                "payment_method": "",
                "decline_code": "",
            },
            customer_id=customer_id,
            key=idempotency_key,
        )
        return self._setup_info(data)

    def setup_intent_retrieve(self, intent_id: str) -> SetupIntentInfo:
        self._call("retrieve", "")
        return self._setup_info(self._get(intent_id, "setup_intent"))

    def setup_intent_confirm_test(self, *, intent_id: str, test_payment_method: str) -> SetupIntentInfo:
        self._call("confirm", "")
        data = self._get(intent_id, "setup_intent")
        if data["status"] == SetupStatus.SUCCEEDED:
            return self._setup_info(data)
        card = TEST_CARDS.get(test_payment_method)
        if card is None:
            raise InvalidRequest("payment_method_unknown", f"Not a sandbox test payment method: {test_payment_method}")
        if not card.binds:
            data["decline_code"] = "card_declined"
            self._save(data)
            raise PaymentDeclined("card_declined", retryable=False, message="Your card was declined.")
        now = timezone.now()
        pm = self._put(
            "pm",
            "payment_method",
            {
                "customer": data["customer"],
                "test_card": test_payment_method,
                "brand": card.brand,
                "last4": card.last4,
                "exp_month": 12,
                "exp_year": now.year + 3,
                "fingerprint": fingerprint_of(test_payment_method),
                "country": card.country,
                "funding": card.funding,
            },
            customer_id=data["customer"],
        )
        data.update(status=SetupStatus.SUCCEEDED, payment_method=pm["id"])
        self._save(data)
        return self._setup_info(data)

    def payment_method_retrieve(self, payment_method_id: str) -> PaymentMethodInfo:
        self._call("retrieve", "")
        pm = self._get(payment_method_id, "payment_method")
        return PaymentMethodInfo(
            id=pm["id"],
            customer_id=pm["customer"],
            card=CardFacts(
                brand=pm["brand"],
                last4=pm["last4"],
                exp_month=pm["exp_month"],
                exp_year=pm["exp_year"],
                fingerprint=pm["fingerprint"],
                country=pm["country"],
                funding=pm["funding"],
            ),
        )

    def payment_method_detach(self, payment_method_id: str) -> None:
        self._call("detach", "")
        pm = self._get(payment_method_id, "payment_method")
        pm["customer"] = ""
        self._save(pm)

    # --- charges

    def charge(self, request: ChargeRequest) -> ChargeResult:
        lost = self._call("charge", request.idempotency_key)
        pm = self._get(request.payment_method_id, "payment_method")
        if pm["customer"] != request.customer_id:
            raise InvalidRequest("payment_method_not_attached", "The payment method is not the customer's.")
        card = TEST_CARDS[pm["test_card"]]
        if card.charge_decline:
            status, code = ChargeStatus.FAILED, card.charge_decline
        elif card.authentication:
            status, code = ChargeStatus.REQUIRES_ACTION, ""
        else:
            status, code = ChargeStatus.SUCCEEDED, ""
        intent = self._put(
            "pi",
            "payment_intent",
            {
                "customer": request.customer_id,
                "payment_method": request.payment_method_id,
                "amount": request.amount_minor,
                "currency": request.currency,
                "status": status,
                "metadata": request.metadata,
                "decline_code": code,
                "retryable": card.charge_retryable,
                "charge": "",
                "amount_refunded": 0,
                "client_secret": "",
            },
            customer_id=request.customer_id,
            key=request.idempotency_key,
            finish=_charge_or_secret,
        )
        if intent["status"] == ChargeStatus.SUCCEEDED and not intent["charge"]:
            intent["charge"] = f"ch_sbx{intent['id'][6:]}"
            self._save(intent)
        elif intent["status"] == ChargeStatus.REQUIRES_ACTION and not intent["client_secret"]:
            intent["client_secret"] = f"{intent['id']}_secret_{secrets.token_hex(8)}"
            self._save(intent)
        if lost:
            raise OutcomeUnknown("sandbox: answer lost (simulated)")
        result = self._charge_result(intent)
        if result.status == ChargeStatus.FAILED:
            raise PaymentDeclined(
                result.decline_code,
                retryable=result.retryable,
                message=result.decline_message,
                intent_id=result.intent_id,
            )
        return result

    def payment_intent_retrieve(self, intent_id: str) -> ChargeResult:
        self._call("retrieve", "")
        return self._charge_result(self._get(intent_id, "payment_intent"))

    def payment_intents_for_customer(self, *, customer_id: str, created_since: dt.datetime) -> list[ChargeResult]:
        self._call("list", "")
        rows = SandboxObject.objects.filter(
            customer_id=customer_id, kind="payment_intent", created_at__gte=created_since
        ).order_by("created_at")
        return [self._charge_result(dict(row.data)) for row in rows]

    def payment_intent_cancel(self, intent_id: str) -> ChargeResult:
        self._call("cancel", "")
        intent = self._get(intent_id, "payment_intent")
        if intent["status"] == ChargeStatus.REQUIRES_ACTION:
            intent["status"] = ChargeStatus.CANCELED
            self._save(intent)
        return self._charge_result(intent)

    def authenticate(self, intent_id: str) -> ChargeResult:
        """What the customer's browser does on a ``requires_action`` intent (3-D Secure passed):
        the intent succeeds. Sandbox only, for the demo and tests."""
        intent = self._get(intent_id, "payment_intent")
        if intent["status"] == ChargeStatus.REQUIRES_ACTION:
            intent.update(status=ChargeStatus.SUCCEEDED, charge=f"ch_sbx{intent['id'][6:]}")
            self._save(intent)
        return self._charge_result(intent)

    def refund(self, request: RefundRequest) -> RefundResult:
        lost = self._call("refund", request.idempotency_key)
        with transaction.atomic():  # the sandbox's own bookkeeping, not ours
            row = SandboxObject.objects.select_for_update().filter(object_id=request.intent_id).first()
            if row is None or row.kind != "payment_intent":
                raise InvalidRequest("resource_missing", f"No such payment intent: {request.intent_id}")
            intent = dict(row.data)
            previous = SandboxObject.objects.filter(idempotency_key=request.idempotency_key).first()
            if previous is not None:
                refund = dict(previous.data)
            else:
                if intent["status"] != ChargeStatus.SUCCEEDED:
                    raise InvalidRequest("charge_not_succeeded", "Only a succeeded payment can be refunded.")
                if request.amount_minor > intent["amount"] - intent["amount_refunded"]:
                    raise InvalidRequest("amount_too_large", "The refund exceeds what is left of the charge.")
                refund = {
                    "id": f"re_sbx{secrets.token_hex(8)}",
                    "payment_intent": intent["id"],
                    "amount": request.amount_minor,
                    "currency": request.currency,
                    "status": "succeeded",
                    "metadata": request.metadata,
                }
                SandboxObject.objects.create(
                    object_id=refund["id"],
                    kind="refund",
                    customer_id=intent["customer"],
                    idempotency_key=request.idempotency_key,
                    data=refund,
                )
                intent["amount_refunded"] += request.amount_minor
                row.data = intent
                row.save(update_fields=["data"])
        if lost:
            raise OutcomeUnknown("sandbox: answer lost (simulated)")
        return RefundResult(
            refund_id=refund["id"],
            status=refund["status"],
            amount_minor=refund["amount"],
            currency=refund["currency"],
            intent_id=refund["payment_intent"],
        )

    # --- shapes

    @staticmethod
    def _setup_info(data: dict[str, Any]) -> SetupIntentInfo:
        return SetupIntentInfo(
            id=data["id"],
            status=data["status"],
            customer_id=data["customer"],
            client_secret=data["client_secret"],
            payment_method_id=data["payment_method"],
            metadata=dict(data["metadata"]),
            decline_code=data.get("decline_code", ""),
        )

    @staticmethod
    def _charge_result(intent: dict[str, Any]) -> ChargeResult:
        code = intent["decline_code"]
        return ChargeResult(
            intent_id=intent["id"],
            status=intent["status"],
            amount_minor=intent["amount"],
            currency=intent["currency"],
            charge_id=intent["charge"],
            amount_refunded_minor=intent["amount_refunded"],
            client_secret=intent["client_secret"],
            next_action_url=(
                f"https://sandbox.invalid/3ds/{intent['id']}"
                if intent["status"] == ChargeStatus.REQUIRES_ACTION
                else ""
            ),
            decline_code=code,
            decline_message=DECLINE_MESSAGES.get(code, "Your card was declined.") if code else "",
            retryable=intent["retryable"],
            metadata=dict(intent["metadata"]),
            created_at=dt.datetime.fromtimestamp(intent["created"], tz=dt.UTC),
        )


def _json(value: Any) -> dict[str, Any]:
    """A ``jsonb`` value as read by a raw cursor (text, or already parsed)."""
    return dict(json.loads(value) if isinstance(value, str | bytes) else value)


def _charge_or_secret(intent: dict[str, Any]) -> None:
    """A new intent's charge (succeeded) or client secret (requires_action), stored with it."""
    if intent["status"] == ChargeStatus.SUCCEEDED:
        intent["charge"] = f"ch_sbx{intent['id'][6:]}"
    elif intent["status"] == ChargeStatus.REQUIRES_ACTION:
        intent["client_secret"] = f"{intent['id']}_secret_{secrets.token_hex(8)}"


DECLINE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "lost_card": "Your card was declined.",  # never tell the holder of a lost card why
    "insufficient_funds": "Your card has insufficient funds.",
}
