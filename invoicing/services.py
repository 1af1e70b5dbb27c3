"""Every write of the invoicing app. Keyword-only; one durable transaction per entry point;
state changes under ``select_for_update`` with an audit row; ledger postings in the same
transaction; side effects (PDF rendering) after commit.

Three entry points are deliberately not durable: ``payment_apply``, ``refund_record`` and
``dispute_post`` run inside the payments app's transaction that records the outcome at the
gateway, so the payment (refund, dispute) and its effect on the books commit together. They
refuse to run outside a transaction, and the unique reference (ledger source) of what they
write decides, so a replay writes nothing."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from celery import current_app
from django.conf import settings
from django.db import DataError, IntegrityError, connection, models, transaction
from django.db.models import Sum
from django.utils import timezone
from django_fsm import can_proceed

from accounts import selectors as account_selectors
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.on_commit import queue_task
from billing_site.common.transactions import require_transaction
from invoicing import issuing, ledger, numbering, planning, selectors
from invoicing.models import (
    GRANTABLE_CREDIT_KINDS,
    CreditApplication,
    CreditGrant,
    CreditKind,
    CreditNote,
    CreditNoteLine,
    Invoice,
    InvoiceKind,
    InvoicePayment,
    InvoiceRefund,
    InvoiceStatus,
    InvoiceTransition,
    LedgerLine,
    LedgerSource,
    RefundMethod,
)
from invoicing.periods import Period, lookback_start
from invoicing.planning import family_of
from metering import selectors as metering_selectors
from metering import services as metering_services

log = logging.getLogger(__name__)

CHUNK_ACCOUNTS = 500


# --- Period close


@dataclass
class CloseReport:
    period: Period
    accounts: int = 0
    issued: int = 0
    already_issued: int = 0
    nothing_to_bill: int = 0
    totals_minor: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dry_run: bool = False
    queued_shards: int = 0
    seconds: float = 0.0
    unbillable: dict[int, str] = field(default_factory=dict)  # account id → why it was not invoiced

    def summary(self) -> str:
        if self.queued_shards:
            return f"{self.period}: {self.queued_shards} shards of accounts queued for the workers"
        totals = ", ".join(
            f"{money.from_minor(amount, currency)} {currency}" for currency, amount in sorted(self.totals_minor.items())
        )
        verb = "would issue" if self.dry_run else "issued"
        text = (
            f"{self.period}: {self.accounts} accounts with usage; {verb} {self.issued} invoices"
            f" ({totals or 'nothing'}); {self.already_issued} already invoiced; "
            f"{self.nothing_to_bill} with nothing to bill; {self.seconds:.1f} s"
        )
        if self.unbillable:
            text += f"; {len(self.unbillable)} NOT invoiced (see below)"
            for account_id, reason in sorted(self.unbillable.items()):
                text += f"\n  {ids.encode('acc', account_id)}: {reason}"
        return text


def check_closable(period: Period, *, now: dt.datetime | None = None) -> None:
    now = now or timezone.now()
    if period.end_at > now:
        raise ApplicationError(
            "period_open", f"{period} has not ended yet: only past periods can be closed.", field="period"
        )


def period_chunks(
    *, period: Period, account_ids: list[int] | None = None, chunk_size: int = CHUNK_ACCOUNTS, shard: int | None = None
) -> list[list[int]]:
    """The accounts a close of ``period`` considers (usage in it, or late usage of a month it
    may still adjust; with ``INVOICING_ISSUE_EMPTY`` every account open in the period too),
    ascending, cut into chunks of one transaction each."""
    first = dt.datetime.combine(lookback_start(period), dt.time(), tzinfo=dt.UTC)
    candidates = metering_selectors.accounts_with_usage(
        start=first, end=period.end_at, account_ids=account_ids, shard=shard
    )
    if settings.INVOICING_ISSUE_EMPTY:  # every account open in the period, usage or not
        idle = account_selectors.billing_account_ids_open(opened_before=period.end_at, account_ids=account_ids)
        if shard is not None:
            idle = metering_selectors.accounts_in_shard(idle, shard)
        candidates = sorted(set(candidates) | set(idle))
    return [candidates[lo : lo + chunk_size] for lo in range(0, len(candidates), chunk_size)]


def period_close_shard(
    *, period: Period, shard: int, actor: Actor, render_pdfs: bool = True, chunk_size: int = CHUNK_ACCOUNTS
) -> CloseReport:
    """Close ``period`` for the accounts of one shard, chunk by chunk: what a worker runs for
    a fanned-out close (shards are independent: no two share an account)."""
    started = time.perf_counter()
    check_closable(period)
    report = CloseReport(period=period)
    for chunk in period_chunks(period=period, chunk_size=chunk_size, shard=shard):
        report.accounts += len(chunk)
        _add(report, close_chunk_isolated(period=period, account_ids=chunk, actor=actor, render_pdfs=render_pdfs))
    report.seconds = time.perf_counter() - started
    _log_run(report, shard=shard)
    return report


def _log_run(report: CloseReport, *, shard: int | None) -> None:
    log.log(
        logging.ERROR if report.unbillable else logging.INFO,
        "invoicing.period_closed",
        extra={
            "period": report.period.label,
            "shard": shard,
            "dry_run": report.dry_run,
            "accounts": report.accounts,
            "issued": report.issued,
            "already_issued": report.already_issued,
            "nothing_to_bill": report.nothing_to_bill,
            "unbillable": len(report.unbillable),
            "totals": {c: money.format_minor(m, c) for c, m in sorted(report.totals_minor.items())},
            "duration_ms": round(report.seconds * 1000),
        },
    )


# What one account's data can make a chunk fail with (a value out of range, a constraint):
# the chunk is retried in halves so that the account is found, reported and skipped while
# the others are invoiced. Infrastructure errors (a lost connection) are not isolated: the
# run stops and, being idempotent, is simply run again.
_ACCOUNT_ERRORS: tuple[type[BaseException], ...] = (DataError, IntegrityError, ArithmeticError, ValueError)


def close_chunk_isolated(
    *, period: Period, account_ids: list[int], actor: Actor, render_pdfs: bool = True
) -> issuing.ChunkResult:
    """``issuing.close_chunk``, with one bad account isolated: on an error its data can
    cause, the chunk is split in halves and each is retried, down to the single account,
    which is reported in ``unbillable`` (and logged) instead of blocking its neighbours."""
    started = time.perf_counter()
    try:
        result = issuing.close_chunk(period=period, account_ids=account_ids, actor=actor)
        if render_pdfs and result.issued:
            queue_task("invoicing.render_documents", kind="invoice", source_ids=result.issued)
    except _ACCOUNT_ERRORS as exc:
        if len(account_ids) == 1:
            reason = _failure_reason(exc)
            log.error(
                "invoicing.account_unbillable",
                extra={"period": period.label, "account_id": ids.encode("acc", account_ids[0]), "error": reason},
            )
            return issuing.ChunkResult(unbillable={account_ids[0]: reason})
        half = len(account_ids) // 2
        merged = issuing.ChunkResult()
        for part in (account_ids[:half], account_ids[half:]):
            _merge(merged, close_chunk_isolated(period=period, account_ids=part, actor=actor, render_pdfs=render_pdfs))
        return merged
    for account_id, reason in result.unbillable.items():
        log.error(
            "invoicing.account_unbillable",
            extra={"period": period.label, "account_id": ids.encode("acc", account_id), "error": reason},
        )
    log.info(
        "invoicing.chunk_closed",
        extra={
            "period": period.label,
            "first_account_id": ids.encode("acc", account_ids[0]) if account_ids else None,
            "accounts": len(account_ids),
            "issued": len(result.issued),
            "already_issued": result.already_issued,
            "nothing_to_bill": result.nothing_to_bill,
            "unbillable": len(result.unbillable),
            "duration_ms": round((time.perf_counter() - started) * 1000),
        },
    )
    return result


def _failure_reason(exc: BaseException) -> str:
    """What went wrong, for the report and the log, without the failing row: PostgreSQL's
    DETAIL line (and so ``str(exc)``) would carry the buyer's snapshot, email and address."""
    diag = getattr(exc.__cause__, "diag", None)
    if diag is None:
        return type(exc).__name__
    constraint = f", constraint {diag.constraint_name}" if diag.constraint_name else ""
    return f"{type(exc).__name__} {diag.sqlstate}: {diag.message_primary}{constraint}"


