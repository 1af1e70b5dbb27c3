"""Output shapes of the invoicing API. Money is a decimal string with exactly the currency's
minor-unit places ("12.30" EUR, "1230" JPY)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing_site.common import ids, money
from invoicing.line_display import detail_view, quantity_text, unit_price_text
from invoicing.models import CreditNote, Invoice, InvoiceKind, InvoiceLine, InvoiceStatus


class MoneyField(serializers.Field):
    """An ``*_minor`` attribute shown in major units with the currency's places."""

    def __init__(self, source_minor: str, **kwargs: Any) -> None:
        self.source_minor = source_minor
        super().__init__(source="*", read_only=True, **kwargs)

    def to_representation(self, obj: Any) -> str:
        return money.format_minor(getattr(obj, self.source_minor), obj.currency)


extend_schema_field({"type": "string", "format": "decimal", "example": "12.30"})(MoneyField)


class InvoiceLineSerializer(serializers.Serializer):
    position = serializers.IntegerField()
    kind = serializers.CharField()
    sku = serializers.CharField()
    usage_month = serializers.SerializerMethodField()
    description = serializers.CharField()
    quantity = serializers.SerializerMethodField(
        help_text="Decimal string rounded half-up to at most 6 places, no trailing zeros (744, 122316.2); "
        "the amount is computed from the unrounded quantity"
    )
    unit = serializers.CharField()
    unit_price = serializers.SerializerMethodField()
    pricing = serializers.CharField(help_text="flat | tiered | varied (the price changed in the period)")
    amount = serializers.SerializerMethodField()
    detail = serializers.SerializerMethodField(
        help_text="The line's amount split by resource and by `project` label: "
        '{"resources": [{"key", "quantity", "amount"}], "projects": [...]}; each split sums to the line'
    )

    def get_usage_month(self, line: InvoiceLine) -> str | None:
        return f"{line.usage_month:%Y-%m}" if line.usage_month else None

    def get_quantity(self, line: InvoiceLine) -> str | None:
        return quantity_text(line.quantity)

    def get_unit_price(self, line: InvoiceLine) -> str | None:
        return unit_price_text(line.unit_price)

    def get_amount(self, line: InvoiceLine) -> str:
        return money.format_minor(line.amount_minor, self.context["currency"])

    @extend_schema_field(
        {
            "type": "object",
            "additionalProperties": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string"},
                        "quantity": {"type": "string"},
                        "amount": {"type": "string"},
                    },
                },
            },
        }
    )
    def get_detail(self, line: InvoiceLine) -> dict[str, Any]:
        return detail_view(line.detail, line.amount_minor, self.context["currency"])


class SellerSerializer(serializers.Serializer):
    """The seller as printed on the document, snapshotted when it was issued."""

    name = serializers.CharField()
    address = serializers.ListField(child=serializers.CharField())
    country = serializers.CharField()
    vat_id = serializers.CharField()
    # Snapshots taken before these were configured lack them: shown as "".
    registration_id = serializers.CharField(default="", help_text="Company registration number (NL: KvK)")
    email = serializers.CharField()
    iban = serializers.CharField(default="", help_text="Where to pay, compact form")
    bic = serializers.CharField(default="")
    bank_name = serializers.CharField(default="")


class InvoiceSerializer(serializers.Serializer):
    id = serializers.SerializerMethodField()
    number = serializers.CharField()
    status = serializers.ChoiceField(choices=InvoiceStatus.choices)
    kind = serializers.ChoiceField(
        choices=InvoiceKind.choices,
        help_text="`period`: the month's invoice; `threshold`: an early invoice of the usage so far, "
        "issued when the account reached its credit limit and due at once",
    )
    period_start = serializers.DateField()
    period_end = serializers.DateField(
        help_text="Exclusive: the first day after the period (a threshold invoice's: the day after its issue)"
    )
    currency = serializers.CharField()
    seller = SellerSerializer(read_only=True)
    lines = serializers.SerializerMethodField()
    subtotal = MoneyField("subtotal_minor")
    tax_rate = serializers.DecimalField(max_digits=5, decimal_places=2, help_text="Percent")
    tax_treatment = serializers.CharField()
    tax_note = serializers.CharField()
    tax = MoneyField("tax_minor")
    total = MoneyField("total_minor")
    credits_applied = MoneyField("credits_applied_minor")
    amount_due = MoneyField("amount_due_minor")
    amount_paid = MoneyField("amount_paid_minor")
    amount_credited = MoneyField("amount_credited_minor")
    amount_refunded = MoneyField("amount_refunded_minor")
    amount_outstanding = MoneyField("amount_outstanding_minor")
    issued_at = serializers.DateTimeField()
    due_at = serializers.DateTimeField()
    paid_at = serializers.DateTimeField(allow_null=True)

    def get_id(self, invoice: Invoice) -> str:
        return invoice.public_id

    @extend_schema_field(InvoiceLineSerializer(many=True))
    def get_lines(self, invoice: Invoice) -> Any:
        return InvoiceLineSerializer(invoice.lines.all(), many=True, context={"currency": invoice.currency}).data


class CreditNoteLineSerializer(serializers.Serializer):
    position = serializers.IntegerField()
    description = serializers.CharField()
    amount = serializers.SerializerMethodField()

    def get_amount(self, line: Any) -> str:
        return money.format_minor(line.amount_minor, self.context["currency"])


class CreditNoteSerializer(serializers.Serializer):
    id = serializers.SerializerMethodField()
    number = serializers.CharField()
    invoice = serializers.SerializerMethodField()
    invoice_number = serializers.CharField(source="invoice.number")
    currency = serializers.CharField()
    seller = SellerSerializer(source="invoice.seller", read_only=True)
    reason = serializers.CharField()
    lines = serializers.SerializerMethodField()
    subtotal = MoneyField("subtotal_minor")
    tax = MoneyField("tax_minor")
    total = MoneyField("total_minor")
    issued_at = serializers.DateTimeField()

    def get_id(self, note: CreditNote) -> str:
        return note.public_id

    def get_invoice(self, note: CreditNote) -> str:
        return ids.encode("inv", note.invoice_id)

    @extend_schema_field(CreditNoteLineSerializer(many=True))
    def get_lines(self, note: CreditNote) -> Any:
        return CreditNoteLineSerializer(note.lines.all(), many=True, context={"currency": note.currency}).data


class BalanceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    credits_available = serializers.CharField(help_text="Unexpired credit, decimal string")
    outstanding = serializers.CharField(help_text="Owed on issued invoices, decimal string")


def balance_rows(balances: dict[str, dict[str, int]]) -> list[dict[str, str]]:
    return [
        {
            "currency": currency,
            "credits_available": money.format_minor(amounts["credits_available"], currency),
            "outstanding": money.format_minor(amounts["outstanding"], currency),
        }
        for currency, amounts in sorted(balances.items())
    ]
