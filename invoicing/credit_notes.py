"""Credit notes: by lines (finance), for a refunded gross (the payments app's refunds, inside
its transaction: ``refund_record``), or for all that is left (a void); taxed by the invoice's
rule (``taxes.rule_tax`` / ``taxes.split_gross``), posted to the ledger, and what they credit
beyond what was owed settled as customer credit."""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict
from billing_site.common.on_commit import queue_task
from billing_site.common.transactions import require_transaction
from invoicing import ledger, numbering, taxes
from invoicing.credit_grants import credit_grant_write
from invoicing.models import (
    CreditApplication,
    CreditGrant,
    CreditKind,
    CreditNote,
    CreditNoteLine,
    Invoice,
    InvoiceRefund,
    InvoiceStatus,
    LedgerSource,
    RefundMethod,
)
from invoicing.planning import family_of
from invoicing.writing import insert_once, locked_invoice, require_reason, require_reference, save_settled

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreditNoteLineIn:
    description: str
    amount_minor: int  # net of tax, > 0
    sku: str = ""


SETTLE_CREDIT = "credit"


@audited
def credit_note_issue(
    *, invoice_id: int, lines: list[CreditNoteLineIn], reason: str, actor: Actor, settle: str | None = None
) -> CreditNote:
    """A credit note against an issued or paid invoice (net by lines, tax by the cumulative
    rule). What it credits beyond what is still owed is settled in the same transaction, so
    no negative receivable is left: as customer credit (a grant of kind ``overpayment``; its
    ledger entry: receivable debit, customer credit credit), recorded as an ``InvoiceRefund``
    of method ``credit``. On a paid invoice that needs ``settle="credit"`` (a refund to the
    card is the payments app's: it refunds at the gateway and calls ``refund_record``); on an
    issued, partly paid invoice the excess is settled so without asking. An issued invoice
    left owing nothing is ``paid``."""
    if settle not in (None, SETTLE_CREDIT):
        raise ApplicationError("invalid", "settle is 'credit' or omitted.", field="settle")
    reason = require_reason(reason)
    with transaction.atomic(durable=True):
        invoice = locked_invoice(invoice_id)
        require_creditable(invoice)
        tax, rest = lines_tax(invoice, lines)
        if invoice.status == InvoiceStatus.PAID and settle != SETTLE_CREDIT:
            raise Conflict(
                "settlement_required",
                "The invoice is paid: settle the credit note as customer credit, "
                "or refund the card from Payments → Refund.",
                field="settle",
            )
        now = timezone.now()
        note = credit_note_write(invoice, lines=lines, tax=tax, reason=reason, actor=actor, rest=rest, now=now)
        settle_to_credit(invoice, note=note, actor=actor, now=now)
        save_settled(
            invoice,
            actor=actor,
            reason=f"settled by credit note {note.number}",
            now=now,
            fields=["amount_credited_minor", "amount_refunded_minor"],
        )
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    return note


def credited(invoice: Invoice) -> tuple[int, int]:
    """Net and tax already credited on ``invoice`` by its credit notes."""
    totals = CreditNote.objects.filter(invoice=invoice).aggregate(net=Sum("subtotal_minor"), tax=Sum("tax_minor"))
    return totals["net"] or 0, totals["tax"] or 0


def require_creditable(invoice: Invoice) -> None:
    if not invoice.can_credit():
        raise Conflict(
            "invalid_transition", f"Credit notes need an issued or paid invoice; this one is {invoice.status}."
        )


def lines_tax(invoice: Invoice, lines: list[CreditNoteLineIn]) -> tuple[int, bool]:
    """The tax of a credit note of ``lines`` (net) on ``invoice``, and whether it credits the
    rest of the invoice. Tax: the invoice's rate on all the net credited so far, rounded
    once, minus the tax already credited, kept within what is left of the invoice's tax;
    crediting the rest of the invoice takes exactly the rest of its tax. So credit notes in
    parts never reverse more (or less) VAT than the invoice charged."""
    if not lines or any(line.amount_minor <= 0 or not line.description.strip() for line in lines):
        raise ApplicationError("invalid", "Each line needs a description and a positive amount.", field="lines")
    net = sum(line.amount_minor for line in lines)
    credited_net, credited_tax = credited(invoice)
    if net > invoice.subtotal_minor - credited_net:
        raise ApplicationError(
            "invalid_amount",
            f"At most {invoice.subtotal_minor - credited_net} (minor units, net) is left to credit on this invoice.",
            field="lines",
        )
    if net == invoice.subtotal_minor - credited_net:
        return invoice.tax_minor - credited_tax, True
    tax = taxes.rule_tax(
        credited_net + net, rate=invoice.tax_rate, credited_tax=credited_tax, invoice_tax=invoice.tax_minor
    )
    return tax, False


