"""``POST /webhooks/stripe``: Stripe's events reach us here.

A plain Django view (no session, no CSRF, no DRF authentication: the signature is the
authentication). The signature is verified over the raw body with the endpoint's secret and a
5-minute tolerance (``payments.gateways.stripe.webhook_event_construct``); anything that does
not verify (no header, a wrong secret, an altered body, an old timestamp) is answered 400 with
a stable ``code`` and nothing is stored. A verified event is stored once and its processing
queued in the same transaction (``webhooks.webhook_event_store``), then answered 200 at once:
Stripe retries what is not answered 2xx within seconds, so nothing slow happens here.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from billing_site.common.errors import ApplicationError
from payments import webhooks

log = logging.getLogger(__name__)


def _refused(code: str, detail: str) -> JsonResponse:
    return JsonResponse({"code": code, "detail": detail}, status=400)


@method_decorator(csrf_exempt, name="dispatch")
class StripeWebhookView(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        from payments.gateways.stripe import InvalidSignature, webhook_event_construct

        header = request.headers.get("Stripe-Signature", "")
        if not header:
            log.warning("webhook.refused", extra={"gateway": "stripe", "code": "missing_signature"})
            return _refused("missing_signature", "The Stripe-Signature header is missing.")
        if not settings.STRIPE_WEBHOOK_SECRET:
            log.error("webhook.refused", extra={"gateway": "stripe", "code": "not_configured"})
            return _refused("invalid_signature", "The signature could not be verified.")
        try:
            event = webhook_event_construct(
                payload=request.body,
                signature_header=header,
                secret=settings.STRIPE_WEBHOOK_SECRET,
                tolerance_seconds=300,
            )
        except InvalidSignature as exc:
            log.warning("webhook.refused", extra={"gateway": "stripe", "code": "invalid_signature", "why": exc.message})
            return _refused("invalid_signature", "The signature could not be verified.")
        except (AttributeError, TypeError, ValueError):  # signed, but not an event (a JSON list …)
            log.warning("webhook.refused", extra={"gateway": "stripe", "code": "invalid_event"})
            return _refused("invalid_event", "The body is not a Stripe event.")
        try:
            received = webhooks.webhook_event_store(gateway="stripe", event=event)
        except ApplicationError as exc:
            return _refused(exc.code, exc.message)
        return JsonResponse({"received": True, "duplicate": not received.created})