def _merge(into: issuing.ChunkResult, part: issuing.ChunkResult) -> None:
    into.issued += part.issued
    into.already_issued += part.already_issued
    into.nothing_to_bill += part.nothing_to_bill
    into.unbillable.update(part.unbillable)
    for currency, total in part.totals_minor.items():
        into.totals_minor[currency] = into.totals_minor.get(currency, 0) + total


def _add(report: CloseReport, result: issuing.ChunkResult) -> None:
    report.issued += len(result.issued)
    report.already_issued += result.already_issued
    report.nothing_to_bill += result.nothing_to_bill
    report.unbillable.update(result.unbillable)
    for currency, total in result.totals_minor.items():
        report.totals_minor[currency] += total


def period_close(
    *,
    period: Period,
    actor: Actor,
    account_ids: list[int] | None = None,
    dry_run: bool = False,
    run_rollup: bool = True,
    render_pdfs: bool = True,
    chunk_size: int = CHUNK_ACCOUNTS,
    fan_out: bool = False,
) -> CloseReport:
    """Close a past period: roll usage up to now, then invoice every account with usage in
    the period (or late usage of an earlier one), ``chunk_size`` accounts per transaction.
    Idempotent: accounts already invoiced for the period are skipped.

    ``fan_out`` (with a broker) queues one ``invoicing.close_shard`` task per shard of
    accounts, so every worker bills in parallel, instead of billing here chunk after chunk."""
    started = time.perf_counter()
    check_closable(period)
    if run_rollup and not dry_run:
        metering_services.rollup_catch_up()
    report = CloseReport(period=period, dry_run=dry_run)
    if fan_out and not dry_run and account_ids is None and not current_app.conf.task_always_eager:
        for shard in range(metering_selectors.shard_count()):
            queue_task(
                "invoicing.close_shard",
                period=period.label,
                shard=shard,
                actor_kind=actor.kind.value,
                actor_name=actor.name,
                actor_user_id=actor.user_id,
            )
        report.queued_shards = metering_selectors.shard_count()
        report.seconds = time.perf_counter() - started
        log.info("invoicing.period_close_queued", extra={"period": period.label, "shards": report.queued_shards})
        return report
    chunks = period_chunks(period=period, account_ids=account_ids, chunk_size=chunk_size)
    report.accounts = sum(len(chunk) for chunk in chunks)
    for chunk in chunks:
        if dry_run:
            issued = set(
                Invoice.objects.filter(account_id__in=chunk, period_start=period.start, kind=InvoiceKind.PERIOD)
                .exclude(status=InvoiceStatus.DRAFT)
                .values_list("account_id", flat=True)
            )
            todo = [a for a in chunk if a not in issued]
            plans = planning.plan(period=period, account_ids=todo)
            report.already_issued += len(issued)
            report.unbillable.update(plans.unbillable)
            report.nothing_to_bill += len(todo) - len(plans) - len(plans.unbillable)
            report.issued += len(plans)
            for p in plans.values():
                report.totals_minor[p.currency] += p.total_minor
            continue
        _add(report, close_chunk_isolated(period=period, account_ids=chunk, actor=actor, render_pdfs=render_pdfs))
    report.seconds = time.perf_counter() - started
    _log_run(report, shard=None)
    return report