def credit_note_write(
    invoice: Invoice,
    *,
    lines: list[CreditNoteLineIn],
    tax: int,
    reason: str,
    actor: Actor,
    rest: bool,
    now: dt.datetime,
    note_id: int | None = None,
) -> CreditNote:
    """Number and write a credit note of ``lines`` (net) and ``tax`` on ``invoice`` (locked)
    and post it: revenue per family and VAT debited, the receivable credited. ``rest``: it
    credits all that is left of the invoice, so revenue is reversed per family exactly as it
    was posted. Moves ``invoice.amount_credited_minor``; the caller saves the invoice (and
    settles, and moves its status)."""
    net = sum(line.amount_minor for line in lines)
    number = numbering.take(settings.INVOICING_CREDIT_NOTE_SERIES, now.year)[0]
    note = CreditNote.objects.create(
        id=note_id or ids.new_id(),
        account_id=invoice.account_id,
        invoice=invoice,
        number=number,
        currency=invoice.currency,
        reason=reason,
        subtotal_minor=net,
        tax_minor=tax,
        total_minor=net + tax,
        issued_by=actor.name,
        issued_at=now,
    )
    CreditNoteLine.objects.bulk_create(
        [
            CreditNoteLine(
                credit_note=note,
                position=i,
                description=line.description,
                sku=line.sku,
                revenue_family=family_of(line.sku),
                amount_minor=line.amount_minor,
            )
            for i, line in enumerate(lines, start=1)
        ]
    )
    invoice.amount_credited_minor += note.total_minor
    by_family: dict[str, int] = defaultdict(int)
    if rest:
        # The whole invoice: revenue reversed per family exactly as it was posted.
        for family, amount in invoice.lines.values_list("revenue_family", "amount_minor"):
            by_family[family] += amount
        for family, amount in (
            CreditNoteLine.objects.filter(credit_note__invoice=invoice)
            .exclude(credit_note=note)
            .values_list("revenue_family", "amount_minor")
        ):
            by_family[family] -= amount
    else:
        for line in lines:
            by_family[family_of(line.sku)] += line.amount_minor
    postings = [ledger.Posting(ledger.revenue(f), amount) for f, amount in sorted(by_family.items())]
    if tax:
        postings.append(ledger.Posting(ledger.vat_payable(invoice.tax_country), tax))
    postings.append(ledger.Posting(ledger.RECEIVABLE, -note.total_minor, invoice.account_id))
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.CREDIT_NOTE,
                note.id,
                invoice.account_id,
                invoice.currency,
                f"Credit note {number} for {invoice.number}",
                postings,
            )
        ],
        posted_at=now,
    )
    return note


def settle_to_credit(invoice: Invoice, *, note: CreditNote, actor: Actor, now: dt.datetime) -> InvoiceRefund | None:
    """What ``note`` credited beyond what was owed on ``invoice`` (more was received than is
    now due), kept as customer credit: a grant whose ledger entry moves it from the
    receivable (debit) to customer credit, recorded as a refund of method ``credit``."""
    excess = -invoice.balance_minor
    if excess <= 0:
        return None
    grant = credit_grant_write(
        account_id=invoice.account_id,
        kind=CreditKind.OVERPAYMENT,
        currency=invoice.currency,
        amount_minor=excess,
        reason=f"Credit note {note.number} on invoice {invoice.number}, settled as credit",
        granted_by=actor.name,
        debit=ledger.RECEIVABLE,
        debit_account_id=invoice.account_id,
        memo=f"Credit note {note.number} on {invoice.number} settled as credit",
        now=now,
    )
    refund = InvoiceRefund.objects.create(
        invoice=invoice,
        account_id=invoice.account_id,
        amount_minor=excess,
        currency=invoice.currency,
        method=RefundMethod.CREDIT,
        reference=f"settle:{note.public_id}",
        credit_note=note,
        grant=grant,
        reason=note.reason,
        created_at=now,
    )
    invoice.amount_refunded_minor += excess
    return refund


