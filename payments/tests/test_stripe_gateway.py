"""The Stripe gateway against a real localstripe over HTTP, through the real SDK (no mocks), and
through a fault proxy for what the network does: 500s, lost answers, stalls, resets, refused
connections, 429s, our own rate limit. The webhook signature check. None of it needs the
database: the gateway never touches it."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
import time_machine
from django.core.exceptions import ImproperlyConfigured

from payments.gateways.base import (
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayUnavailable,
    InvalidRequest,
    OutcomeUnknown,
    PaymentDeclined,
    RateLimited,
    RefundRequest,
    RefundResult,
    SetupStatus,
)
from payments.gateways.stripe import (
    HARD_DECLINES,
    STRIPE_API_VERSION,
    InvalidEvent,
    InvalidSignature,
    StripeGateway,
    webhook_event_construct,
)
from payments.ratelimit import CallRateLimiter, limiter_for
from payments.tests.stripe_harness import (
    FAULT_PROXY_TIMEOUT_SECONDS,
    LOCALSTRIPE_KEY,
    FaultProxy,
    FaultyStripe,
    LocalStripe,
    ProxiedRequest,
    free_port,
    localstripe_gateway,
    sign_stripe_payload,
)

_serial = itertools.count(1)


# --- helpers


def new_customer(gateway: StripeGateway) -> str:
    n = next(_serial)
    return gateway.customer_create(
        account_ref=f"acc_test{n}",
        email=f"owner{n}@example.test",
        name=f"Account {n}",
        idempotency_key=f"cus-{uuid.uuid4()}",
    )


def bind(gateway: StripeGateway, customer_id: str, test_payment_method: str = "pm_card_visa") -> str:
    """A card bound the test way; returns the payment method id."""
    intent = gateway.setup_intent_create(
        customer_id=customer_id, metadata={"account_id": "acc_test"}, idempotency_key=f"seti-{uuid.uuid4()}"
    )
    confirmed = gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method=test_payment_method)
    assert confirmed.status == SetupStatus.SUCCEEDED, confirmed
    return confirmed.payment_method_id


def charge_request(
    customer_id: str, payment_method_id: str, amount_minor: int = 1234, payment_id: str = ""
) -> ChargeRequest:
    payment_id = payment_id or f"pay_{uuid.uuid4().hex[:12]}"
    return ChargeRequest(
        customer_id=customer_id,
        payment_method_id=payment_method_id,
        amount_minor=amount_minor,
        currency="EUR",
        idempotency_key=f"pay-{payment_id}",
        metadata={"payment_id": payment_id, "invoice_id": "inv_test"},
        description="Invoice inv_test",
    )


def an_hour_ago() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)


def intents_paid_for(gateway: StripeGateway, customer_id: str, payment_id: str) -> list[ChargeResult]:
    found = gateway.payment_intents_for_customer(customer_id=customer_id, created_since=an_hour_ago())
    return [intent for intent in found if intent.metadata.get("payment_id") == payment_id]


# --- binding cards


def test_bind_visa_gives_card_facts_and_a_stable_fingerprint(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    intent = stripe_gateway.setup_intent_create(
        customer_id=customer, metadata={"account_id": "acc_1"}, idempotency_key="seti-1"
    )
    assert intent.status == SetupStatus.REQUIRES_PAYMENT_METHOD
    assert intent.customer_id == customer
    assert intent.client_secret.startswith(intent.id)
    assert intent.metadata == {"account_id": "acc_1"}

    confirmed = stripe_gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method="pm_card_visa")
    assert confirmed.status == SetupStatus.SUCCEEDED
    assert confirmed.payment_method_id.startswith("pm_")
    assert stripe_gateway.setup_intent_retrieve(intent.id) == confirmed
    # Confirming again changes nothing.
    assert (
        stripe_gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method="pm_card_visa") == confirmed
    )

    info = stripe_gateway.payment_method_retrieve(confirmed.payment_method_id)
    assert info.id == confirmed.payment_method_id
    assert info.customer_id == customer
    assert (info.card.brand, info.card.last4, info.card.exp_month, info.card.funding) == ("visa", "4242", 12, "credit")
    assert info.card.exp_year >= 2026
    assert info.card.fingerprint

    # The same card bound again (another account): another payment method, the same fingerprint.
    again = stripe_gateway.payment_method_retrieve(bind(stripe_gateway, new_customer(stripe_gateway)))
    assert again.id != info.id
    assert again.card.fingerprint == info.card.fingerprint
    # Another card: another fingerprint.
    other = stripe_gateway.payment_method_retrieve(bind(stripe_gateway, customer, "pm_card_mastercard"))
    assert other.card.last4 == "4444"
    assert other.card.fingerprint != info.card.fingerprint
    assert other.customer_id == customer


@pytest.mark.parametrize("card", ["pm_card_chargeDeclined", "pm_card_visa_chargeDeclined"])
def test_a_card_declined_at_binding_raises_payment_declined(stripe_gateway: StripeGateway, card: str) -> None:
    customer = new_customer(stripe_gateway)
    intent = stripe_gateway.setup_intent_create(customer_id=customer, metadata={}, idempotency_key=f"seti-{card}")
    with pytest.raises(PaymentDeclined) as declined:
        stripe_gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method=card)
    assert declined.value.code == "card_declined"
    assert declined.value.retryable  # a generic decline: the issuer may say yes another time
    assert declined.value.message == "Your card was declined."


def test_test_payment_methods_are_refused_in_live_mode_and_unknown_names_are_invalid(
    stripe_gateway: StripeGateway,
) -> None:
    live = StripeGateway(secret_key="sk_live_not_a_key", api_base=stripe_gateway.api_base)
    assert not live.test_mode
    with pytest.raises(InvalidRequest) as refused:
        live.setup_intent_confirm_test(intent_id="seti_x", test_payment_method="pm_card_visa")
    assert refused.value.code == "test_mode_only"

    intent = stripe_gateway.setup_intent_create(
        customer_id=new_customer(stripe_gateway), metadata={}, idempotency_key="seti-unknown"
    )
    with pytest.raises(InvalidRequest) as unknown:
        stripe_gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method="pm_card_nonsense")
    assert unknown.value.code == "resource_missing"


def test_a_test_card_localstripe_cannot_hold_is_refused_as_unsupported(stripe_gateway: StripeGateway) -> None:
    # The harness's adapter, not the gateway, knows localstripe takes 16-digit numbers only.
    intent = stripe_gateway.setup_intent_create(
        customer_id=new_customer(stripe_gateway), metadata={}, idempotency_key="seti-amex"
    )
    with pytest.raises(InvalidRequest) as refused:
        stripe_gateway.setup_intent_confirm_test(intent_id=intent.id, test_payment_method="pm_card_amex")
    assert refused.value.code == "test_card_unsupported"


def test_from_settings(settings: Any, localstripe: LocalStripe) -> None:
    settings.STRIPE_SECRET_KEY = LOCALSTRIPE_KEY
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_settings"
    settings.STRIPE_API_BASE = localstripe.url
    settings.STRIPE_TIMEOUT_SECONDS = 7.5
    settings.PAYMENTS_GATEWAY_RATE_LIMIT = 50
    gateway = StripeGateway.from_settings()
    assert (gateway.name, gateway.test_mode) == ("stripe", True)
    assert (gateway.publishable_key, gateway.timeout) == ("pk_test_settings", 7.5)
    assert gateway.limiter is not None
    assert gateway.limiter.per_second == 50
    assert LOCALSTRIPE_KEY not in repr(gateway)
    assert new_customer(gateway).startswith("cus_")

    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(ImproperlyConfigured):
        StripeGateway.from_settings()


def test_the_gateway_speaks_stripe_whatever_its_address(fault_proxy: FaultyStripe) -> None:
    # Test keys and an address outside stripe.com (the harness's localstripe) change nothing in
    # what is sent: every parameter Stripe takes, the test card's own name, Stripe's list
    # filters, and no extra request (what localstripe lacks is made up behind the address).
    gateway = fault_proxy.gateway
    customer = new_customer(gateway)
    card = bind(gateway, customer, "pm_card_mastercard")  # a name localstripe does not know
    paid = gateway.charge(charge_request(customer, card, amount_minor=5_000, payment_id="pay_wire"))
    gateway.refund(
        RefundRequest(
            intent_id=paid.intent_id,
            amount_minor=1_000,
            currency="EUR",
            idempotency_key="ref_wire",
            metadata={"refund_id": "ref_wire"},
            reason="requested_by_customer",
        )
    )
    declining = bind(gateway, customer, "pm_card_chargeCustomerFail")
    with pytest.raises(PaymentDeclined) as declined:
        gateway.charge(charge_request(customer, declining, payment_id="pay_wire_declined"))
    assert declined.value.intent_id.startswith("pi_")  # named in the decline itself, as Stripe does
    found = gateway.payment_intents_for_customer(customer_id=customer, created_since=an_hour_ago())
    assert [intent.intent_id for intent in found] == [paid.intent_id, declined.value.intent_id]

    requests = fault_proxy.proxy.requests
    assert [route(request) for request in requests] == [
        "POST /v1/customers",
        "POST /v1/setup_intents",
        "GET /v1/setup_intents/{seti}",
        "POST /v1/setup_intents/{seti}/confirm",
        "POST /v1/payment_intents",
        "POST /v1/refunds",
        "POST /v1/setup_intents",
        "GET /v1/setup_intents/{seti}",
        "POST /v1/setup_intents/{seti}/confirm",
        "POST /v1/payment_intents",
        "GET /v1/payment_intents",
    ]
    _, setup, _, confirm, charge, refund, *_, listing = requests
    assert setup.form()["allowed_payment_method_types[0]"] == ["card"]
    assert confirm.form()["payment_method"] == ["pm_card_mastercard"]
    assert charge.form()["allowed_payment_method_types[0]"] == ["card"]
    assert charge.form()["description"] == ["Invoice inv_test"]
    assert refund.form()["reason"] == ["requested_by_customer"]
    assert listing.form()["customer"] == [customer]
    assert abs(int(listing.form()["created[gte]"][0]) - an_hour_ago().timestamp()) < 60


def route(request: ProxiedRequest) -> str:
    """``METHOD /path`` with each object id replaced by its prefix (``/v1/payment_intents/{pi}``)."""
    return f"{request.method} " + re.sub(r"/(cus|seti|pi|pm|re|ch)_[A-Za-z0-9]+", r"/{\1}", urlsplit(request.path).path)


def test_detach(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    payment_method = bind(stripe_gateway, customer)
    stripe_gateway.payment_method_detach(payment_method)
    assert stripe_gateway.payment_method_retrieve(payment_method).customer_id == ""


# --- charges


def test_charge_succeeds_and_is_found_again(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    request = charge_request(customer, bind(stripe_gateway, customer), amount_minor=12_100, payment_id="pay_ok")
    result = stripe_gateway.charge(request)
    assert result.status == ChargeStatus.SUCCEEDED
    assert (result.amount_minor, result.currency) == (12_100, "EUR")
    assert result.intent_id.startswith("pi_")
    assert result.charge_id.startswith("ch_")
    assert result.client_secret == ""  # only handed out when the customer must act
    assert result.metadata["payment_id"] == "pay_ok"
    assert result.created_at is not None

    again = stripe_gateway.payment_intent_retrieve(result.intent_id)
    assert again.status == ChargeStatus.SUCCEEDED
    assert again.charge_id == result.charge_id
    assert again.metadata == {"payment_id": "pay_ok", "invoice_id": "inv_test"}
    assert again.amount_refunded_minor == 0


def test_a_decline_at_charge_is_retryable_and_names_the_intent(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    payment_method = bind(stripe_gateway, customer, "pm_card_chargeCustomerFail")  # binds, every charge declined
    with pytest.raises(PaymentDeclined) as declined:
        stripe_gateway.charge(charge_request(customer, payment_method, payment_id="pay_declined"))
    assert declined.value.code == "card_declined"
    assert declined.value.retryable
    assert declined.value.intent_id.startswith("pi_")

    seen = stripe_gateway.payment_intent_retrieve(declined.value.intent_id)
    assert seen.status == ChargeStatus.FAILED
    assert seen.decline_code == "card_declined"
    assert seen.metadata["payment_id"] == "pay_declined"


def test_a_card_that_needs_3ds_asks_for_the_customer_and_can_be_cancelled(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    intent = stripe_gateway.setup_intent_create(customer_id=customer, metadata={}, idempotency_key="seti-3ds")
    setup = stripe_gateway.setup_intent_confirm_test(
        intent_id=intent.id, test_payment_method="pm_card_authenticationRequired"
    )
    assert setup.status == SetupStatus.REQUIRES_ACTION  # Stripe too wants 3-D Secure for this card at setup

    result = stripe_gateway.charge(charge_request(customer, setup.payment_method_id, payment_id="pay_3ds"))
    assert result.status == ChargeStatus.REQUIRES_ACTION
    assert result.client_secret.startswith(result.intent_id + "_secret_")
    assert result.charge_id == ""

    cancelled = stripe_gateway.payment_intent_cancel(result.intent_id)
    assert cancelled.status == ChargeStatus.CANCELED
    assert cancelled.client_secret == ""


def test_payment_intents_for_customer_finds_ours_by_metadata(stripe_gateway: StripeGateway) -> None:
    customer, neighbour = new_customer(stripe_gateway), new_customer(stripe_gateway)
    card, neighbours_card = bind(stripe_gateway, customer), bind(stripe_gateway, neighbour)
    first = stripe_gateway.charge(charge_request(customer, card, payment_id="pay_a"))
    second = stripe_gateway.charge(charge_request(customer, card, payment_id="pay_b"))
    stripe_gateway.charge(charge_request(neighbour, neighbours_card, payment_id="pay_c"))

    found = stripe_gateway.payment_intents_for_customer(customer_id=customer, created_since=an_hour_ago())
    assert [intent.intent_id for intent in found] == [first.intent_id, second.intent_id]
    assert [intent.intent_id for intent in intents_paid_for(stripe_gateway, customer, "pay_b")] == [second.intent_id]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert stripe_gateway.payment_intents_for_customer(customer_id=customer, created_since=later) == []


def test_payment_intents_for_customer_reads_every_page(
    stripe_gateway: StripeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer = new_customer(stripe_gateway)
    card = bind(stripe_gateway, customer)
    paid = [stripe_gateway.charge(charge_request(customer, card, amount_minor=100 + i)).intent_id for i in range(5)]
    monkeypatch.setattr("payments.gateways.stripe.PAYMENT_INTENT_PAGE_SIZE", 2)
    found = stripe_gateway.payment_intents_for_customer(customer_id=customer, created_since=an_hour_ago())
    assert [intent.intent_id for intent in found] == paid


def test_refund_in_parts_and_not_beyond_the_charge(stripe_gateway: StripeGateway) -> None:
    customer = new_customer(stripe_gateway)
    paid = stripe_gateway.charge(charge_request(customer, bind(stripe_gateway, customer), amount_minor=10_000))

    def refund(amount: int, key: str) -> RefundResult:
        return stripe_gateway.refund(
            RefundRequest(
                intent_id=paid.intent_id,
                amount_minor=amount,
                currency="EUR",
                idempotency_key=key,
                metadata={"refund_id": key},
                reason="requested_by_customer",
            )
        )

    part = refund(2_500, "ref_1")
    assert (part.status, part.amount_minor, part.currency, part.intent_id) == (
        "succeeded",
        2_500,
        "EUR",
        paid.intent_id,
    )
    assert part.refund_id.startswith("re_")
    assert stripe_gateway.payment_intent_retrieve(paid.intent_id).amount_refunded_minor == 2_500

    with pytest.raises(InvalidRequest):
        refund(7_501, "ref_too_much")
    rest = refund(7_500, "ref_2")
    assert rest.amount_minor == 7_500
    assert stripe_gateway.payment_intent_retrieve(paid.intent_id).amount_refunded_minor == 10_000
    with pytest.raises(InvalidRequest):
        refund(1, "ref_nothing_left")


def test_an_unknown_intent_is_an_invalid_request(stripe_gateway: StripeGateway) -> None:
    with pytest.raises(InvalidRequest) as missing:
        stripe_gateway.payment_intent_retrieve("pi_doesnotexist")
    assert missing.value.code == "resource_missing"


# --- webhooks

SECRET = "whsec_test_secret"
EVENT = {"id": "evt_1", "object": "event", "type": "setup_intent.succeeded", "data": {"object": {"id": "seti_1"}}}


def test_webhook_event_construct_accepts_a_signed_event() -> None:
    payload = json.dumps(EVENT).encode()
    header = sign_stripe_payload(payload, SECRET, int(time.time()))
    event = webhook_event_construct(payload=payload, signature_header=header, secret=SECRET)
    assert event == EVENT
    assert type(event) is dict
    assert type(event["data"]["object"]) is dict


@pytest.mark.parametrize(
    ("case", "header_for"),
    [
        ("altered body", lambda payload: sign_stripe_payload(payload + b" ", SECRET, int(time.time()))),
        ("wrong secret", lambda payload: sign_stripe_payload(payload, "whsec_other", int(time.time()))),
        ("six minutes old", lambda payload: sign_stripe_payload(payload, SECRET, int(time.time()) - 360)),
        ("no signature", lambda payload: f"t={int(time.time())}"),
        ("garbage", lambda payload: "not a signature"),
    ],
)
def test_webhook_event_construct_refuses_what_does_not_verify(case: str, header_for: Callable[[bytes], str]) -> None:
    payload = json.dumps(EVENT).encode()
    with pytest.raises(InvalidSignature):
        webhook_event_construct(payload=payload, signature_header=header_for(payload), secret=SECRET)


def test_webhook_event_construct_refuses_an_empty_secret_and_a_body_that_is_no_event() -> None:
    payload = json.dumps(EVENT).encode()
    with pytest.raises(InvalidSignature):
        webhook_event_construct(payload=payload, signature_header=sign_stripe_payload(payload, "", 1), secret="")
    not_json = b"{not json"
    with pytest.raises(InvalidEvent):  # signed, so the signature is fine: the body is what is wrong
        webhook_event_construct(
            payload=not_json, signature_header=sign_stripe_payload(not_json, SECRET, int(time.time())), secret=SECRET
        )


# --- the network failing (fault proxy)


def test_every_request_carries_the_pinned_version_and_an_idempotency_key(fault_proxy: FaultyStripe) -> None:
    customer = new_customer(fault_proxy.gateway)
    fault_proxy.gateway.payment_method_retrieve(bind(fault_proxy.gateway, customer))
    requests = fault_proxy.proxy.requests
    assert requests
    assert {request.stripe_version for request in requests} == {STRIPE_API_VERSION}
    # The pin is the SDK's own version, the one its request and response types describe: upgrading
    # the SDK fails here until the pin (and what we parse) has been reviewed.
    from payments.gateways import stripe as stripe_module

    assert stripe_module.stripe.api_version == STRIPE_API_VERSION
    assert all(request.idempotency_key for request in requests)


def test_a_500_is_outcome_unknown(fault_proxy: FaultyStripe) -> None:
    fault_proxy.proxy.inject("500")
    with pytest.raises(OutcomeUnknown):
        fault_proxy.gateway.customer_create(account_ref="acc_x", email="x@example.test", name="X", idempotency_key="k")
    assert len(fault_proxy.proxy.requests) == 1  # not retried: only a 429 is
    assert new_customer(fault_proxy.gateway).startswith("cus_")  # and the next call goes through


def test_an_answer_dropped_after_the_charge_is_outcome_unknown_and_reconciles_to_one_intent(
    fault_proxy: FaultyStripe,
) -> None:
    gateway = fault_proxy.gateway
    customer = new_customer(gateway)
    card = bind(gateway, customer)
    fault_proxy.proxy.inject("drop_after")
    with pytest.raises(OutcomeUnknown):
        gateway.charge(charge_request(customer, card, amount_minor=4_200, payment_id="pay_lost"))

    found = intents_paid_for(gateway, customer, "pay_lost")
    assert len(found) == 1
    assert found[0].status == ChargeStatus.SUCCEEDED
    assert found[0].amount_minor == 4_200


def test_a_stalled_answer_is_outcome_unknown_after_the_timeout(fault_proxy: FaultyStripe) -> None:
    gateway = fault_proxy.gateway
    customer = new_customer(gateway)
    card = bind(gateway, customer)
    fault_proxy.proxy.inject("stall")
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown):
        gateway.charge(charge_request(customer, card, payment_id="pay_stalled"))
    assert FAULT_PROXY_TIMEOUT_SECONDS * 0.9 <= time.monotonic() - started < FAULT_PROXY_TIMEOUT_SECONDS * 2.5
    assert len(intents_paid_for(gateway, customer, "pay_stalled")) == 1  # it happened all the same


@pytest.mark.parametrize(("fault", "charged"), [("reset", 0), ("reset_after", 1)])
def test_a_reset_connection_is_outcome_unknown_whether_or_not_the_request_got_through(
    fault_proxy: FaultyStripe, fault: str, charged: int
) -> None:
    # Seen from the client both look the same: the request was sent, no answer came. Only a
    # connection that was never made is GatewayUnavailable.
    gateway = fault_proxy.gateway
    customer = new_customer(gateway)
    card = bind(gateway, customer)
    fault_proxy.proxy.inject(fault)
    with pytest.raises(OutcomeUnknown):
        gateway.charge(charge_request(customer, card, payment_id=f"pay_{fault}"))
    assert len(intents_paid_for(gateway, customer, f"pay_{fault}")) == charged


def test_a_refused_connection_is_gateway_unavailable() -> None:
    gateway = localstripe_gateway(f"http://127.0.0.1:{free_port()}", timeout=1.5)
    with pytest.raises(GatewayUnavailable):
        gateway.customer_create(account_ref="acc_x", email="x@example.test", name="X", idempotency_key="k")
    with pytest.raises(GatewayUnavailable):
        gateway.charge(charge_request("cus_x", "pm_x"))


def test_a_rejected_key_is_gateway_unavailable(fault_proxy: FaultyStripe) -> None:
    fault_proxy.proxy.inject(
        "respond", status=401, body={"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}
    )
    with pytest.raises(GatewayUnavailable):
        fault_proxy.gateway.payment_intent_retrieve("pi_x")


def test_429s_are_retried_with_the_same_idempotency_key(fault_proxy: FaultyStripe) -> None:
    fault_proxy.proxy.inject("429", times=2)
    customer = fault_proxy.gateway.customer_create(
        account_ref="acc_429", email="r@example.test", name="R", idempotency_key="customer-acc_429"
    )
    assert customer.startswith("cus_")
    requests = fault_proxy.proxy.requests
    assert [(r.method, r.path, r.fault) for r in requests] == [
        ("POST", "/v1/customers", "429"),
        ("POST", "/v1/customers", "429"),
        ("POST", "/v1/customers", ""),
    ]
    assert {r.idempotency_key for r in requests} == {"customer-acc_429"}


def test_429s_beyond_the_retries_are_rate_limited_and_keep_one_generated_key(localstripe: LocalStripe) -> None:
    with FaultProxy(localstripe.url) as proxy:
        gateway = localstripe_gateway(proxy.url, rate_limit_retries=2)
        proxy.inject("429", times=None)
        with pytest.raises(RateLimited):
            gateway.payment_method_detach("pm_x")  # no key from the caller: one is made, once
        requests = proxy.requests
    assert len(requests) == 3
    assert len({r.idempotency_key for r in requests}) == 1
    assert requests[0].idempotency_key.startswith("payment_method_detach-")


def test_hard_and_soft_declines_on_the_wire(fault_proxy: FaultyStripe) -> None:
    # What Stripe answers and localstripe cannot say: a decline code, and the intent in the error.
    def card_error(decline_code: str, **extra: object) -> dict[str, object]:
        return {
            "error": {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline_code,
                "message": "Your card was declined.",
                **extra,
            }
        }

    gateway = fault_proxy.gateway
    fault_proxy.proxy.inject("respond", status=402, body=card_error("lost_card", payment_intent={"id": "pi_lost"}))
    with pytest.raises(PaymentDeclined) as hard:
        gateway.charge(charge_request("cus_x", "pm_x"))
    assert (hard.value.code, hard.value.retryable, hard.value.intent_id) == ("lost_card", False, "pi_lost")
    assert "lost_card" in HARD_DECLINES

    for soft in ("insufficient_funds", "do_not_honor", "generic_decline"):
        fault_proxy.proxy.inject("respond", status=402, body=card_error(soft))
        with pytest.raises(PaymentDeclined) as declined:
            gateway.charge(charge_request("cus_x", "pm_x"))
        assert (declined.value.code, declined.value.retryable) == (soft, True)


def test_authentication_required_off_session_is_no_decline(fault_proxy: FaultyStripe) -> None:
    intent = {
        "id": "pi_3ds",
        "object": "payment_intent",
        "status": "requires_payment_method",
        "amount": 1234,
        "currency": "eur",
        "client_secret": "pi_3ds_secret_abc",
        "metadata": {"payment_id": "pay_3ds"},
        "latest_charge": "ch_3ds",
        "created": int(time.time()),
        "last_payment_error": {"code": "authentication_required", "decline_code": "authentication_required"},
    }
    body = {
        "error": {
            "type": "card_error",
            "code": "authentication_required",
            "decline_code": "authentication_required",
            "message": "Your card was declined. This transaction requires authentication.",
            "payment_intent": intent,
        }
    }
    fault_proxy.proxy.inject("respond", status=402, body=body)
    result = fault_proxy.gateway.charge(charge_request("cus_x", "pm_x"))
    assert result.status == ChargeStatus.REQUIRES_ACTION
    assert (result.intent_id, result.client_secret) == ("pi_3ds", "pi_3ds_secret_abc")
    assert result.metadata == {"payment_id": "pay_3ds"}


# --- our own rate limit


def start_of_next_second() -> None:
    """Sleep until just after a second starts, so a test's windows are whole seconds."""
    now = time.time()
    time.sleep(int(now) + 1 - now + 0.01)


