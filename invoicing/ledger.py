"""The double-entry ledger: append-only, every source posts once, every entry balances.

Amounts are integer minor units, debits positive and credits negative. Ledger accounts:

=====================  ==============================================================
``receivable``         what a billing account owes us (per ``account_id``)
``customer_credit``    credit we owe a billing account, spendable on invoices (liability)
``revenue:<family>``   revenue per SKU family (``compute``, ``network`` …)
``vat_payable:<CC>``   VAT owed to a member state
``gateway_clearing``   money received through (or refunded via) the payment gateway
``bad_debt``           written-off receivables (expense)
``promotions``         promotional credit given away (expense)
``disputes``           funds the bank withdrew for a disputed payment while the dispute is
                       open (per ``account_id``; back to zero once it is won or lost)
``chargeback_loss``    disputes lost: the funds are gone for good (expense)
=====================  ==============================================================

Sources and what they post (debit / credit):

=====================  ==============================================================
``invoice``            receivable / revenue per family and VAT (an issued invoice)
``invoice_credit``     customer credit / receivable (credit spent on the invoice)
``credit_grant``       promotions, gateway clearing (prepaid; an overpayment kept as
                       credit) or receivable (a credit note settled as credit) / customer
                       credit
``payment``            gateway clearing / receivable (what a payment applied to its invoice)
``credit_note``        revenue per family and VAT / receivable
``refund``             receivable / gateway clearing (a credit note's amount refunded to
                       the card; an ``InvoiceRefund`` of method ``card``)
``credit_reversal``    receivable / customer credit (credit given back when voiding)
``write_off``          bad debt / receivable
``dispute_opened``     disputes / gateway clearing (the bank withdrew the funds)
``dispute_won``        gateway clearing / disputes (the funds came back)
``dispute_lost``       chargeback loss / disputes
=====================  ==============================================================

``(source_type, source_id)`` is unique (a dispute's stages are told apart by their source
type; the id is the payments app's dispute); tables are append-only (a trigger refuses UPDATE
and DELETE); corrections are new entries.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.utils import timezone

from billing_site.common import money
from billing_site.common.copy import copy_rows
from billing_site.common.logs import ms_since
from invoicing.models import LedgerSource
from invoicing.signals import ledger_checking
from metering import selectors as metering_selectors

log = logging.getLogger(__name__)

RECEIVABLE = "receivable"
CUSTOMER_CREDIT = "customer_credit"
GATEWAY_CLEARING = "gateway_clearing"
BAD_DEBT = "bad_debt"
PROMOTIONS = "promotions"
DISPUTES = "disputes"
CHARGEBACK_LOSS = "chargeback_loss"


def revenue(family: str) -> str:
    return f"revenue:{family}"


def vat_payable(country: str) -> str:
    return f"vat_payable:{country}"


@dataclass(frozen=True, slots=True)
class Posting:
    ledger_account: str
    amount_minor: int  # debit > 0, credit < 0
    account_id: int | None = None  # the billing account, for per-customer ledger accounts


@dataclass(frozen=True, slots=True)
class Entry:
    source_type: LedgerSource
    source_id: int
    account_id: int | None
    currency: str
    memo: str
    postings: list[Posting]


class UnbalancedEntry(ValueError):
    pass


def post(entries: list[Entry], *, posted_at: dt.datetime) -> None:
    """Post entries inside the caller's transaction (set-based: one INSERT for the entries,
    one COPY for their lines). A source that already posted raises IntegrityError. An entry
    whose every amount is zero moves nothing and is not posted."""
    entries = [e for e in entries if any(p.amount_minor for p in e.postings)]
    if not entries:
        return
    for entry in entries:
        if sum(p.amount_minor for p in entry.postings) != 0:
            raise UnbalancedEntry(f"{entry.source_type} {entry.source_id} does not balance: {entry.postings}")
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO invoicing_ledgerentry (account_id, source_type, source_id, currency, memo, posted_at)
            SELECT e.account_id, e.source_type, e.source_id, e.currency, e.memo, %s
            FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::text[])
                 AS e(account_id, source_type, source_id, currency, memo)
            RETURNING source_type, source_id, id
            """,
            [
                posted_at,
                [e.account_id for e in entries],
                [e.source_type for e in entries],
                [e.source_id for e in entries],
                [e.currency for e in entries],
                [e.memo for e in entries],
            ],
        )
        entry_ids = {(source_type, source_id): id_ for source_type, source_id, id_ in cursor.fetchall()}
    copy_rows(
        "invoicing_ledgerline",
        ("entry_id", "account_id", "ledger_account", "currency", "amount_minor"),
        (
            (entry_ids[(e.source_type, e.source_id)], p.account_id, p.ledger_account, e.currency, p.amount_minor)
            for e in entries
            for p in e.postings
            if p.amount_minor
        ),
    )