# --- Threshold billing: an early invoice when the credit limit is reached


@dataclass
class ThresholdReport:
    over_limit: int = 0  # accounts whose unbilled usage and unpaid invoices exceed their limit
    waiting: int = 0  # of those, with a threshold invoice still owing (its charge under way or failed)
    issued: list[int] = field(default_factory=list)  # threshold invoices issued
    nothing_to_bill: int = 0
    unbillable: dict[int, str] = field(default_factory=dict)
    totals_minor: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.over_limit} over their credit limit, {len(self.issued)} threshold invoices issued, "
            f"{self.waiting} waiting on one, {self.nothing_to_bill} with nothing to bill, "
            f"{len(self.unbillable)} unbillable, in {self.seconds:.2f} s"
        )


THRESHOLD_ACTOR = Actor.system("invoicing.threshold")


def threshold_billing_run(*, chunk_size: int = 500, render_pdfs: bool = True) -> ThresholdReport:
    """The credit check after a rollup: every active account over its credit limit (one
    set-based read, ``selectors.credit_exposures``) with usage not billed yet and no threshold
    invoice still owing gets a threshold invoice, charged after the commit; if that charge
    fails, payments suspends the account at once. Accounts are issued in chunks, each its
    own transaction that checks its accounts again under their billing locks."""
    started = time.perf_counter()
    report = ThresholdReport()
    exposures = selectors.credit_exposures()
    report.over_limit = len(exposures)
    report.waiting = sum(1 for e in exposures if e.threshold_open)
    due = [e.account_id for e in exposures if not e.threshold_open and e.unbilled > 0]
    report.nothing_to_bill = report.over_limit - report.waiting - len(due)
    for start in range(0, len(due), chunk_size):
        chunk = due[start : start + chunk_size]
        try:
            result = issuing.threshold_chunk(account_ids=chunk, actor=THRESHOLD_ACTOR)
        except _ACCOUNT_ERRORS as exc:  # one account's data: the others wait for the next check
            log.error(
                "invoicing.threshold_chunk_failed",
                extra={"first_account_id": ids.encode("acc", chunk[0]), "accounts": len(chunk), "error": str(exc)},
            )
            continue
        if render_pdfs and result.issued:
            queue_task("invoicing.render_documents", kind="invoice", source_ids=result.issued)
        report.issued.extend(result.issued)
        report.nothing_to_bill += result.nothing_to_bill + result.already_issued
        report.unbillable.update(result.unbillable)
        for currency, amount in result.totals_minor.items():
            report.totals_minor[currency] = report.totals_minor.get(currency, 0) + amount
    report.seconds = time.perf_counter() - started
    log.info(
        "invoicing.threshold_run",
        extra={
            "over_limit": report.over_limit,
            "issued": len(report.issued),
            "invoice_ids": [ids.encode("inv", i) for i in report.issued[:50]],
            "waiting": report.waiting,
            "nothing_to_bill": report.nothing_to_bill,
            "unbillable": len(report.unbillable),
            "totals_minor": report.totals_minor,
            "duration_ms": round(report.seconds * 1000),
        },
    )
    return report