def test_the_limiter_keeps_every_second_under_the_limit_at_the_gateway(fault_proxy: FaultyStripe) -> None:
    """Every call of the Stripe gateway leaves through the limiter: no wall-clock second holds
    more than the limit of departures, and the calls reach the wire spread over the seconds
    that takes. (Departures, as the limiter hands them out, not the proxy's arrival stamps: on
    a starved machine a proxy thread scheduled late stamps requests that left apart as one
    bunch, which is the machine's scheduling, not what the client sent.)"""
    departures: list[float] = []

    class Recording(CallRateLimiter):
        def acquire(self) -> float:
            left_at = super().acquire()
            departures.append(left_at)
            return left_at

    limiter = Recording(f"stripe-test-{uuid.uuid4().hex[:8]}", 5)
    gateway = localstripe_gateway(fault_proxy.proxy.url, limiter=limiter)
    start_of_next_second()
    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(lambda i: new_customer(gateway), range(20)))
    assert len(set(ids)) == 20
    assert len(departures) == len(fault_proxy.proxy.requests) == 20  # one departure per call sent
    per_second = Counter(int(at) for at in departures)
    assert max(per_second.values()) <= 5, per_second
    assert len(per_second) >= 4
    assert len({int(request.at) for request in fault_proxy.proxy.requests}) >= 4  # spread on the wire too


