"""The books hold under any sequence of what the payments app and finance do to invoices:
issue, pay in full, in part, too much, after the invoice was paid (or voided, or written
off), replay a payment, refund part or the rest (a refund beyond what was paid is refused
and leaves nothing), disputes opened then won or lost, credit notes on unpaid and paid
invoices (settled as credit), write-offs and voids. After every step: ``ledger.check()``
finds nothing, no invoice owes less than nothing, credit never disappears, and gateway
clearing holds exactly the money that went through the gateway."""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db.models import Sum
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from accounts.models import BillingAccount
from billing_site.common.errors import ApplicationError
from invoicing import ledger, services
from invoicing.models import (
    CreditApplication,
    CreditGrant,
    CreditNote,
    Invoice,
    InvoicePayment,
    InvoiceRefund,
    InvoiceStatus,
    LedgerEntry,
    LedgerLine,
)
from invoicing.periods import Period
from invoicing.tests.factories import rated
from invoicing.tests.support import FINANCE, NOW

# May to October 2026: each account's invoices are issued month after month.
MONTHS = [Period(dt.date(2026, month, 1)) for month in range(5, 11)]
TABLES = (
    "invoicing_ledgerline, invoicing_ledgerentry, invoicing_creditapplication, invoicing_creditnoteline, "
    "invoicing_invoicerefund, invoicing_creditnote, invoicing_invoicepayment, invoicing_billedusage, "
    "invoicing_discountedusage, invoicing_invoicetransition, invoicing_invoiceline, invoicing_rendereddocument, "
    "invoicing_invoice, invoicing_creditgrant, invoicing_documentsequence, outbox_outboxmessage, metering_dailyusage"
)
PICK = st.integers(0, 1000)  # which of the candidate invoices (modulo their number)
PART = st.sampled_from([Decimal("0.01"), Decimal("0.3"), Decimal("0.5"), Decimal("0.99")])
STATES = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)


pytestmark = pytest.mark.clock(NOW)


def rows() -> tuple[int, ...]:
    return tuple(
        model.objects.count()
        for model in (InvoicePayment, InvoiceRefund, CreditNote, CreditGrant, LedgerEntry, LedgerLine)
    )