def reverse_credits(invoice: Invoice, *, note: CreditNote) -> None:
    """Give credit spent on ``invoice`` back to its grants (as negative applications)."""
    spent: dict[int, int] = defaultdict(int)
    for grant_id, amount in CreditApplication.objects.filter(invoice=invoice).values_list("grant_id", "amount_minor"):
        spent[grant_id] += amount
    spent = {g: a for g, a in spent.items() if a}
    if not spent:
        return
    grants = {g.id: g for g in CreditGrant.objects.select_for_update().filter(id__in=list(spent))}
    for grant_id, amount in sorted(spent.items()):
        CreditApplication.objects.create(
            grant_id=grant_id, invoice=invoice, account_id=invoice.account_id, amount_minor=-amount
        )
        grant = grants[grant_id]
        grant.remaining_minor += amount
        grant.save(update_fields=["remaining_minor"])
    total = sum(spent.values())
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.CREDIT_REVERSAL,
                note.id,
                invoice.account_id,
                invoice.currency,
                f"Credit given back on voiding {invoice.number}",
                [
                    ledger.Posting(ledger.RECEIVABLE, total, invoice.account_id),
                    ledger.Posting(ledger.CUSTOMER_CREDIT, -total, invoice.account_id),
                ],
            )
        ],
        posted_at=timezone.now(),
    )


@dataclass(frozen=True, slots=True)
class RefundRecorded:
    invoice_id: int
    account_id: int
    refund_id: int  # the ``InvoiceRefund``
    amount_minor: int
    credit_note_id: int
    credit_note_number: str


@audited
def refund_record(
    *, invoice_id: int, amount_minor: int, currency: str, reference: str, reason: str, actor: Actor
) -> RefundRecorded:
    """Money the gateway gave back to the card on ``invoice_id`` (``amount_minor`` gross, as
    refunded; ``reference``: the payments app's refund id). Runs inside the caller's
    transaction (the payments app records the refund's outcome in the same commit), after the
    gateway refunded.

    Refused beyond what was paid less what was already given back (``invalid_amount``).
    Issues a credit note for exactly the gross amount (its net and tax split by
    ``_gross_split``), then posts the refund (receivable debit, gateway clearing credit), so
    the credit note leaves no negative receivable. The invoice's status does not change (what
    it still owes does not either: it was credited what went back). The unique ``reference``
    decides: a replay returns the first result and writes nothing; other details under the
    same reference are a ``refund_conflict``. A refusal leaves nothing behind, even when the
    caller catches it and carries on."""
    require_transaction("A refund recorded on an invoice")
    if amount_minor <= 0:
        raise ApplicationError("invalid_amount", "A refund is a positive amount (minor units).", field="amount_minor")
    reference = require_reference(reference)
    reason = require_reason(reason)
    now = timezone.now()
    with transaction.atomic():  # a savepoint: what a refusal wrote is undone with it
        invoice = locked_invoice(invoice_id)
        if currency != invoice.currency:
            raise ApplicationError("currency_mismatch", f"The invoice is in {invoice.currency}.", field="currency")
        refund = InvoiceRefund(
            invoice=invoice,
            account_id=invoice.account_id,
            amount_minor=amount_minor,
            currency=currency,
            method=RefundMethod.CARD,
            reference=reference,
            credit_note_id=ids.new_id(),  # written below (the foreign key is checked at commit)
            reason=reason,
            created_at=now,
        )
        if not insert_once(refund):
            first = InvoiceRefund.objects.select_related("credit_note").get(reference=reference)
            if (first.invoice_id, first.amount_minor, first.currency, first.method) != (
                invoice_id,
                amount_minor,
                currency,
                RefundMethod.CARD,
            ):
                raise Conflict("refund_conflict", f"Refund {reference} was recorded with other details.")
            return _refund_recorded(first, first.credit_note)
        refundable = max(0, invoice.amount_paid_minor - invoice.amount_refunded_minor)
        if amount_minor > refundable:
            raise ApplicationError(
                "invalid_amount",
                f"At most {refundable} (minor units) of what was paid on {invoice.number} is left to refund.",
                field="amount_minor",
            )
        if not invoice.can_refund():
            raise Conflict("invalid_transition", f"The invoice is {invoice.status}; it takes no refunds.")
        net, tax, rest = _gross_split(invoice, amount_minor)
        note = credit_note_write(
            invoice,
            note_id=refund.credit_note_id,
            lines=_refund_lines(invoice, net, description=f"Refund {reference}"),
            tax=tax,
            reason=reason,
            actor=actor,
            rest=rest,
            now=now,
        )
        ledger.post(
            [
                ledger.Entry(
                    LedgerSource.REFUND,
                    refund.id,
                    invoice.account_id,
                    currency,
                    f"Refund {reference} on {invoice.number} (credit note {note.number})",
                    [
                        ledger.Posting(ledger.RECEIVABLE, amount_minor, invoice.account_id),
                        ledger.Posting(ledger.GATEWAY_CLEARING, -amount_minor),
                    ],
                )
            ],
            posted_at=now,
        )
        invoice.amount_refunded_minor += amount_minor
        invoice.save(update_fields=["amount_credited_minor", "amount_refunded_minor", "updated_at"])
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    log.info(
        "invoicing.refund_recorded",
        extra={
            "invoice_id": invoice.public_id,
            "account_id": ids.encode("acc", invoice.account_id),
            "amount_minor": amount_minor,
            "credit_note": note.number,
        },
    )
    return _refund_recorded(refund, note)


