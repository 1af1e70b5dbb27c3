"""Shapes of the payments API. Money as decimal strings with the currency's places; cards by
brand, last four digits and expiry only (never a fingerprint)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from billing_site.common import ids, money
from billing_site.common.serializers import StrictSerializer
from payments.models import Payment, PaymentMethod, PaymentStatus, Refund


class NoBodySerializer(StrictSerializer):
    """The body of an endpoint that takes none: nothing, or ``{}``. Any field is an
    ``unknown_field`` (``{"payment_method": …}`` on ``/pay`` is refused, not silently ignored
    while the default card is charged); a body that is not a JSON object is ``invalid``."""


class BindingStartSerializer(serializers.Serializer):
    gateway = serializers.CharField()
    setup_intent_id = serializers.CharField()
    client_secret = serializers.CharField()
    publishable_key = serializers.CharField()


class BindingCompleteSerializer(StrictSerializer):
    setup_intent_id = serializers.CharField(max_length=64)
    test_payment_method = serializers.CharField(
        max_length=64,
        required=False,
        help_text="Test mode only: confirm server-side with a test payment method such as pm_card_visa.",
    )


class PaymentMethodSerializer(serializers.Serializer):
    id = serializers.SerializerMethodField()
    gateway = serializers.CharField()
    brand = serializers.CharField()
    last4 = serializers.CharField()
    exp_month = serializers.IntegerField()
    exp_year = serializers.IntegerField()
    default = serializers.BooleanField(source="is_default")
    created_at = serializers.DateTimeField()

    def get_id(self, method: PaymentMethod) -> str:
        return method.public_id


class PaymentSerializer(serializers.Serializer):
    id = serializers.SerializerMethodField()
    invoice = serializers.SerializerMethodField()
    attempt = serializers.IntegerField()
    trigger = serializers.CharField()
    status = serializers.ChoiceField(choices=PaymentStatus.choices)
    amount = serializers.SerializerMethodField()
    currency = serializers.CharField()
    amount_refunded = serializers.SerializerMethodField()
    payment_method = serializers.SerializerMethodField()
    decline_code = serializers.CharField(allow_blank=True)
    message = serializers.CharField(source="decline_message", allow_blank=True)
    client_secret = serializers.SerializerMethodField(
        help_text="Only while the payment requires the customer's authentication."
    )
    next_action_url = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_id(self, payment: Payment) -> str:
        return payment.public_id

    def get_invoice(self, payment: Payment) -> str:
        return ids.encode("inv", payment.invoice_id)

    def get_amount(self, payment: Payment) -> str:
        return money.format_minor(payment.amount_minor, payment.currency)

    def get_amount_refunded(self, payment: Payment) -> str:
        return money.format_minor(payment.amount_refunded_minor, payment.currency)

    def get_payment_method(self, payment: Payment) -> str | None:
        return ids.encode("pmt", payment.payment_method_id) if payment.payment_method_id else None

    def get_client_secret(self, payment: Payment) -> str | None:
        return payment.client_secret or None if payment.status == PaymentStatus.REQUIRES_ACTION else None

    def get_next_action_url(self, payment: Payment) -> str | None:
        return payment.next_action_url or None if payment.status == PaymentStatus.REQUIRES_ACTION else None


class RefundSerializer(serializers.Serializer):
    id = serializers.SerializerMethodField()
    payment = serializers.SerializerMethodField()
    invoice = serializers.SerializerMethodField()
    amount = serializers.SerializerMethodField()
    currency = serializers.CharField()
    status = serializers.CharField()
    reason = serializers.CharField()
    credit_note = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    def get_id(self, refund: Refund) -> str:
        return refund.public_id

    def get_payment(self, refund: Refund) -> str:
        return ids.encode("pay", refund.payment_id)

    def get_invoice(self, refund: Refund) -> str:
        return ids.encode("inv", refund.invoice_id)

    def get_amount(self, refund: Refund) -> str:
        return money.format_minor(refund.amount_minor, refund.currency)

    def get_credit_note(self, refund: Refund) -> str | None:
        return ids.encode("crn", refund.credit_note_id) if refund.credit_note_id else None


class DunningInvoiceSerializer(serializers.Serializer):
    invoice = serializers.CharField()
    status = serializers.CharField()
    amount_outstanding = serializers.CharField()
    currency = serializers.CharField()
    due_at = serializers.DateTimeField(allow_null=True)
    first_failure_at = serializers.DateTimeField()
    retries_done = serializers.IntegerField()
    next_retry_at = serializers.DateTimeField(allow_null=True)
    suspension_at = serializers.DateTimeField(allow_null=True)
    write_off_at = serializers.DateTimeField(allow_null=True)
    last_decline_code = serializers.CharField(allow_blank=True)


class DunningStateSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["none", "retrying", "suspended", "paused", "written_off"])
    paused = serializers.BooleanField()
    invoices = DunningInvoiceSerializer(many=True)


def dunning_state_data(state: Any) -> dict[str, Any]:
    return DunningStateSerializer(state).data