def invoice_draft_compute(*, account_id: int, period: Period) -> Invoice | None:
    """Create or recompute the account's draft for ``period`` (a preview for finance: no
    number, no ledger). Refused once the invoice is issued."""
    with transaction.atomic(durable=True):
        issuing.lock_accounts([account_id])
        invoice = (
            Invoice.objects.select_for_update()
            .filter(account_id=account_id, period_start=period.start, kind=InvoiceKind.PERIOD)
            .first()
        )
        if invoice is not None and invoice.status != InvoiceStatus.DRAFT:
            raise Conflict("invoice_issued", f"The invoice for {period} is already issued: {invoice.number}.")
        plans = planning.plan(period=period, account_ids=[account_id])
        planned = plans.get(account_id)
        if planned is None:
            if invoice is not None:
                invoice.lines.all().delete()
                invoice.delete()
            return None
        return issuing.write_draft(period=period, planned=planned, draft=invoice)


def invoice_issue(*, invoice_id: int, actor: Actor) -> Invoice:
    """Issue one draft (recomputed first): the same path as the period close, for one account."""
    draft = Invoice.objects.filter(id=invoice_id).first()
    if draft is None:
        raise NotFound("No such invoice.")
    if draft.status != InvoiceStatus.DRAFT:
        raise Conflict("invalid_transition", f"The invoice is {draft.status}, not a draft.")
    period = Period(draft.period_start)
    check_closable(period)
    result = close_chunk_isolated(period=period, account_ids=[draft.account_id], actor=actor)
    if result.unbillable:
        raise Conflict("unbillable", f"This draft cannot be issued: {result.unbillable[draft.account_id]}.")
    if not result.issued:
        raise Conflict("nothing_to_bill", "Nothing is left to bill on this draft.")
    return Invoice.objects.get(id=result.issued[0])


# --- One invoice's later life


def _transition(invoice: Invoice, name: str, *, actor: Actor, reason: str) -> None:
    before = invoice.status
    method = getattr(invoice, name)
    if not can_proceed(method):
        raise Conflict("invalid_transition", f"Cannot {name.replace('_', ' ')} an invoice that is {before}.")
    method()
    invoice.save()
    InvoiceTransition.objects.create(
        invoice=invoice,
        account_id=invoice.account_id,
        from_state=before,
        to_state=invoice.status,
        actor_kind=actor.kind,
        actor_name=actor.name,
        reason=reason,
    )


def _locked_invoice(invoice_id: int) -> Invoice:
    invoice = Invoice.objects.select_for_update().filter(id=invoice_id).first()
    if invoice is None:
        raise NotFound("No such invoice.")
    return invoice


def _require_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise ApplicationError("invalid", "A reason is required.", field="reason")
    return reason


def _require_reference(reference: str) -> str:
    reference = reference.strip()
    if not reference or len(reference) > 128:
        raise ApplicationError("invalid", "A reference of 1 to 128 characters is required.", field="reference")
    return reference


def _save_settled(invoice: Invoice, *, actor: Actor, reason: str, now: dt.datetime, fields: list[str]) -> None:
    """Save ``invoice``'s running amounts; an issued invoice left owing nothing is ``paid``."""
    if invoice.status == InvoiceStatus.ISSUED and invoice.amount_outstanding_minor == 0:
        invoice.paid_at = now
        _transition(invoice, "mark_paid", actor=actor, reason=reason)
    else:
        invoice.save(update_fields=[*fields, "updated_at"])


