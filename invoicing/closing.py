"""The period close: a past month's invoices for every account with usage in it, chunk by
chunk (one durable transaction each, ``issuing.close_chunk``), a bad account isolated and
reported while its neighbours are issued; a preview (dry run); one account's draft and issue;
fanned out per shard to the workers. PDF renders are queued after each chunk's commit."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from celery import current_app
from django.conf import settings
from django.db import DataError, IntegrityError, transaction
from django.utils import timezone

from accounts import selectors as account_selectors
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.audit import audit_context
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.on_commit import queue_task
from invoicing import issuing, planning
from invoicing.models import (
    Invoice,
    InvoiceKind,
    InvoiceStatus,
)
from invoicing.periods import Period, lookback_start
from metering import selectors as metering_selectors
from metering import services as metering_services

log = logging.getLogger(__name__)

CHUNK_ACCOUNTS = 500


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
ACCOUNT_ERRORS: tuple[type[BaseException], ...] = (DataError, IntegrityError, ArithmeticError, ValueError)


def close_chunk_isolated(
    *, period: Period, account_ids: list[int], actor: Actor, render_pdfs: bool = True
) -> issuing.ChunkResult:
    """``issuing.close_chunk``, with one bad account isolated: on an error its data can
    cause, the chunk is split in halves and each is retried, down to the single account,
    which is reported in ``unbillable`` (and logged) instead of blocking its neighbours."""
    started = time.perf_counter()
    try:
        # The set-based close writes invoices with raw SQL: the trail's triggers record them,
        # and this names the writer and whom it ran for.
        with audit_context(actor=actor, writer="invoicing.period_close", period=period.label):
            result = issuing.close_chunk(period=period, account_ids=account_ids, actor=actor)
        if render_pdfs and result.issued:
            queue_task("invoicing.render_documents", kind="invoice", source_ids=result.issued)
    except ACCOUNT_ERRORS as exc:
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