@dataclass(frozen=True, slots=True)
class IssuedInvoice:
    invoice_id: int
    account_id: int
    currency: str
    number: str
    total_minor: int
    tax_minor: int
    tax_country: str
    revenue_by_family: dict[str, int]
    credits_applied_minor: int


def post_invoices_issued(invoices: list[IssuedInvoice], *, posted_at: dt.datetime) -> None:
    """Receivable up by the total; revenue per SKU family and VAT owed by the same; then the
    credit spent on it moves from customer credit to the receivable."""
    entries = []
    for inv in invoices:
        postings = [Posting(RECEIVABLE, inv.total_minor, inv.account_id)]
        postings += [Posting(revenue(family), -amount) for family, amount in sorted(inv.revenue_by_family.items())]
        if inv.tax_minor:
            postings.append(Posting(vat_payable(inv.tax_country), -inv.tax_minor))
        entries.append(
            Entry(LedgerSource.INVOICE, inv.invoice_id, inv.account_id, inv.currency, f"Invoice {inv.number}", postings)
        )
        if inv.credits_applied_minor:
            entries.append(
                Entry(
                    LedgerSource.INVOICE_CREDIT,
                    inv.invoice_id,
                    inv.account_id,
                    inv.currency,
                    f"Credit applied to {inv.number}",
                    [
                        Posting(CUSTOMER_CREDIT, inv.credits_applied_minor, inv.account_id),
                        Posting(RECEIVABLE, -inv.credits_applied_minor, inv.account_id),
                    ],
                )
            )
    post(entries, posted_at=posted_at)


# --- The invariants


def check(*, usage_since: dt.date | None = None) -> list[str]:
    """Every violation of the ledger's invariants, as sentences (empty: all hold). Outside a
    transaction it reads one consistent snapshot (REPEATABLE READ, read-only), so a billing
    run committing meanwhile cannot show up as a gap or a mismatch. Billed against rated
    usage is compared for usage months from ``usage_since`` (default: twelve months ago)."""
    if usage_since is None:
        today = timezone.now().date()
        usage_since = dt.date(today.year - 1, today.month, 1)
    started = time.monotonic()
    if connection.in_atomic_block:
        problems = _check(usage_since)
    else:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            problems = _check(usage_since)
    log.log(
        logging.ERROR if problems else logging.INFO,
        "ledger.check",
        extra={
            "violations": len(problems),
            "first": problems[0] if problems else None,
            "usage_since": usage_since.isoformat(),
            "duration_ms": ms_since(started),
        },
    )
    return problems