def _insert_once(row: models.Model) -> bool:
    """Insert ``row`` unless a row with its ``reference`` exists: the unique index decides, not
    a read before the write (a concurrent twin waits for ours to commit or roll back, then
    inserts nothing). True when ``row`` was inserted (its ``pk`` is set)."""
    opts = row._meta
    assert opts.pk is not None
    fields = [f for f in opts.concrete_fields if not (f.primary_key and row.pk is None)]
    quote = connection.ops.quote_name
    params = [f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(opts.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608
            f"VALUES ({', '.join(['%s'] * len(fields))}) ON CONFLICT (reference) DO NOTHING "
            f"RETURNING {quote(opts.pk.column)}",  # identifiers from the model; values are parameters
            params,
        )
        inserted = cursor.fetchone()
    if inserted is None:
        return False
    row.pk = inserted[0]
    row._state.adding = False
    row._state.db = connection.alias
    return True


# --- Payments received (called by the payments app inside its own transaction)


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
    reference = _require_reference(reference)
    now = received_at or timezone.now()
    invoice = _locked_invoice(invoice_id)
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
    if not _insert_once(payment):
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
        _save_settled(
            invoice,
            actor=Actor.system("payments"),
            reason=f"payment {reference}",
            now=now,
            fields=["amount_paid_minor"],
        )
    if excess:
        assert payment.credit_grant_id is not None
        why = "more than was outstanding on" if applied else f"received while {invoice.status}:"
        _credit_grant_write(
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
        _require_reference(p.reference)
    now = timezone.now()
    invoices = {
        i.id: i
        for i in Invoice.objects.select_for_update().filter(id__in={p.invoice_id for p in payments}).order_by("id")
    }
    fast: list[PaymentReceived] = []
    slow: list[PaymentReceived] = []
    for p in payments:
        invoice = invoices.get(p.invoice_id)
        if (
            invoice is None
            or invoice.status != InvoiceStatus.ISSUED
            or invoice.currency != p.currency
            or p.amount_minor > invoice.amount_outstanding_minor
            or any(f.invoice_id == p.invoice_id for f in fast)
        ):
            slow.append(p)
        else:
            fast.append(p)
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
        system = Actor.system("payments")
        InvoiceTransition.objects.bulk_create(
            [
                InvoiceTransition(
                    invoice_id=p.invoice_id,
                    account_id=invoices[p.invoice_id].account_id,
                    from_state=InvoiceStatus.ISSUED,
                    to_state=InvoiceStatus.PAID,
                    actor_kind=system.kind,
                    actor_name=system.name,
                    reason=f"payment {p.reference}",
                    created_at=now,
                )
                for p in fast
                if paid[p.reference]
            ]
        )
        for p in fast:
            invoice = invoices[p.invoice_id]
            log.info(
                "invoicing.payment_applied",
                extra={
                    "invoice_id": invoice.public_id,
                    "account_id": ids.encode("acc", invoice.account_id),
                    "applied_minor": p.amount_minor,
                    "credited_minor": 0,
                    "invoice_paid": paid[p.reference],
                },
            )
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


@dataclass(frozen=True, slots=True)
class RefundRecorded:
    invoice_id: int
    account_id: int
    refund_id: int  # the ``InvoiceRefund``
    amount_minor: int
    credit_note_id: int
    credit_note_number: str


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
    reference = _require_reference(reference)
    reason = _require_reason(reason)
    now = timezone.now()
    with transaction.atomic():  # a savepoint: what a refusal wrote is undone with it
        invoice = _locked_invoice(invoice_id)
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
        if not _insert_once(refund):
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
        if invoice.status not in (InvoiceStatus.ISSUED, InvoiceStatus.PAID, InvoiceStatus.UNCOLLECTIBLE):
            raise Conflict("invalid_transition", f"The invoice is {invoice.status}; it takes no refunds.")
        net, tax, rest = _gross_split(invoice, amount_minor)
        note = _credit_note_write(
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
    """Net and tax of a credit note for ``gross`` on ``invoice`` (``gross_split``), and
    whether it credits all that is left of the invoice."""
    credited_net, credited_tax = _credited(invoice)
    left = invoice.total_minor - credited_net - credited_tax
    if gross > left:
        raise ApplicationError(
            "invalid_amount",
            f"At most {left} (minor units) is left to credit on {invoice.number}.",
            field="amount_minor",
        )
    net, tax = gross_split(
        gross,
        rate=invoice.tax_rate,
        invoice_net=invoice.subtotal_minor,
        invoice_tax=invoice.tax_minor,
        credited_net=credited_net,
        credited_tax=credited_tax,
    )
    return net, tax, gross == left


def gross_split(
    gross: int, *, rate: Decimal, invoice_net: int, invoice_tax: int, credited_net: int, credited_tax: int
) -> tuple[int, int]:
    """Split ``gross`` (tax included, minor units; at most what is left to credit) into the
    net and tax of a credit note on an invoice of ``invoice_net`` + ``invoice_tax`` taxed at
    ``rate`` percent, of which ``credited_net`` and ``credited_tax`` are already credited:
    net + tax == gross exactly.

    Rounding: crediting all that is left takes exactly the rest of the net and of the tax.
    Otherwise the tax follows the cumulative rule of credit notes by lines (``rule_tax``: the
    rate on all the net credited so far, rounded half-up once, less the tax already credited,
    within what is left of the invoice's tax): the net is the smallest whose net plus
    rule-tax reaches ``gross``, and the tax is ``gross`` less that net. So the tax is the
    rule's, or one minor unit less where the rounded tax steps up inside ``gross`` (never
    more): the VAT credited in parts never exceeds the rule on the net credited so far,
    hence never what the invoice charged, and the next credit note, being cumulative, makes
    that unit up."""
    net_left, tax_left = invoice_net - credited_net, invoice_tax - credited_tax
    if gross >= net_left + tax_left:
        return net_left, tax_left
    lo, hi = 0, min(gross, net_left)
    while lo < hi:  # net + rule-tax rises strictly with the net: bisect
        mid = (lo + hi) // 2
        tax = rule_tax(credited_net + mid, rate=rate, credited_tax=credited_tax, invoice_tax=invoice_tax)
        if mid + tax >= gross:
            hi = mid
        else:
            lo = mid + 1
    # Within what is left of both (so the net never exceeds the invoice's either).
    tax = min(max(gross - lo, gross - net_left, 0), tax_left)
    return gross - tax, tax


def rule_tax(cumulative_net: int, *, rate: Decimal, credited_tax: int, invoice_tax: int) -> int:
    """The tax of a credit note that brings the net credited on an invoice to
    ``cumulative_net``: the rate on it, rounded half-up once, less the tax already credited,
    kept within what is left of the invoice's tax."""
    cumulative = money.percent_of_minor(cumulative_net, rate)
    return min(max(cumulative - credited_tax, 0), invoice_tax - credited_tax)


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


# --- Disputes (ledger only; the payments app owns the dispute)


DISPUTE_STAGES = {
    "opened": LedgerSource.DISPUTE_OPENED,
    "won": LedgerSource.DISPUTE_WON,
    "lost": LedgerSource.DISPUTE_LOST,
}


def dispute_post(*, dispute_id: int, account_id: int, currency: str, amount_minor: int, stage: str, memo: str) -> bool:
    """Post a stage of the payments app's dispute ``dispute_id`` to the ledger, inside the
    caller's transaction; True when it posted now. Each stage posts once (the ledger's unique
    ``(source, id)``): a replay posts nothing; the same stage with another amount or currency,
    or a dispute closed both ways, is a ``dispute_conflict``.

    - ``opened``: the bank withdrew the funds: disputes debit, gateway clearing credit;
    - ``won``: they came back: gateway clearing debit, disputes credit;
    - ``lost``: they are lost: chargeback loss debit, disputes credit.

    A close learnt before the opening posts the opening first. Stages of one dispute are
    serialised by a transaction-scoped advisory lock on its id."""
    require_transaction("A dispute's ledger entry")
    source = DISPUTE_STAGES.get(stage)
    if source is None:
        raise ApplicationError("invalid", f"stage must be one of {', '.join(DISPUTE_STAGES)}.", field="stage")
    if amount_minor <= 0:
        raise ApplicationError("invalid_amount", "A dispute is a positive amount (minor units).", field="amount_minor")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"invoicing.dispute:{dispute_id}"])
    posted = {
        source_type: (entry_currency, abs(amount))
        for source_type, entry_currency, amount in LedgerLine.objects.filter(
            entry__source_type__in=list(DISPUTE_STAGES.values()),
            entry__source_id=dispute_id,
            ledger_account=ledger.DISPUTES,
        ).values_list("entry__source_type", "entry__currency", "amount_minor")
    }
    if source in posted:
        if posted[source] != (currency, amount_minor):
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} was {stage} with other amounts.")
        return False
    if source != LedgerSource.DISPUTE_OPENED:
        closed = {LedgerSource.DISPUTE_WON, LedgerSource.DISPUTE_LOST} & posted.keys()
        if closed:
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} is already closed ({closed.pop()}).")
        opened = posted.get(LedgerSource.DISPUTE_OPENED)
        if opened is not None and opened != (currency, amount_minor):
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} was opened with other amounts.")
    memo = memo.strip()[:300] or f"Dispute {dispute_id} {stage}"
    entries = []
    if source != LedgerSource.DISPUTE_OPENED and LedgerSource.DISPUTE_OPENED not in posted:
        entries.append(_dispute_entry(dispute_id, "opened", account_id, currency, amount_minor, memo))
    entries.append(_dispute_entry(dispute_id, stage, account_id, currency, amount_minor, memo))
    ledger.post(entries, posted_at=timezone.now())
    log.info(
        "invoicing.dispute_posted",
        extra={
            "dispute_id": ids.encode("dsp", dispute_id),
            "account_id": ids.encode("acc", account_id),
            "stage": stage,
            "amount_minor": amount_minor,
            "entries": len(entries),
        },
    )
    return True


