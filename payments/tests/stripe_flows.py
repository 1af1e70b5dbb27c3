"""Helpers of the webhook, refund and dispute tests on localstripe: the settings that point the
``stripe`` gateway at it, Stripe events signed as Stripe signs them and posted to
``/webhooks/stripe``, raw reads of localstripe's objects (what the dashboard would show), and
delivery of a set of events in order or shuffled, repeated and concurrent."""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from django.test import Client, override_settings

from conftest import in_threads
from payments import gateways, webhooks
from payments.models import Payment, WebhookEvent, WebhookStatus
from payments.tests.stripe_harness import LOCALSTRIPE_KEY, LocalStripe, sign_stripe_payload

WEBHOOK_SECRET = "whsec_payments_tests_0123456789"


@contextlib.contextmanager
def on_stripe(api_base: str, *, timeout: float = 10.0) -> Iterator[None]:
    """New accounts pay through the ``stripe`` gateway, which talks to ``api_base``."""
    with override_settings(
        STRIPE_API_BASE=api_base,
        STRIPE_SECRET_KEY=LOCALSTRIPE_KEY,
        STRIPE_PUBLISHABLE_KEY="pk_test_localstripe",
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_TIMEOUT_SECONDS=timeout,
        PAYMENTS_DEFAULT_GATEWAY="stripe",
    ):
        gateways.reset()
        try:
            yield
        finally:
            gateways.reset()


# --- events


def stripe_event(event_type: str, obj: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
    """An event as Stripe sends it (the fields we read, and the ones the SDK expects)."""
    return {
        "id": event_id or f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


def post_signed(
    body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None, client: Client | None = None
) -> Any:
    header = sign_stripe_payload(body, secret, int(time.time()) if timestamp is None else timestamp)
    return (client or Client()).post(
        "/webhooks/stripe", data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )


def post_event(event: dict[str, Any], **options: Any) -> Any:
    return post_signed(json.dumps(event).encode(), **options)


def deliver_in_order(events: list[dict[str, Any]]) -> None:
    """Each event once, in order (each processed as it is received: the outbox runs inline)."""
    for event in events:
        response = post_event(event)
        assert response.status_code == 200, response.content


def deliver_shuffled(events: list[dict[str, Any]], *, seed: int) -> list[int]:
    """Each event 1 to 5 times, shuffled, every delivery in a thread of its own released together;
    then every stored event processed again by as many workers at once (a redelivered task).
    Returns how many times each event was delivered."""
    rng = random.Random(seed)  # a reproducible shuffle
    times = [rng.randint(1, 5) for _ in events]
    deliveries = [event for event, n in zip(events, times, strict=True) for _ in range(n)]
    rng.shuffle(deliveries)
    statuses = in_threads(len(deliveries), lambda i: post_event(deliveries[i]).status_code)
    assert statuses == [200] * len(deliveries), statuses
    stored = list(WebhookEvent.objects.filter(event_id__in=[e["id"] for e in events]).values_list("id", flat=True))
    assert len(stored) == len(events)
    workers = [pk for pk in stored for _ in range(2)]
    results = in_threads(len(workers), lambda i: webhooks.webhook_event_process(workers[i]))
    assert all(r in (WebhookStatus.PROCESSED, WebhookStatus.IGNORED, "busy") for r in results), results
    return times


# --- localstripe, behind the gateway


def ls_get(localstripe: LocalStripe, path: str) -> dict[str, Any]:
    return dict(json.loads(localstripe.request("GET", path)))


def ls_post(localstripe: LocalStripe, path: str, data: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 server
        localstripe.raw_url + path,
        data=json.dumps(data).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        body = response.read()
    return dict(json.loads(body)) if body else {}


def ls_intent_of(localstripe: LocalStripe, payment: Payment, seconds: float = 10) -> dict[str, Any]:
    """The PaymentIntent localstripe holds for ``payment`` (found by our id in its metadata),
    waited for: a fault proxy records a request when it arrives, before localstripe has it."""
    deadline = time.monotonic() + seconds
    while True:
        intents = ls_get(localstripe, "/v1/payment_intents?limit=100")["data"]
        found = [i for i in intents if (i.get("metadata") or {}).get("payment_id") == payment.public_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, found
    return dict(found[0])


def ls_charge(localstripe: LocalStripe, charge_id: str) -> dict[str, Any]:
    return ls_get(localstripe, f"/v1/charges/{charge_id}")
