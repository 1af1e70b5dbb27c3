"""Reads of the invoicing app shared by the API, the admin and other apps."""

from __future__ import annotations

from collections import defaultdict

from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from invoicing.models import (
    CreditGrant,
    CreditNote,
    Invoice,
    InvoicePayment,
    InvoiceStatus,
    LedgerEntry,
    LedgerSource,
)

CUSTOMER_VISIBLE = (InvoiceStatus.ISSUED, InvoiceStatus.PAID, InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.VOID)


def invoice_list_for_account(*, account_id: int) -> QuerySet[Invoice]:
    """The account's invoices as its members see them: issued ones (drafts are finance's
    previews), newest first, lines prefetched."""
    return (
        Invoice.objects.filter(account_id=account_id, status__in=CUSTOMER_VISIBLE)
        .prefetch_related("lines")
        .order_by("-created_at")
    )


def invoice_get_for_account(*, account_id: int, invoice_id: int) -> Invoice | None:
    return invoice_list_for_account(account_id=account_id).filter(id=invoice_id).first()


def credit_note_list_for_account(*, account_id: int) -> QuerySet[CreditNote]:
    return (
        CreditNote.objects.filter(account_id=account_id)
        .select_related("invoice")
        .prefetch_related("lines")
        .order_by("-issued_at")
    )


def balance(*, account_id: int) -> dict[str, dict[str, int]]:
    """Per currency: spendable credit (unexpired grants' remainder) and amount outstanding
    on issued invoices, in minor units."""
    now = timezone.now()
    result: dict[str, dict[str, int]] = defaultdict(lambda: {"credits_available": 0, "outstanding": 0})
    for currency, remaining in (
        CreditGrant.objects.filter(account_id=account_id, remaining_minor__gt=0)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .values_list("currency")
        .annotate(Sum("remaining_minor"))
    ):
        result[currency]["credits_available"] += remaining
    for invoice in Invoice.objects.filter(account_id=account_id, status=InvoiceStatus.ISSUED):
        result[invoice.currency]["outstanding"] += invoice.amount_outstanding_minor
    return dict(result)


def ledger_entries_for_invoice(*, invoice_id: int) -> QuerySet[LedgerEntry]:
    """Entries whose source is the invoice or a document about it."""
    note_ids = list(CreditNote.objects.filter(invoice_id=invoice_id).values_list("id", flat=True))
    payment_ids = list(InvoicePayment.objects.filter(invoice_id=invoice_id).values_list("id", flat=True))
    return (
        LedgerEntry.objects.filter(
            Q(
                source_type__in=[LedgerSource.INVOICE, LedgerSource.INVOICE_CREDIT, LedgerSource.WRITE_OFF],
                source_id=invoice_id,
            )
            | Q(source_type__in=[LedgerSource.CREDIT_NOTE, LedgerSource.CREDIT_REVERSAL], source_id__in=note_ids)
            | Q(source_type=LedgerSource.PAYMENT, source_id__in=payment_ids)
        )
        .prefetch_related("lines")
        .order_by("posted_at", "id")
    )