def _dispute_entry(dispute_id: int, stage: str, account_id: int, currency: str, amount: int, memo: str) -> ledger.Entry:
    debit, credit = {
        "opened": ((ledger.DISPUTES, account_id), (ledger.GATEWAY_CLEARING, None)),
        "won": ((ledger.GATEWAY_CLEARING, None), (ledger.DISPUTES, account_id)),
        "lost": ((ledger.CHARGEBACK_LOSS, None), (ledger.DISPUTES, account_id)),
    }[stage]
    return ledger.Entry(
        DISPUTE_STAGES[stage],
        dispute_id,
        account_id,
        currency,
        memo,
        [ledger.Posting(debit[0], amount, debit[1]), ledger.Posting(credit[0], -amount, credit[1])],
    )


# --- Write-offs, credit notes, voids


@transaction.atomic(durable=True)
def invoice_write_off(*, invoice_id: int, actor: Actor, reason: str) -> Invoice:
    """Finance gives up on what is outstanding: ``uncollectible``, posted to bad debt."""
    reason = _require_reason(reason)
    invoice = _locked_invoice(invoice_id)
    outstanding = invoice.amount_outstanding_minor
    invoice.written_off_minor = outstanding
    _transition(invoice, "write_off", actor=actor, reason=reason)
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