def test_no_limit_when_per_second_is_zero_or_less() -> None:
    for per_second in (0, -1):
        limiter = CallRateLimiter("unlimited", per_second)
        started = time.monotonic()
        for _ in range(1000):
            limiter.acquire()
        assert time.monotonic() - started < 1


def test_a_frozen_clock_cannot_hang_the_limiter() -> None:
    limiter = CallRateLimiter("frozen", 4)
    with time_machine.travel(dt.datetime(2026, 11, 3, 9, 0, 0, 500_000, tzinfo=dt.UTC), tick=False):
        started = time.monotonic()
        for _ in range(5):  # spaced a quarter of a second apart, on a clock time-machine does not stop
            limiter.acquire()
        waited = time.monotonic() - started
    assert 0.9 <= waited < 2


def test_calls_are_spaced_so_that_no_second_anywhere_holds_more_than_the_limit() -> None:
    limiter = CallRateLimiter("spaced", 20)
    stamps: list[float] = []
    lock = threading.Lock()

    def call(_: int) -> None:
        limiter.acquire()
        with lock:
            stamps.append(time.monotonic())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(call, range(50)))
    stamps.sort()
    # Any window of one second, wherever it starts (as the gateway sees them a latency later).
    busiest = max(sum(1 for t in stamps if start <= t < start + 1) for start in stamps)
    assert busiest <= 20, busiest
    assert stamps[-1] - stamps[0] >= 49 / 20  # and at most the limit's pace (97 % of it)