class PaymentLedger(RuleBasedStateMachine):
    accounts: list[BillingAccount] = []  # set by the test: EUR in NL (21 % VAT), JPY outside the EU

    def __init__(self) -> None:
        super().__init__()
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no deferred FK checks pending
            cursor.execute(f"TRUNCATE {TABLES}")
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        self.issued_months = {account.id: 0 for account in self.accounts}
        self.sequence = 0
        self.cash: dict[str, int] = defaultdict(int)  # what went through the gateway, by currency
        self.payments: list[tuple[dict[str, object], services.PaymentApplied]] = []
        self.disputes: dict[int, tuple[int, str, int]] = {}  # open: id → account, currency, amount
        self.disputed: set[int] = set()  # payments disputed

    def next_reference(self, prefix: str) -> str:
        self.sequence += 1
        return f"{prefix}_{self.sequence}"

    def pick(self, i: int, *statuses: str, when: Callable[[Invoice], bool] | None = None) -> Invoice | None:
        candidates = [
            invoice
            for invoice in Invoice.objects.filter(status__in=statuses).order_by("number")
            if when is None or when(invoice)
        ]
        return candidates[i % len(candidates)] if candidates else None

    def apply(self, invoice: Invoice, amount_minor: int) -> services.PaymentApplied:
        kwargs: dict[str, object] = {
            "invoice_id": invoice.id,
            "amount_minor": amount_minor,
            "currency": invoice.currency,
            "reference": self.next_reference("pay"),
        }
        with transaction.atomic():
            applied = services.payment_apply(**kwargs)  # type: ignore[arg-type]
        assert applied.applied_minor + applied.credited_minor == amount_minor
        self.cash[invoice.currency] += amount_minor
        self.payments.append((kwargs, applied))
        return applied

    # --- Steps

    @rule(who=st.integers(0, 1), compute=st.decimals("0.01", "800", places=2), egress=st.decimals("0", "90", places=2))
    def issue(self, who: int, compute: Decimal, egress: Decimal) -> None:
        account = self.accounts[who]
        done = self.issued_months[account.id]
        if done == len(MONTHS):
            return
        period = MONTHS[done]
        day = f"{period.start:%Y-%m}-05"
        rated(account.id, day, "compute.vcpu", "1", compute)
        if egress:
            rated(account.id, day, "network.egress", "1", egress)
        services.period_close(
            period=period, actor=FINANCE, account_ids=[account.id], run_rollup=False, render_pdfs=False
        )
        self.issued_months[account.id] += 1

    @rule(i=PICK)
    def pay_in_full(self, i: int) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED)
        if invoice is not None:
            applied = self.apply(invoice, invoice.amount_outstanding_minor)
            assert (applied.credited_minor, applied.invoice_paid) == (0, True)

    @rule(i=PICK, part=PART)
    def pay_in_part(self, i: int, part: Decimal) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED)
        if invoice is not None:
            amount = max(1, int(invoice.amount_outstanding_minor * part))
            assert self.apply(invoice, amount).applied_minor == amount

    @rule(i=PICK, extra=st.integers(1, 5000))
    def overpay(self, i: int, extra: int) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED)
        if invoice is not None:
            applied = self.apply(invoice, invoice.amount_outstanding_minor + extra)
            assert (applied.credited_minor, applied.invoice_paid) == (extra, True)

    @rule(i=PICK, amount=st.integers(1, 20000))
    def pay_after_it_took_no_more(self, i: int, amount: int) -> None:
        invoice = self.pick(i, InvoiceStatus.PAID, InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE)
        if invoice is not None:
            applied = self.apply(invoice, amount)
            assert (applied.applied_minor, applied.credited_minor) == (0, amount)

    @rule(i=PICK)
    def replay_a_payment(self, i: int) -> None:
        if not self.payments:
            return
        kwargs, first = self.payments[i % len(self.payments)]
        before = rows()
        with transaction.atomic():
            assert services.payment_apply(**kwargs) == first  # type: ignore[arg-type]
        assert rows() == before

    @rule(i=PICK, part=st.sampled_from([Decimal("0.01"), Decimal("0.5"), Decimal(1)]))
    def refund(self, i: int, part: Decimal) -> None:
        invoice = self.pick(
            i,
            InvoiceStatus.ISSUED,
            InvoiceStatus.PAID,
            InvoiceStatus.UNCOLLECTIBLE,
            when=lambda inv: inv.amount_paid_minor > inv.amount_refunded_minor,
        )
        if invoice is None:
            return
        refundable = invoice.amount_paid_minor - invoice.amount_refunded_minor
        owed_before = invoice.amount_outstanding_minor
        kwargs = {"invoice_id": invoice.id, "currency": invoice.currency, "reason": "asked", "actor": FINANCE}
        before = rows()
        with transaction.atomic():  # the payments app catches the refusal: nothing was written
            with pytest.raises(ApplicationError) as refused:
                services.refund_record(amount_minor=refundable + 1, reference=self.next_reference("ref"), **kwargs)
            assert refused.value.code == "invalid_amount"
        assert rows() == before
        # The payments app never gives back more than the gateway took in (refunds and open or
        # lost disputes within what was captured; ledger_check holds each account to it).
        amount = min(max(1, int(refundable * part)), self.held(invoice.account_id, invoice.currency))
        if amount <= 0:
            return
        with transaction.atomic():
            recorded = services.refund_record(amount_minor=amount, reference=self.next_reference("ref"), **kwargs)
        self.cash[invoice.currency] -= amount
        note = CreditNote.objects.get(id=recorded.credit_note_id)
        assert note.total_minor == note.subtotal_minor + note.tax_minor == amount
        invoice.refresh_from_db()
        assert invoice.amount_outstanding_minor == owed_before  # what it credited went back

    @rule(i=PICK)
    def dispute_opened(self, i: int) -> None:
        payments = [
            p for p in InvoicePayment.objects.filter(amount_minor__gt=0).order_by("id") if p.id not in self.disputed
        ]
        if not payments:
            return
        payment = payments[i % len(payments)]
        self.disputed.add(payment.id)
        # A dispute withdraws at most what the gateway still holds of the account's money (the
        # payments app refuses the rest; ledger_check holds each account to it).
        amount = min(payment.amount_minor, self.held(payment.account_id, payment.currency))
        if amount <= 0:
            return
        dispute_id = payment.id * 10
        with transaction.atomic():
            assert services.dispute_post(
                dispute_id=dispute_id,
                account_id=payment.account_id,
                currency=payment.currency,
                amount_minor=amount,
                stage="opened",
                memo="chargeback",
            )
        self.cash[payment.currency] -= amount
        self.disputes[dispute_id] = (payment.account_id, payment.currency, amount)

    @rule(i=PICK, won=st.booleans())
    def dispute_closed(self, i: int, won: bool) -> None:
        if not self.disputes:
            return
        dispute_id = sorted(self.disputes)[i % len(self.disputes)]
        account_id, currency, amount = self.disputes.pop(dispute_id)
        kwargs = {
            "dispute_id": dispute_id,
            "account_id": account_id,
            "currency": currency,
            "amount_minor": amount,
            "stage": "won" if won else "lost",
            "memo": "closed",
        }
        with transaction.atomic():
            assert services.dispute_post(**kwargs)  # type: ignore[arg-type]
            assert not services.dispute_post(**kwargs)  # type: ignore[arg-type]
            assert not services.dispute_post(**{**kwargs, "stage": "opened"})  # type: ignore[arg-type]
        if won:
            self.cash[currency] += amount

    @staticmethod
    def held(account_id: int, currency: str) -> int:
        """What gateway clearing holds of ``account_id``'s money: received less given back."""
        return (
            LedgerLine.objects.filter(
                ledger_account="gateway_clearing", entry__account_id=account_id, entry__currency=currency
            ).aggregate(s=Sum("amount_minor"))["s"]
            or 0
        )

    def credit_note(self, invoice: Invoice, part: Decimal, *, settle: str | None) -> None:
        left = invoice.subtotal_minor - sum(invoice.credit_notes.values_list("subtotal_minor", flat=True))
        if left <= 0:
            return
        owed = invoice.amount_outstanding_minor
        refunded = invoice.amount_refunded_minor
        note = services.credit_note_issue(
            invoice_id=invoice.id,
            lines=[
                services.CreditNoteLineIn(
                    description="goodwill", amount_minor=max(1, int(left * part)), sku="compute.vcpu"
                )
            ],
            reason="state machine",
            actor=FINANCE,
            settle=settle,
        )
        invoice.refresh_from_db()
        # Settled as credit: whatever the note credited beyond what was owed.
        assert invoice.amount_refunded_minor - refunded == max(0, note.total_minor - owed)

    @rule(i=PICK, part=PART)
    def credit_note_on_an_unpaid_invoice(self, i: int, part: Decimal) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED)
        if invoice is not None:
            self.credit_note(invoice, part, settle=None)

    @rule(i=PICK, part=PART)
    def credit_note_on_a_paid_invoice(self, i: int, part: Decimal) -> None:
        invoice = self.pick(i, InvoiceStatus.PAID)
        if invoice is not None:
            self.credit_note(invoice, part, settle="credit")

    @rule(i=PICK)
    def write_off(self, i: int) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED)
        if invoice is not None:
            services.invoice_write_off(invoice_id=invoice.id, actor=FINANCE, reason="state machine")

    @rule(i=PICK)
    def void(self, i: int) -> None:
        invoice = self.pick(i, InvoiceStatus.ISSUED, when=lambda inv: inv.amount_paid_minor == 0)
        if invoice is not None:
            services.invoice_void(invoice_id=invoice.id, actor=FINANCE, reason="state machine")

    # --- After every step

    @invariant()
    def the_ledger_checks_out(self) -> None:
        assert ledger.check() == []

    @invariant()
    def no_invoice_owes_less_than_nothing(self) -> None:
        for invoice in Invoice.objects.exclude(status=InvoiceStatus.DRAFT):
            assert invoice.amount_outstanding_minor >= 0
            if invoice.status != InvoiceStatus.VOID:
                assert invoice.balance_minor >= 0, invoice.number
            if invoice.status == InvoiceStatus.PAID:
                assert invoice.amount_outstanding_minor == 0, invoice.number
            if invoice.status == InvoiceStatus.ISSUED:
                assert invoice.amount_outstanding_minor > 0, invoice.number

    @invariant()
    def credit_never_disappears(self) -> None:
        granted = dict(CreditGrant.objects.values_list("currency").annotate(Sum("amount_minor")))
        remaining = dict(CreditGrant.objects.values_list("currency").annotate(Sum("remaining_minor")))
        spent = dict(CreditApplication.objects.values_list("grant__currency").annotate(Sum("amount_minor")))
        for currency, amount in granted.items():
            assert remaining[currency] + spent.get(currency, 0) == amount

    @invariant()
    def gateway_clearing_holds_the_money_that_went_through_the_gateway(self) -> None:
        held = dict(
            LedgerLine.objects.filter(ledger_account="gateway_clearing")
            .values_list("currency")
            .annotate(Sum("amount_minor"))
        )
        assert {c: a for c, a in held.items() if a} == {c: a for c, a in self.cash.items() if a}


def test_the_books_hold_under_any_sequence_of_payments_refunds_disputes_and_credit_notes(
    acct: Callable[..., BillingAccount],
) -> None:
    PaymentLedger.accounts = [acct(currency="EUR", country="NL"), acct(currency="JPY", country="US")]
    try:
        run_state_machine_as_test(PaymentLedger, settings=STATES)
    finally:
        PaymentLedger.accounts = []
