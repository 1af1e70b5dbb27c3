"""Every write of the invoicing app. Keyword-only; one durable transaction per entry point;
state changes under ``select_for_update`` with an audit row; ledger postings in the same
transaction; side effects (PDF rendering) after commit."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from celery import current_app
from django.conf import settings
from django.db import DataError, IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone
from django_fsm import can_proceed

from accounts import selectors as account_selectors
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.on_commit import queue_task
from invoicing import issuing, ledger, numbering, planning
from invoicing.models import (
    CreditApplication,
    CreditGrant,
    CreditKind,
    CreditNote,
    CreditNoteLine,
    Invoice,
    InvoicePayment,
    InvoiceStatus,
    InvoiceTransition,
    LedgerSource,
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
                Invoice.objects.filter(account_id__in=chunk, period_start=period.start)
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


def invoice_draft_compute(*, account_id: int, period: Period) -> Invoice | None:
    """Create or recompute the account's draft for ``period`` (a preview for finance: no
    number, no ledger). Refused once the invoice is issued."""
    with transaction.atomic(durable=True):
        issuing.lock_accounts([account_id])
        invoice = Invoice.objects.select_for_update().filter(account_id=account_id, period_start=period.start).first()
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


@transaction.atomic(durable=True)
def invoice_record_payment(
    *, invoice_id: int, amount_minor: int, currency: str, reference: str, received_at: dt.datetime | None = None
) -> InvoicePayment:
    """Money received against an issued invoice (called by the payments app). The same
    ``reference`` twice records one payment. Fully paid → ``paid``."""
    invoice = _locked_invoice(invoice_id)
    existing = InvoicePayment.objects.filter(reference=reference).first()
    if existing is not None:
        if existing.invoice_id != invoice_id or existing.amount_minor != amount_minor:
            raise Conflict("payment_conflict", f"Payment {reference} was recorded with other details.")
        return existing
    if invoice.status != InvoiceStatus.ISSUED:
        raise Conflict("invalid_transition", f"The invoice is {invoice.status}; it takes no payments.")
    if currency != invoice.currency:
        raise ApplicationError("currency_mismatch", f"The invoice is in {invoice.currency}.", field="currency")
    if not 0 < amount_minor <= invoice.amount_outstanding_minor:
        raise ApplicationError(
            "invalid_amount",
            f"The amount must be between 1 and the outstanding {invoice.amount_outstanding_minor} (minor units).",
            field="amount_minor",
        )
    now = received_at or timezone.now()
    payment = InvoicePayment.objects.create(
        invoice=invoice,
        account_id=invoice.account_id,
        amount_minor=amount_minor,
        currency=currency,
        reference=reference,
        received_at=now,
    )
    invoice.amount_paid_minor += amount_minor
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.PAYMENT,
                payment.id,
                invoice.account_id,
                currency,
                f"Payment {reference} for {invoice.number}",
                [
                    ledger.Posting(ledger.GATEWAY_CLEARING, amount_minor),
                    ledger.Posting(ledger.RECEIVABLE, -amount_minor, invoice.account_id),
                ],
            )
        ],
        posted_at=now,
    )
    if invoice.amount_outstanding_minor == 0:
        invoice.paid_at = now
        _transition(invoice, "mark_paid", actor=Actor.system("payments"), reason=f"payment {reference}")
    else:
        invoice.save()
    return payment


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


def credit_note_issue(*, invoice_id: int, lines: list[CreditNoteLineIn], reason: str, actor: Actor) -> CreditNote:
    with transaction.atomic(durable=True):
        invoice = _locked_invoice(invoice_id)
        note = _credit_note_insert(invoice, lines=lines, reason=_require_reason(reason), actor=actor)
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
        remaining_net = invoice.subtotal_minor - _credited(invoice)[0]
        note = _credit_note_insert(
            invoice,
            lines=[
                CreditNoteLineIn(description=f"Cancellation of invoice {invoice.number}", amount_minor=remaining_net)
            ],
            reason=reason,
            actor=actor,
            whole=True,
        )
        _reverse_credits(invoice, note=note)
        _transition(invoice, "void", actor=actor, reason=f"{reason} (credit note {note.number})")
    queue_task("invoicing.render_documents", kind="credit_note", source_ids=[note.id])
    return note


def _credited(invoice: Invoice) -> tuple[int, int]:
    """Net and tax already credited on ``invoice`` by its credit notes."""
    totals = CreditNote.objects.filter(invoice=invoice).aggregate(net=Sum("subtotal_minor"), tax=Sum("tax_minor"))
    return totals["net"] or 0, totals["tax"] or 0


def _credit_note_insert(
    invoice: Invoice, *, lines: list[CreditNoteLineIn], reason: str, actor: Actor, whole: bool = False
) -> CreditNote:
    if invoice.status not in (InvoiceStatus.ISSUED, InvoiceStatus.PAID):
        raise Conflict(
            "invalid_transition", f"Credit notes need an issued or paid invoice; this one is {invoice.status}."
        )
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
    # Tax: the invoice's rate on all the net credited so far, rounded once, minus the tax
    # already credited, kept within what is left of the invoice's tax; crediting the rest of
    # the invoice takes exactly the rest of its tax. So credit notes in parts never reverse
    # more (or less) VAT than the invoice charged.
    if whole or net == invoice.subtotal_minor - credited_net:
        tax = invoice.tax_minor - credited_tax
    else:
        cumulative = money.percent_of_minor(credited_net + net, invoice.tax_rate)
        tax = min(max(cumulative - credited_tax, 0), invoice.tax_minor - credited_tax)
    now = timezone.now()
    number = numbering.take(settings.INVOICING_CREDIT_NOTE_SERIES, now.year)[0]
    note = CreditNote.objects.create(
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
    if invoice.status == InvoiceStatus.ISSUED and invoice.amount_outstanding_minor == 0 and not whole:
        # Nothing is owed any more: settled (a void, ``whole``, moves it to ``void`` instead).
        invoice.paid_at = now
        _transition(invoice, "mark_paid", actor=actor, reason=f"settled by credit note {number}")
    else:
        invoice.save(update_fields=["amount_credited_minor", "updated_at"])
    by_family: dict[str, int] = defaultdict(int)
    if whole:
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
    prepaid credit was paid through the gateway."""
    if kind not in CreditKind.values:
        raise ApplicationError("invalid", f"kind must be one of {', '.join(CreditKind.values)}.", field="kind")
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
    grant = CreditGrant.objects.create(
        account_id=account_id,
        kind=kind,
        currency=currency,
        amount_minor=amount_minor,
        remaining_minor=amount_minor,
        expires_at=expires_at,
        reason=_require_reason(reason),
        granted_by=actor.name,
        created_at=now,
    )
    source = ledger.PROMOTIONS if kind == CreditKind.PROMOTIONAL else ledger.GATEWAY_CLEARING
    try:
        ledger.post(
            [
                ledger.Entry(
                    LedgerSource.CREDIT_GRANT,
                    grant.id,
                    account_id,
                    currency,
                    f"{kind.title()} credit: {reason}",
                    [
                        ledger.Posting(source, amount_minor),
                        ledger.Posting(ledger.CUSTOMER_CREDIT, -amount_minor, account_id),
                    ],
                )
            ],
            posted_at=now,
        )
    except IntegrityError as exc:  # pragma: no cover - a fresh random id
        raise Conflict("conflict", "Try again.") from exc
    return grant