def test_limiter_for_reads_the_setting(settings: Any) -> None:
    settings.PAYMENTS_GATEWAY_RATE_LIMIT = 7
    settings.REDIS_URL = ""
    limiter = limiter_for("stripe")
    assert (limiter.name, limiter.per_second, limiter.redis_url) == ("stripe", 7, "")
    assert limiter_for("stripe") is limiter
    settings.PAYMENTS_GATEWAY_RATE_LIMIT = 0
    assert limiter_for("stripe").per_second == 0


@pytest.mark.redis
def test_processes_sharing_redis_share_the_window(redis_url: str) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    # Two limiters with the same name stand for two processes: only Redis is shared.
    limiters = [CallRateLimiter(name, 4, redis_url=redis_url) for _ in range(2)]
    stamps: list[float] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        limiters[i % 2].acquire()
        with lock:
            stamps.append(time.time())

    start_of_next_second()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(call, range(12)))
    per_second = Counter(int(stamp) for stamp in stamps)
    assert sum(per_second.values()) == 12
    assert max(per_second.values()) <= 4, per_second


def test_a_limiter_whose_redis_is_down_limits_locally() -> None:
    limiter = CallRateLimiter("no-redis", 100, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for _ in range(5):
        limiter.acquire()
    assert limiter.calls_local == 5  # spaced by the in-process schedule
