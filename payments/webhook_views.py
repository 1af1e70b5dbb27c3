"""``POST /webhooks/stripe``: Stripe's events reach us here.

A plain Django view (no session, no CSRF, no DRF authentication: the signature is the
authentication). The signature is verified over the raw body with the endpoint's secret and a
5-minute tolerance either way (``payments.gateways.stripe.webhook_event_construct``); anything
that does not verify (no header, a wrong secret, an altered body, a timestamp too old or too far
ahead) is answered 400 ``invalid_signature``, and a verified body that is not an event we can
store (not UTF-8 JSON, nested deeper than 64 levels, no string id or type, ``data.object`` not
an object, NUL bytes or lone surrogates anywhere: ``webhooks.event_checked``) 400
``invalid_event`` with the reason; nothing is stored either way. A verified event is stored once and its processing
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
        from payments.gateways.stripe import InvalidEvent, InvalidSignature, webhook_event_construct

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
        except InvalidEvent as exc:
            log.warning("webhook.refused", extra={"gateway": "stripe", "code": "invalid_event", "why": exc.message})
            return _refused("invalid_event", f"The body is not a Stripe event: {exc.message}.")
        try:
            received = webhooks.webhook_event_store(gateway="stripe", event=event)
        except ApplicationError as exc:  # signed, but not an event we can store (see webhooks.event_checked)
            log.warning("webhook.refused", extra={"gateway": "stripe", "code": exc.code, "why": exc.message})
            return _refused(exc.code, exc.message)
        return JsonResponse({"received": True, "duplicate": not received.created})