def _check(usage_since: dt.date) -> list[str]:
    problems = _billed_against_rated(usage_since)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT e.id, e.source_type, e.source_id, l.currency, sum(l.amount_minor), count(*)
            FROM invoicing_ledgerentry e LEFT JOIN invoicing_ledgerline l ON l.entry_id = e.id
            GROUP BY 1, 2, 3, 4
            HAVING coalesce(sum(l.amount_minor), 0) <> 0 OR count(l.id) < 2 OR l.currency IS DISTINCT FROM e.currency
            ORDER BY 1
            """
        )
        for entry_id, source_type, source_id, currency, total, lines in cursor.fetchall():
            problems.append(
                f"entry {entry_id} ({source_type} {source_id}) does not balance in {currency}: "
                f"sum {total} over {lines} lines"
            )
        cursor.execute(
            "SELECT source_type, source_id, count(*) FROM invoicing_ledgerentry GROUP BY 1, 2 HAVING count(*) > 1"
        )
        for source_type, source_id, count in cursor.fetchall():
            problems.append(f"{source_type} {source_id} posted {count} times")
        # Every document posted: issued invoices, payments (what they applied), credit notes,
        # write-offs, grants, refunds to the card.
        cursor.execute(
            """
            WITH sources(source_type, source_id) AS (
                -- an invoice whose postings are all zero (no total, no tax, each revenue family
                -- netting to zero) moves no money and posts nothing
                SELECT %(invoice)s, i.id FROM invoicing_invoice i WHERE i.status <> 'draft' AND (
                    i.total_minor <> 0 OR i.tax_minor <> 0
                    OR EXISTS (
                        SELECT FROM invoicing_invoiceline l WHERE l.invoice_id = i.id
                        GROUP BY l.revenue_family HAVING sum(l.amount_minor) <> 0))
                UNION ALL SELECT %(payment)s, id FROM invoicing_invoicepayment WHERE amount_minor > 0
                UNION ALL SELECT %(credit_note)s, id FROM invoicing_creditnote
                UNION ALL SELECT %(write_off)s, id FROM invoicing_invoice WHERE written_off_minor > 0
                UNION ALL SELECT %(credit_grant)s, id FROM invoicing_creditgrant
                UNION ALL SELECT %(refund)s, id FROM invoicing_invoicerefund WHERE method = 'card'
            )
            SELECT s.source_type, s.source_id FROM sources s
            WHERE NOT EXISTS (
                SELECT FROM invoicing_ledgerentry e WHERE e.source_type = s.source_type AND e.source_id = s.source_id
            )
            """,
            {source.value: source.value for source in LedgerSource},
        )
        for source_type, source_id in cursor.fetchall():
            problems.append(f"{source_type} {source_id} has no ledger entry")
        # Each account's receivable and customer credit against its documents.
        cursor.execute(
            """
            WITH ledger AS (
                SELECT account_id, currency,
                       sum(amount_minor) FILTER (WHERE ledger_account = 'receivable') AS receivable,
                       -sum(amount_minor) FILTER (WHERE ledger_account = 'customer_credit') AS credit
                FROM invoicing_ledgerline WHERE account_id IS NOT NULL GROUP BY 1, 2
            ), documents AS (
                SELECT account_id, currency, sum(receivable) AS receivable, sum(credit) AS credit FROM (
                    SELECT account_id, currency,
                           total_minor - amount_paid_minor - written_off_minor + amount_refunded_minor AS receivable,
                           0 AS credit
                    FROM invoicing_invoice WHERE status <> 'draft'
                    UNION ALL
                    SELECT a.account_id, i.currency, -a.amount_minor, 0
                    FROM invoicing_creditapplication a JOIN invoicing_invoice i ON i.id = a.invoice_id
                    UNION ALL
                    SELECT account_id, currency, -total_minor, 0 FROM invoicing_creditnote
                    UNION ALL
                    SELECT account_id, currency, 0, remaining_minor FROM invoicing_creditgrant
                ) d GROUP BY 1, 2
            )
            SELECT coalesce(l.account_id, d.account_id), coalesce(l.currency, d.currency),
                   coalesce(l.receivable, 0), coalesce(d.receivable, 0), coalesce(l.credit, 0), coalesce(d.credit, 0)
            FROM ledger l FULL JOIN documents d ON d.account_id = l.account_id AND d.currency = l.currency
            WHERE coalesce(l.receivable, 0) <> coalesce(d.receivable, 0)
               OR coalesce(l.credit, 0) <> coalesce(d.credit, 0)
            """
        )
        for account_id, currency, ledger_receivable, doc_receivable, ledger_credit, doc_credit in cursor.fetchall():
            if ledger_receivable != doc_receivable:
                problems.append(
                    f"account {account_id} {currency}: receivable {ledger_receivable} in the ledger, "
                    f"{doc_receivable} by its documents"
                )
            if ledger_credit != doc_credit:
                problems.append(
                    f"account {account_id} {currency}: customer credit {ledger_credit} in the ledger, "
                    f"{doc_credit} unspent in its grants"
                )
        # Documents agree with themselves.
        cursor.execute(
            """
            SELECT i.id FROM invoicing_invoice i
            LEFT JOIN (SELECT invoice_id, sum(amount_minor) AS s FROM invoicing_invoiceline GROUP BY 1) l
                   ON l.invoice_id = i.id
            WHERE i.status <> 'draft'
              AND (coalesce(l.s, 0) <> i.subtotal_minor OR i.total_minor <> i.subtotal_minor + i.tax_minor)
            """
        )
        for (invoice_id,) in cursor.fetchall():
            problems.append(f"invoice {invoice_id}: lines, subtotal, tax and total do not add up")
        cursor.execute(
            """
            SELECT g.id FROM invoicing_creditgrant g
            LEFT JOIN (SELECT grant_id, sum(amount_minor) AS s FROM invoicing_creditapplication GROUP BY 1) a
                   ON a.grant_id = g.id
            WHERE g.remaining_minor <> g.amount_minor - coalesce(a.s, 0)
            """
        )
        for (grant_id,) in cursor.fetchall():
            problems.append(f"credit grant {grant_id}: remaining does not match its applications")
        # Each invoice's running amounts against the rows behind them, and its own entry.
        cursor.execute(
            """
            SELECT i.id,
                   i.credits_applied_minor <> coalesce((
                       SELECT sum(a.amount_minor) FROM invoicing_creditapplication a
                       WHERE a.invoice_id = i.id AND a.amount_minor > 0), 0),
                   i.amount_paid_minor <> coalesce((SELECT sum(p.amount_minor) FROM invoicing_invoicepayment p
                                                    WHERE p.invoice_id = i.id), 0),
                   i.amount_credited_minor <> coalesce((SELECT sum(c.total_minor) FROM invoicing_creditnote c
                                                        WHERE c.invoice_id = i.id), 0),
                   i.amount_refunded_minor <> coalesce((SELECT sum(r.amount_minor) FROM invoicing_invoicerefund r
                                                        WHERE r.invoice_id = i.id), 0),
                   EXISTS (SELECT FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id
                           WHERE e.source_type = %s AND e.source_id = i.id
                           GROUP BY e.id
                           HAVING coalesce(sum(l.amount_minor) FILTER (WHERE l.ledger_account = 'receivable'), 0)
                                  <> i.total_minor
                               OR coalesce(-sum(l.amount_minor)
                                           FILTER (WHERE starts_with(l.ledger_account, 'vat_payable:')), 0)
                                  <> i.tax_minor)
            FROM invoicing_invoice i WHERE i.status <> 'draft'
            """,
            [LedgerSource.INVOICE.value],
        )
        for invoice_id, credits, paid, credited, refunded, entry in cursor.fetchall():
            for wrong, what in (
                (credits, "credits applied"),
                (paid, "amount paid"),
                (credited, "amount credited"),
                (refunded, "amount refunded"),
            ):
                if wrong:
                    problems.append(f"invoice {invoice_id}: {what} does not match the rows behind it")
            if entry:
                problems.append(f"invoice {invoice_id}: its ledger entry's receivable or VAT is not the invoice's")
        # No invoice owes a negative amount: what was received or credited beyond what is due
        # is settled as credit (a void invoice gives its spent credit back to the grants).
        cursor.execute(
            """
            SELECT id, greatest(total_minor - credits_applied_minor, 0) - amount_paid_minor - amount_credited_minor
                       - written_off_minor + amount_refunded_minor
            FROM invoicing_invoice
            WHERE status NOT IN ('draft', 'void')
              AND greatest(total_minor - credits_applied_minor, 0) - amount_paid_minor - amount_credited_minor
                  - written_off_minor + amount_refunded_minor < 0
            """
        )
        for invoice_id, balance in cursor.fetchall():
            problems.append(f"invoice {invoice_id}: owes {balance}, less than nothing (an unsettled excess)")
        problems += _payments_refunds_and_disputes(cursor)
        problems += _gateway_clearing(cursor)
    problems += _numbering_gaps()
    # The apps that keep money's details the ledger only sums (payments: per payment, refunds
    # and disputes within what was captured), in the same snapshot.
    for _receiver, found in ledger_checking.send(sender=__name__):
        problems += list(found or [])
    return problems


def _gateway_clearing(cursor: CursorWrapper) -> list[str]:
    """Per account and currency, what went back through the gateway (refunds to the card,
    funds withdrawn by disputes still open or lost) never exceeds what came in through it
    (payments, overpayments): its gateway clearing never nets to a credit."""
    cursor.execute(
        """
        SELECT e.account_id, e.currency,
               sum(l.amount_minor) FILTER (WHERE l.amount_minor > 0),
               -sum(l.amount_minor) FILTER (WHERE l.amount_minor < 0)
        FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id
        WHERE l.ledger_account = %s AND e.account_id IS NOT NULL
        GROUP BY 1, 2
        HAVING sum(l.amount_minor) < 0
        ORDER BY 1, 2
        """,
        [GATEWAY_CLEARING],
    )
    return [
        f"account {account_id} {currency}: gateway clearing gave back {out or 0} (refunds and disputes), "
        f"more than the {came or 0} received through it"
        for account_id, currency, came, out in cursor.fetchall()
    ]


def _payments_refunds_and_disputes(cursor: CursorWrapper) -> list[str]:
    """Money received and given back agrees with the entries behind it; disputes close once."""
    problems = []
    # A payment's excess is an overpayment grant of exactly that amount, from the gateway.
    cursor.execute(
        """
        SELECT p.id FROM invoicing_invoicepayment p
        LEFT JOIN invoicing_creditgrant g ON g.id = p.credit_grant_id
        WHERE (p.credit_grant_id IS NOT NULL OR p.received_minor <> p.amount_minor)
          AND (g.id IS NULL OR g.kind <> 'overpayment' OR g.amount_minor <> p.received_minor - p.amount_minor
               OR g.currency <> p.currency OR g.account_id <> p.account_id
               OR NOT EXISTS (
                   SELECT FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id
                   WHERE e.source_type = 'credit_grant' AND e.source_id = g.id
                     AND l.ledger_account = 'gateway_clearing' AND l.amount_minor = g.amount_minor))
        """
    )
    for (payment_id,) in cursor.fetchall():
        problems.append(f"payment {payment_id}: its excess is not an overpayment grant from the gateway")
    # A refund to the card: its credit note is for exactly the amount, its entry moves exactly
    # the amount from gateway clearing back to the receivable.
    cursor.execute(
        """
        SELECT r.id FROM invoicing_invoicerefund r
        JOIN invoicing_creditnote n ON n.id = r.credit_note_id
        WHERE r.method = 'card' AND (
            n.total_minor <> r.amount_minor OR n.invoice_id <> r.invoice_id OR r.currency <> n.currency
            OR EXISTS (
                SELECT FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id
                WHERE e.source_type = %s AND e.source_id = r.id
                GROUP BY e.id
                HAVING coalesce(sum(l.amount_minor) FILTER (
                           WHERE l.ledger_account = 'receivable' AND l.account_id = r.account_id), 0)
                       <> r.amount_minor
                    OR coalesce(-sum(l.amount_minor) FILTER (WHERE l.ledger_account = 'gateway_clearing'), 0)
                       <> r.amount_minor))
        """,
        [LedgerSource.REFUND.value],
    )
    for (refund_id,) in cursor.fetchall():
        problems.append(f"refund {refund_id}: its credit note or ledger entry is not for its amount")
    # A settlement as credit: an overpayment grant of exactly the amount, from the receivable.
    cursor.execute(
        """
        SELECT r.id FROM invoicing_invoicerefund r
        LEFT JOIN invoicing_creditgrant g ON g.id = r.grant_id
        WHERE r.method = 'credit' AND (
            g.id IS NULL OR g.kind <> 'overpayment' OR g.amount_minor <> r.amount_minor
            OR g.account_id <> r.account_id OR g.currency <> r.currency
            OR NOT EXISTS (
                SELECT FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id
                WHERE e.source_type = 'credit_grant' AND e.source_id = g.id
                  AND l.ledger_account = 'receivable' AND l.account_id = r.account_id
                  AND l.amount_minor = r.amount_minor))
        """
    )
    for (refund_id,) in cursor.fetchall():
        problems.append(f"refund {refund_id}: not settled by an overpayment grant of its amount from the receivable")
    # Every overpayment grant is backed by exactly one payment's excess or one settlement.
    cursor.execute(
        """
        SELECT g.id FROM invoicing_creditgrant g
        WHERE g.kind = 'overpayment'
          AND (SELECT count(*) FROM invoicing_invoicepayment p WHERE p.credit_grant_id = g.id)
            + (SELECT count(*) FROM invoicing_invoicerefund r WHERE r.grant_id = g.id) <> 1
        """
    )
    for (grant_id,) in cursor.fetchall():
        problems.append(f"credit grant {grant_id}: an overpayment grant not backed by one payment or settlement")
    # Disputes: a close has its opening, of the same amount; none is closed both ways.
    cursor.execute(
        """
        SELECT e.source_id,
               array_agg(e.source_type ORDER BY e.source_type),
               count(DISTINCT (e.currency, abs(l.amount_minor)))
        FROM invoicing_ledgerentry e JOIN invoicing_ledgerline l ON l.entry_id = e.id AND l.ledger_account = %s
        WHERE e.source_type IN (%s, %s, %s)
        GROUP BY 1
        """,
        [
            DISPUTES,
            LedgerSource.DISPUTE_OPENED.value,
            LedgerSource.DISPUTE_WON.value,
            LedgerSource.DISPUTE_LOST.value,
        ],
    )
    for dispute_id, stages, amounts in cursor.fetchall():
        if LedgerSource.DISPUTE_OPENED not in stages:
            problems.append(f"dispute {dispute_id}: closed without being opened")
        if LedgerSource.DISPUTE_WON in stages and LedgerSource.DISPUTE_LOST in stages:
            problems.append(f"dispute {dispute_id}: both won and lost")
        if amounts > 1:
            problems.append(f"dispute {dispute_id}: its stages move different amounts")
    return problems


def _billed_against_rated(usage_since: dt.date) -> list[str]:
    """Invoices bill each usage month exactly once in total:

    - no invoice bills usage of a month after its own period;
    - once an account's usage month is closed — an invoice of that month or a later one was
      issued after the month's last event could still be accepted (its end plus
      ``METERING_MAX_EVENT_AGE_DAYS``) — what its invoices billed of each SKU (quantity, rated
      amount, and minor units = the month's rated total rounded once) is the rated usage."""
    problems: list[str] = []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT b.invoice_id, b.usage_month, i.period_start FROM invoicing_billedusage b
            JOIN invoicing_invoice i ON i.id = b.invoice_id AND i.account_id = b.account_id
            WHERE b.usage_month > i.period_start
            UNION
            SELECT l.invoice_id, l.usage_month, i.period_start FROM invoicing_invoiceline l
            JOIN invoicing_invoice i ON i.id = l.invoice_id AND i.account_id = l.account_id
            WHERE l.usage_month > i.period_start
            ORDER BY 1, 2
            """
        )
        for invoice_id, month, period_start in cursor.fetchall():
            problems.append(f"invoice {invoice_id} of {period_start:%Y-%m} bills usage of a later month, {month:%Y-%m}")
        cursor.execute(
            """
            SELECT account_id, min(currency),
                   max(least(period_start, ((date_trunc('month', issued_at - make_interval(days => %s), 'UTC')
                                             AT TIME ZONE 'UTC') - interval '1 month')::date))
            FROM invoicing_invoice WHERE status <> 'draft' AND issued_at IS NOT NULL
            GROUP BY 1
            """,
            [settings.METERING_MAX_EVENT_AGE_DAYS],
        )
        closed: dict[int, dt.date] = {}
        currency: dict[int, str] = {}
        for account_id, account_currency, through in cursor.fetchall():
            if through >= usage_since:
                closed[account_id] = through
                currency[account_id] = account_currency
        if not closed:
            return problems
        accounts = sorted(closed)
        cursor.execute(
            """
            SELECT b.account_id, b.usage_month, b.sku, sum(b.quantity), sum(b.rated_amount), sum(b.amount_minor)
            FROM unnest(%s::bigint[], %s::date[]) AS c(account_id, through)
            JOIN invoicing_billedusage b
              ON b.account_id = c.account_id AND b.usage_month >= %s AND b.usage_month <= c.through
            GROUP BY 1, 2, 3
            """,
            [accounts, [closed[a] for a in accounts], usage_since],
        )
        billed = {(a, month, sku): (q, amount, minor) for a, month, sku, q, amount, minor in cursor.fetchall()}
    rated = {
        (u.account_id, u.month, u.sku): (u.quantity, u.amount)
        for u in metering_selectors.monthly_usage_through(through=closed, since=usage_since)
    }
    zero = Decimal(0)
    for key in sorted(set(billed) | set(rated)):
        account_id, month, sku = key
        billed_q, billed_amount, billed_minor = billed.get(key, (zero, zero, 0))
        rated_q, rated_amount = rated.get(key, (zero, zero))
        rated_minor = money.to_minor(rated_amount, currency[account_id])
        if (billed_q, billed_amount, billed_minor) != (rated_q, rated_amount, rated_minor):
            problems.append(
                f"account {account_id} usage {month:%Y-%m} {sku} is closed but billed {billed_q} for "
                f"{money.format_minor(int(billed_minor), currency[account_id])} {currency[account_id]} "
                f"while {rated_q} rated {rated_amount} ({money.format_minor(rated_minor, currency[account_id])})"
            )
    return problems


def _numbering_gaps() -> list[str]:
    """Numbers of each series and year are exactly 1..last, each once."""
    problems = []
    numbers: dict[tuple[str, int], list[int]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT number FROM invoicing_invoice WHERE number IS NOT NULL "
            "UNION ALL SELECT number FROM invoicing_creditnote"
        )
        for (number,) in cursor.fetchall():
            series, year, n = number.rsplit("-", 2)
            numbers[(series, int(year))].append(int(n))
        cursor.execute("SELECT series, year, last_number FROM invoicing_documentsequence")
        last = {(series, year): n for series, year, n in cursor.fetchall()}
    for key in sorted(set(numbers) | set(last)):
        taken = sorted(numbers.get(key, []))
        if taken != list(range(1, last.get(key, 0) + 1)):
            problems.append(f"series {key[0]} {key[1]}: numbers are not exactly 1..{last.get(key, 0)}")
    return problems