@dataclass(frozen=True, slots=True)
class CreditNoteLineIn:
    description: str
    amount_minor: int  # net of tax, > 0
    sku: str = ""


SETTLE_CREDIT = "credit"


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
    reason = _require_reason(reason)
    with transaction.atomic(durable=True):
        invoice = _locked_invoice(invoice_id)
        _require_creditable(invoice)
        tax, rest = _lines_tax(invoice, lines)
        if invoice.status == InvoiceStatus.PAID and settle != SETTLE_CREDIT:
            raise Conflict(
                "settlement_required",
                "The invoice is paid: settle the credit note as customer credit, "
                "or refund the card from Payments → Refund.",
                field="settle",
            )
        now = timezone.now()
        note = _credit_note_write(invoice, lines=lines, tax=tax, reason=reason, actor=actor, rest=rest, now=now)
        _settle_to_credit(invoice, note=note, actor=actor, now=now)
        _save_settled(
            invoice,
            actor=actor,
            reason=f"settled by credit note {note.number}",
            now=now,
            fields=["amount_credited_minor", "amount_refunded_minor"],
        )
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    return note


def invoice_void(*, invoice_id: int, reason: str, actor: Actor) -> CreditNote:
    """Void an issued, unpaid invoice: a credit note for the whole amount not yet credited,
    credit spent on it given back to its grants, status ``void``."""
    reason = _require_reason(reason)
    with transaction.atomic(durable=True):
        invoice = _locked_invoice(invoice_id)
        if invoice.status != InvoiceStatus.ISSUED:
            raise Conflict("invalid_transition", f"Only an issued invoice can be voided; this one is {invoice.status}.")
        if invoice.amount_paid_minor:
            raise Conflict("invoice_paid", "Payments were received on this invoice: refund them with credit notes.")
        lines = [
            CreditNoteLineIn(
                description=f"Cancellation of invoice {invoice.number}",
                amount_minor=invoice.subtotal_minor - _credited(invoice)[0],
            )
        ]
        tax, _ = _lines_tax(invoice, lines)
        note = _credit_note_write(
            invoice, lines=lines, tax=tax, reason=reason, actor=actor, rest=True, now=timezone.now()
        )
        _reverse_credits(invoice, note=note)
        _transition(invoice, "void", actor=actor, reason=f"{reason} (credit note {note.number})")  # saves it
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    return note


def _credited(invoice: Invoice) -> tuple[int, int]:
    """Net and tax already credited on ``invoice`` by its credit notes."""
    totals = CreditNote.objects.filter(invoice=invoice).aggregate(net=Sum("subtotal_minor"), tax=Sum("tax_minor"))
    return totals["net"] or 0, totals["tax"] or 0


def _require_creditable(invoice: Invoice) -> None:
    if invoice.status not in (InvoiceStatus.ISSUED, InvoiceStatus.PAID):
        raise Conflict(
            "invalid_transition", f"Credit notes need an issued or paid invoice; this one is {invoice.status}."
        )


