"""What we tell customers about a failed payment, by decline code."""

from __future__ import annotations

# Customer-readable words for decline codes (the code itself is in the API too).
DECLINE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "authentication_required": "Your bank asks you to authenticate this payment.",
    "no_payment_method": "No card is bound to this billing account.",
    "gateway_unavailable": "The payment could not be sent; it will be retried.",
    "not_sent": "The payment was never sent; it will be retried.",
}


def customer_message(code: str, gateway_message: str = "") -> str:
    """What we tell the customer about a decline: never why a card is flagged lost or stolen."""
    if code in {"lost_card", "stolen_card", "pickup_card", "fraudulent", "merchant_blacklist"}:
        return "Your card was declined. Please use another card or contact your bank."
    return DECLINE_MESSAGES.get(code) or gateway_message or "Your card was declined."