def _refund_recorded(refund: InvoiceRefund, note: CreditNote) -> RefundRecorded:
    return RefundRecorded(
        invoice_id=refund.invoice_id,
        account_id=refund.account_id,
        refund_id=refund.id,
        amount_minor=refund.amount_minor,
        credit_note_id=note.id,
        credit_note_number=note.number,
    )


def _gross_split(invoice: Invoice, gross: int) -> tuple[int, int, bool]:
    """Net and tax of a credit note for ``gross`` on ``invoice`` (``taxes.split_gross``: the
    invoice's rate, the VAT fraction of the gross rounded half-up once), and whether it
    credits all that is left of the invoice."""
    credited_net, credited_tax = credited(invoice)
    left = invoice.total_minor - credited_net - credited_tax
    if gross > left:
        raise ApplicationError(
            "invalid_amount",
            f"At most {left} (minor units) is left to credit on {invoice.number}.",
            field="amount_minor",
        )
    net, tax = taxes.split_gross(
        gross,
        rate=invoice.tax_rate,
        net_left=invoice.subtotal_minor - credited_net,
        tax_left=invoice.tax_minor - credited_tax,
    )
    return net, tax, gross == left


def _refund_lines(invoice: Invoice, net: int, *, description: str) -> list[CreditNoteLineIn]:
    """``net`` spread over the invoice's revenue families in proportion to what is left of
    each (invoice lines less earlier credit note lines), parts summing to ``net``; each line
    names a SKU of its family, so revenue is reversed where it was posted."""
    if net <= 0:
        return []
    left: dict[str, int] = defaultdict(int)
    sku_of: dict[str, str] = {}
    for sku, family, amount in invoice.lines.order_by("position").values_list("sku", "revenue_family", "amount_minor"):
        left[family] += amount
        sku_of.setdefault(family, sku)
    for family, amount in CreditNoteLine.objects.filter(credit_note__invoice=invoice).values_list(
        "revenue_family", "amount_minor"
    ):
        left[family] -= amount
    families = sorted(f for f in left if family_of(sku_of.get(f, f)) == f)
    if not families:
        return [CreditNoteLineIn(description=description, amount_minor=net)]
    parts = money.allocate(net, [Decimal(max(left[f], 0)) for f in families])
    return [
        CreditNoteLineIn(
            description=description if len(families) == 1 else f"{description}: {family}",
            amount_minor=part,
            sku=sku_of.get(family, family),
        )
        for family, part in zip(families, parts, strict=True)
        if part
    ]