def _lines_tax(invoice: Invoice, lines: list[CreditNoteLineIn]) -> tuple[int, bool]:
    """The tax of a credit note of ``lines`` (net) on ``invoice``, and whether it credits the
    rest of the invoice. Tax: the invoice's rate on all the net credited so far, rounded
    once, minus the tax already credited, kept within what is left of the invoice's tax;
    crediting the rest of the invoice takes exactly the rest of its tax. So credit notes in
    parts never reverse more (or less) VAT than the invoice charged."""
    if not lines or any(line.amount_minor <= 0 or not line.description.strip() for line in lines):
        raise ApplicationError("invalid", "Each line needs a description and a positive amount.", field="lines")
    net = sum(line.amount_minor for line in lines)
    credited_net, credited_tax = _credited(invoice)
    if net > invoice.subtotal_minor - credited_net:
        raise ApplicationError(
            "invalid_amount",
            f"At most {invoice.subtotal_minor - credited_net} (minor units, net) is left to credit on this invoice.",
            field="lines",
        )
    if net == invoice.subtotal_minor - credited_net:
        return invoice.tax_minor - credited_tax, True
    tax = rule_tax(credited_net + net, rate=invoice.tax_rate, credited_tax=credited_tax, invoice_tax=invoice.tax_minor)
    return tax, False


def _credit_note_write(
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


def _settle_to_credit(invoice: Invoice, *, note: CreditNote, actor: Actor, now: dt.datetime) -> InvoiceRefund | None:
    """What ``note`` credited beyond what was owed on ``invoice`` (more was received than is
    now due), kept as customer credit: a grant whose ledger entry moves it from the
    receivable (debit) to customer credit, recorded as a refund of method ``credit``."""
    excess = -invoice.balance_minor
    if excess <= 0:
        return None
    grant = _credit_grant_write(
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


def _reverse_credits(invoice: Invoice, *, note: CreditNote) -> None:
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


# --- Credits


@transaction.atomic(durable=True)
def credit_grant_create(
    *,
    account_id: int,
    kind: str,
    amount: Decimal,
    currency: str,
    reason: str,
    actor: Actor,
    expires_at: dt.datetime | None = None,
) -> CreditGrant:
    """Grant credit in ``currency`` (the account's). Promotional credit is an expense;
    prepaid credit was paid through the gateway. (Overpayment credit is written by the
    services that receive the money, never granted by hand.)"""
    if kind not in GRANTABLE_CREDIT_KINDS:
        raise ApplicationError("invalid", f"kind must be one of {', '.join(GRANTABLE_CREDIT_KINDS)}.", field="kind")
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None:
        raise NotFound("No such billing account.")
    account_currency = profile.currency  # the account's currency decides
    if currency != account_currency:
        raise ApplicationError("currency_mismatch", f"The account is billed in {account_currency}.", field="currency")
    amount_minor = money.to_minor(amount, currency)
    if amount_minor <= 0 or not money.fits_minor(amount, currency):
        raise ApplicationError(
            "invalid_amount",
            f"A positive amount with at most {money.exponent(currency)} decimal places is required.",
            field="amount",
        )
    now = timezone.now()
    if expires_at is not None and expires_at <= now:
        raise ApplicationError("invalid", "The expiry must be in the future.", field="expires_at")
    reason = _require_reason(reason)
    try:
        return _credit_grant_write(
            account_id=account_id,
            kind=kind,
            currency=currency,
            amount_minor=amount_minor,
            expires_at=expires_at,
            reason=reason,
            granted_by=actor.name,
            debit=ledger.PROMOTIONS if kind == CreditKind.PROMOTIONAL else ledger.GATEWAY_CLEARING,
            memo=f"{kind.title()} credit: {reason}",
            now=now,
        )
    except IntegrityError as exc:  # pragma: no cover - a fresh random id
        raise Conflict("conflict", "Try again.") from exc


def _credit_grant_write(
    *,
    account_id: int,
    kind: str,
    currency: str,
    amount_minor: int,
    reason: str,
    granted_by: str,
    debit: str,
    memo: str,
    now: dt.datetime,
    debit_account_id: int | None = None,
    expires_at: dt.datetime | None = None,
    grant_id: int | None = None,
) -> CreditGrant:
    """Write a grant and its ledger entry (source ``credit_grant``): ``debit`` (where the
    credit comes from: promotions, the gateway, the receivable) debited, customer credit
    credited."""
    grant = CreditGrant.objects.create(
        id=grant_id or ids.new_id(),
        account_id=account_id,
        kind=kind,
        currency=currency,
        amount_minor=amount_minor,
        remaining_minor=amount_minor,
        expires_at=expires_at,
        reason=reason[:300],
        granted_by=granted_by,
        created_at=now,
    )
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.CREDIT_GRANT,
                grant.id,
                account_id,
                currency,
                memo[:300],
                [
                    ledger.Posting(debit, amount_minor, debit_account_id),
                    ledger.Posting(ledger.CUSTOMER_CREDIT, -amount_minor, account_id),
                ],
            )
        ],
        posted_at=now,
    )
    return grant
