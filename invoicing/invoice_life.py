"""An issued invoice's life: paid (money received, applied inside the payments app's
transaction: ``payment_apply``; the same in its own: ``invoice_record_payment``), written off,
or voided with a credit note. State changes go through ``billing_site.common.transitions``."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from billing_site.common import ids, transitions
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict
from billing_site.common.on_commit import queue_task
from billing_site.common.transactions import require_transaction
from invoicing import ledger
from invoicing.credit_grants import credit_grant_write
from invoicing.credit_notes import CreditNoteLineIn, credit_note_write, credited, lines_tax, reverse_credits
from invoicing.models import (
    CreditKind,
    CreditNote,
    Invoice,
    InvoicePayment,
    InvoiceStatus,
    LedgerSource,
)
from invoicing.writing import insert_once, locked_invoice, require_reason, require_reference, save_settled

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PaymentApplied:
    """What ``payment_apply`` did with a payment (the same for a replay of its reference)."""

    invoice_id: int
    account_id: int
    applied_minor: int  # to the invoice, at most what was outstanding
    credited_minor: int  # the rest, kept as customer credit (a grant of kind ``overpayment``)
    invoice_paid: bool  # the invoice is paid (nothing outstanding) once the payment was recorded
    invoice_number: str


def payment_apply(
    *, invoice_id: int, amount_minor: int, currency: str, reference: str, received_at: dt.datetime | None = None
) -> PaymentApplied:
    """Money received for ``invoice_id`` (``reference``: the payment's id). Runs inside the
    caller's transaction: the payments app records its payment's outcome and applies the
    money in one commit. Under the invoice's row lock, at most what is outstanding on an
    ``issued`` invoice is applied (ledger: gateway clearing debit, receivable credit; fully
    paid → ``paid``, audited); the excess, or all of it when the invoice takes no payments any
    more (paid by a racing payment, voided, written off), is kept as customer credit (ledger:
    gateway clearing debit, customer credit credit). Money received is never lost and never
    refused for the invoice's state.

    The unique ``reference`` decides: the same reference again returns the first result and
    writes nothing; the same reference with other details is a ``payment_conflict``."""
    require_transaction("A payment applied to an invoice")
    if amount_minor <= 0:
        raise ApplicationError("invalid_amount", "A payment is a positive amount (minor units).", field="amount_minor")
    reference = require_reference(reference)
    now = received_at or timezone.now()
    invoice = locked_invoice(invoice_id)
    if currency != invoice.currency:
        raise ApplicationError("currency_mismatch", f"The invoice is in {invoice.currency}.", field="currency")
    outstanding = invoice.amount_outstanding_minor if invoice.status == InvoiceStatus.ISSUED else 0
    applied = min(amount_minor, outstanding)
    excess = amount_minor - applied
    payment = InvoicePayment(
        invoice=invoice,
        account_id=invoice.account_id,
        amount_minor=applied,
        received_minor=amount_minor,
        currency=currency,
        reference=reference,
        credit_grant_id=ids.new_id() if excess else None,  # written below (the foreign key is checked at commit)
        invoice_paid=invoice.status == InvoiceStatus.PAID or (applied > 0 and applied == outstanding),
        received_at=now,
    )
    if not insert_once(payment):
        first = InvoicePayment.objects.select_related("invoice").get(reference=reference)
        if (first.invoice_id, first.received_minor, first.currency) != (invoice_id, amount_minor, currency):
            raise Conflict("payment_conflict", f"Payment {reference} was recorded with other details.")
        return _payment_applied(first)
    if applied:
        ledger.post(
            [
                ledger.Entry(
                    LedgerSource.PAYMENT,
                    payment.id,
                    invoice.account_id,
                    currency,
                    f"Payment {reference} for {invoice.number}",
                    [
                        ledger.Posting(ledger.GATEWAY_CLEARING, applied),
                        ledger.Posting(ledger.RECEIVABLE, -applied, invoice.account_id),
                    ],
                )
            ],
            posted_at=now,
        )
        invoice.amount_paid_minor += applied
        save_settled(
            invoice,
            actor=Actor.system("payments"),
            reason=f"payment {reference}",
            now=now,
            fields=["amount_paid_minor"],
        )
    if excess:
        assert payment.credit_grant_id is not None
        why = "more than was outstanding on" if applied else f"received while {invoice.status}:"
        credit_grant_write(
            grant_id=payment.credit_grant_id,
            account_id=invoice.account_id,
            kind=CreditKind.OVERPAYMENT,
            currency=currency,
            amount_minor=excess,
            reason=f"Payment {reference}, {why} invoice {invoice.number or invoice.public_id}",
            granted_by="payments",
            debit=ledger.GATEWAY_CLEARING,
            memo=f"Overpayment kept as credit: payment {reference} for {invoice.number or invoice.public_id}",
            now=now,
        )
    log.info(
        "invoicing.payment_applied",
        extra={
            "invoice_id": invoice.public_id,
            "account_id": ids.encode("acc", invoice.account_id),
            "applied_minor": applied,
            "credited_minor": excess,
            "invoice_paid": payment.invoice_paid,
        },
    )
    return _payment_applied(payment)


def _payment_applied(payment: InvoicePayment) -> PaymentApplied:
    return PaymentApplied(
        invoice_id=payment.invoice_id,
        account_id=payment.account_id,
        applied_minor=payment.amount_minor,
        credited_minor=payment.received_minor - payment.amount_minor,
        invoice_paid=payment.invoice_paid,
        invoice_number=payment.invoice.number or "",
    )


@dataclass(frozen=True, slots=True)
class PaymentReceived:
    """One payment for ``payments_apply`` (``reference``: the payment's id)."""

    invoice_id: int
    amount_minor: int
    currency: str
    reference: str


def payments_apply(payments: list[PaymentReceived]) -> list[PaymentApplied]:
    """``payment_apply`` for many payments (a charged chunk of a period close), inside the
    caller's transaction, in the order given. The same rules; set-based for the common case, an
    issued invoice receiving at most what it still owes, once in the batch: the invoices locked
    in one statement (id order), the invoice payments inserted in one (``ON CONFLICT
    (reference) DO NOTHING``), their ledger entries in one, the invoices' amounts (and ``paid``)
    in one, the paid ones' audit rows in one. Anything else (money beyond what is owed, another
    currency, an invoice no longer issued, a reference recorded before) is applied by
    ``payment_apply`` itself, one by one."""
    require_transaction("Payments applied to invoices")
    for p in payments:
        if p.amount_minor <= 0:
            raise ApplicationError(
                "invalid_amount", "A payment is a positive amount (minor units).", field="amount_minor"
            )
        require_reference(p.reference)
    now = timezone.now()
    invoices = {
        i.id: i
        for i in Invoice.objects.select_for_update()
        .filter(id__in={p.invoice_id for p in payments})
        .defer("buyer", "seller")  # the snapshots: the largest columns, not read here
        .order_by("id")
    }
    fast: list[PaymentReceived] = []
    slow: list[PaymentReceived] = []
    taken: set[int] = set()  # invoices with a payment on the fast path already
    for p in payments:
        invoice = invoices.get(p.invoice_id)
        if (
            invoice is None
            or invoice.status != InvoiceStatus.ISSUED
            or invoice.currency != p.currency
            or p.amount_minor > invoice.amount_outstanding_minor
            or p.invoice_id in taken
        ):
            slow.append(p)
        else:
            fast.append(p)
            taken.add(p.invoice_id)
    results: dict[str, PaymentApplied] = {}
    if fast:
        paid = {p.reference: p.amount_minor == invoices[p.invoice_id].amount_outstanding_minor for p in fast}
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO invoicing_invoicepayment (invoice_id, account_id, amount_minor, received_minor, currency,
                                                      reference, credit_grant_id, invoice_paid, received_at)
                SELECT p.invoice_id, p.account_id, p.amount_minor, p.amount_minor, p.currency, p.reference, NULL,
                       p.invoice_paid, %s
                FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::boolean[])
                     AS p(invoice_id, account_id, amount_minor, currency, reference, invoice_paid)
                ON CONFLICT (reference) DO NOTHING
                RETURNING reference, id
                """,
                [
                    now,
                    [p.invoice_id for p in fast],
                    [invoices[p.invoice_id].account_id for p in fast],
                    [p.amount_minor for p in fast],
                    [p.currency for p in fast],
                    [p.reference for p in fast],
                    [paid[p.reference] for p in fast],
                ],
            )
            inserted = dict(cursor.fetchall())
        slow += [p for p in fast if p.reference not in inserted]  # recorded before: the single way replays it
        fast = [p for p in fast if p.reference in inserted]
        ledger.post(
            [
                ledger.Entry(
                    LedgerSource.PAYMENT,
                    inserted[p.reference],
                    invoices[p.invoice_id].account_id,
                    p.currency,
                    f"Payment {p.reference} for {invoices[p.invoice_id].number}",
                    [
                        ledger.Posting(ledger.GATEWAY_CLEARING, p.amount_minor),
                        ledger.Posting(ledger.RECEIVABLE, -p.amount_minor, invoices[p.invoice_id].account_id),
                    ],
                )
                for p in fast
            ],
            posted_at=now,
        )
        with connection.cursor() as cursor:
            cursor.execute(
                """
                UPDATE invoicing_invoice i
                SET amount_paid_minor = i.amount_paid_minor + u.amount_minor,
                    status = CASE WHEN u.paid THEN %s ELSE i.status END,
                    paid_at = CASE WHEN u.paid THEN %s ELSE i.paid_at END,
                    updated_at = %s
                FROM unnest(%s::bigint[], %s::bigint[], %s::boolean[]) AS u(id, amount_minor, paid)
                WHERE i.id = u.id
                """,
                [
                    InvoiceStatus.PAID.value,
                    now,
                    now,
                    [p.invoice_id for p in fast],
                    [p.amount_minor for p in fast],
                    [paid[p.reference] for p in fast],
                ],
            )
        paid_now = [p for p in fast if paid[p.reference]]
        transitions.record_many(
            [invoices[p.invoice_id] for p in paid_now],
            "mark_paid",
            from_state=InvoiceStatus.ISSUED,
            to_state=InvoiceStatus.PAID,
            actor=Actor.system("payments"),
            reasons=[f"payment {p.reference}" for p in paid_now],
        )
        if fast:  # one line for the chunk, every payment's ids and amounts in one order
            log.info(
                "invoicing.payments_applied",
                extra={
                    "count": len(fast),
                    "invoice_ids": [ids.encode("inv", p.invoice_id) for p in fast],
                    "account_ids": [ids.encode("acc", invoices[p.invoice_id].account_id) for p in fast],
                    "applied_minor": [p.amount_minor for p in fast],
                    "credited_minor": 0,
                    "invoices_paid": [paid[p.reference] for p in fast],
                },
            )
        for p in fast:
            invoice = invoices[p.invoice_id]
            results[p.reference] = PaymentApplied(
                invoice_id=p.invoice_id,
                account_id=invoice.account_id,
                applied_minor=p.amount_minor,
                credited_minor=0,
                invoice_paid=paid[p.reference],
                invoice_number=invoice.number or "",
            )
    for p in slow:
        results[p.reference] = payment_apply(
            invoice_id=p.invoice_id, amount_minor=p.amount_minor, currency=p.currency, reference=p.reference
        )
    return [results[p.reference] for p in payments]


@transaction.atomic(durable=True)
def invoice_record_payment(
    *, invoice_id: int, amount_minor: int, currency: str, reference: str, received_at: dt.datetime | None = None
) -> PaymentApplied:
    """``payment_apply`` in a durable transaction of its own (finance's tools, tests)."""
    return payment_apply(
        invoice_id=invoice_id,
        amount_minor=amount_minor,
        currency=currency,
        reference=reference,
        received_at=received_at,
    )


@audited
@transaction.atomic(durable=True)
def invoice_write_off(*, invoice_id: int, actor: Actor, reason: str) -> Invoice:
    """Finance gives up on what is outstanding: ``uncollectible``, posted to bad debt."""
    reason = require_reason(reason)
    invoice = locked_invoice(invoice_id)
    if not invoice.can_write_off():
        raise Conflict(
            "invalid_transition", f"Only an issued invoice can be written off; this one is {invoice.status}."
        )
    outstanding = invoice.amount_outstanding_minor
    invoice.written_off_minor = outstanding
    transitions.transition(invoice, "write_off", actor=actor, reason=reason, update_fields=["written_off_minor"])
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.WRITE_OFF,
                invoice.id,
                invoice.account_id,
                invoice.currency,
                f"Write-off of {invoice.number}: {reason}",
                [
                    ledger.Posting(ledger.BAD_DEBT, outstanding),
                    ledger.Posting(ledger.RECEIVABLE, -outstanding, invoice.account_id),
                ],
            )
        ],
        posted_at=timezone.now(),
    )
    return invoice


@audited
def invoice_void(*, invoice_id: int, reason: str, actor: Actor) -> CreditNote:
    """Void an issued, unpaid invoice: a credit note for the whole amount not yet credited,
    credit spent on it given back to its grants, status ``void``."""
    reason = require_reason(reason)
    with transaction.atomic(durable=True):
        invoice = locked_invoice(invoice_id)
        if not invoice.can_void():
            if invoice.status == InvoiceStatus.ISSUED:
                raise Conflict("invoice_paid", "Payments were received on this invoice: refund them with credit notes.")
            raise Conflict("invalid_transition", f"Only an issued invoice can be voided; this one is {invoice.status}.")
        lines = [
            CreditNoteLineIn(
                description=f"Cancellation of invoice {invoice.number}",
                amount_minor=invoice.subtotal_minor - credited(invoice)[0],
            )
        ]
        tax, _ = lines_tax(invoice, lines)
        note = credit_note_write(
            invoice, lines=lines, tax=tax, reason=reason, actor=actor, rest=True, now=timezone.now()
        )
        reverse_credits(invoice, note=note)
        transitions.transition(
            invoice,
            "void",
            actor=actor,
            reason=f"{reason} (credit note {note.number})",
            update_fields=["amount_credited_minor"],
        )
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    return note
