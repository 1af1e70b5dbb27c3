"""What invoicing offers the payments app: payments applied (an excess kept as credit, never
lost), refunds to the card and credit notes settled as credit (no negative receivable left),
disputes posted to the ledger, the selectors it reads, and the charge queued after issue."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from decimal import Decimal

import pytest
import time_machine
from django.db import connection, transaction
from hypothesis import given, settings
from hypothesis import strategies as st

from accounts.models import BillingAccount
from billing_site.common import money
from billing_site.common.errors import ApplicationError, Conflict
from billing_site.outbox.models import OutboxMessage
from invoicing import ledger, selectors, services, taxes
from invoicing.models import (
    CreditGrant,
    CreditKind,
    CreditNote,
    Invoice,
    InvoicePayment,
    InvoiceRefund,
    InvoiceStatus,
    LedgerEntry,
    LedgerLine,
)
from invoicing.tests.factories import promotional_credit, rated
from invoicing.tests.support import FINANCE, NOVEMBER, NOW, OCTOBER

PROFILE = settings(max_examples=200, deadline=None, derandomize=bool(os.environ.get("CI")))


pytestmark = pytest.mark.clock(NOW)


def issue(account: BillingAccount, amount: str = "100", *, day: str = "2026-10-02") -> Invoice:
    """October's invoice for ``account``: ``amount`` of compute (NL: + 21 % VAT)."""
    rated(account.id, day, "compute.vcpu", "100", amount)
    services.period_close(period=OCTOBER, actor=FINANCE, account_ids=[account.id], run_rollup=False, render_pdfs=False)
    return Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)


def field_of(error: ApplicationError) -> str | None:
    """The field an error names (its first), as the API reports it."""
    return error.errors[0]["field"] if error.errors else None


def balance(ledger_account: str, account_id: int | None = None) -> int:
    lines = LedgerLine.objects.filter(ledger_account=ledger_account)
    if account_id is not None:
        lines = lines.filter(account_id=account_id)
    return sum(lines.values_list("amount_minor", flat=True))


def rows() -> tuple[int, ...]:
    """How many rows the money tables hold (a refusal or a replay adds none)."""
    return tuple(
        model.objects.count()
        for model in (InvoicePayment, InvoiceRefund, CreditNote, CreditGrant, LedgerEntry, LedgerLine)
    )


def pay(invoice: Invoice, amount_minor: int, reference: str) -> services.PaymentApplied:
    with transaction.atomic():  # the payments app's outcome transaction
        return services.payment_apply(
            invoice_id=invoice.id, amount_minor=amount_minor, currency=invoice.currency, reference=reference
        )


def refund(invoice: Invoice, amount_minor: int, reference: str) -> services.RefundRecorded:
    with transaction.atomic():
        return services.refund_record(
            invoice_id=invoice.id,
            amount_minor=amount_minor,
            currency=invoice.currency,
            reference=reference,
            reason="customer asked",
            actor=FINANCE,
        )


@pytest.fixture
def nl(acct: Callable[..., BillingAccount]) -> BillingAccount:
    return acct(currency="EUR", country="NL")


# --- payment_apply


def test_a_payment_in_full_marks_the_invoice_paid(nl: BillingAccount) -> None:
    invoice = issue(nl)
    assert invoice.total_minor == 12100
    applied = pay(invoice, 12100, "pay_1")
    assert applied == services.PaymentApplied(
        invoice_id=invoice.id,
        account_id=nl.id,
        applied_minor=12100,
        credited_minor=0,
        invoice_paid=True,
        invoice_number=invoice.number,
    )
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_paid_minor, invoice.paid_at) == (InvoiceStatus.PAID, 12100, NOW)
    transition = invoice.transitions.first()
    assert transition is not None
    assert (transition.to_state, transition.actor_name, transition.reason) == ("paid", "payments", "payment pay_1")
    entry = LedgerEntry.objects.get(source_type="payment")
    assert {line.ledger_account: line.amount_minor for line in entry.lines.all()} == {
        "gateway_clearing": 12100,
        "receivable": -12100,
    }
    assert balance("receivable", nl.id) == 0
    assert not CreditGrant.objects.exists()
    assert ledger.check() == []


def test_parts_then_an_overpayment_keep_the_excess_as_credit(nl: BillingAccount) -> None:
    invoice = issue(nl)
    first = pay(invoice, 5000, "pay_1")
    assert (first.applied_minor, first.credited_minor, first.invoice_paid) == (5000, 0, False)
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_outstanding_minor) == (InvoiceStatus.ISSUED, 7100)
    second = pay(invoice, 10000, "pay_2")
    assert (second.applied_minor, second.credited_minor, second.invoice_paid) == (7100, 2900, True)
    grant = CreditGrant.objects.get()
    assert (grant.kind, grant.amount_minor, grant.remaining_minor, grant.expires_at) == (
        CreditKind.OVERPAYMENT,
        2900,
        2900,
        None,
    )
    assert "pay_2" in grant.reason and invoice.number in grant.reason
    assert InvoicePayment.objects.get(reference="pay_2").credit_grant_id == grant.id
    entry = LedgerEntry.objects.get(source_type="credit_grant", source_id=grant.id)
    assert {line.ledger_account: line.amount_minor for line in entry.lines.all()} == {
        "gateway_clearing": 2900,
        "customer_credit": -2900,
    }
    assert balance("gateway_clearing") == 15000  # every cent received is in the books
    assert balance("customer_credit", nl.id) == -2900
    assert selectors.balance(account_id=nl.id)["EUR"] == {"credits_available": 2900, "outstanding": 0}
    assert ledger.check() == []


@pytest.mark.parametrize("state", ["paid", "void", "uncollectible"])
def test_a_payment_after_the_invoice_took_no_more_is_all_credit(nl: BillingAccount, state: str) -> None:
    invoice = issue(nl)
    if state == "paid":
        pay(invoice, 12100, "pay_racing")
    elif state == "void":
        services.invoice_void(invoice_id=invoice.id, reason="billed in error", actor=FINANCE)
    else:
        services.invoice_write_off(invoice_id=invoice.id, reason="gone", actor=FINANCE)
    late = pay(invoice, 12100, "pay_late")
    assert (late.applied_minor, late.credited_minor, late.invoice_paid) == (0, 12100, state == "paid")
    row = InvoicePayment.objects.get(reference="pay_late")
    assert (row.amount_minor, row.received_minor) == (0, 12100)
    assert not LedgerEntry.objects.filter(source_type="payment", source_id=row.id).exists()
    assert CreditGrant.objects.get(id=row.credit_grant_id).remaining_minor == 12100
    invoice.refresh_from_db()
    assert invoice.status == state
    assert ledger.check() == []


def test_the_reference_decides_a_replay_writes_nothing(nl: BillingAccount, acct: Callable[..., BillingAccount]) -> None:
    invoice = issue(nl)
    elsewhere = issue(acct(currency="EUR", country="NL"), "1")
    first = pay(invoice, 15000, "pay_1")
    before = rows()
    assert pay(invoice, 15000, "pay_1") == first  # the first result, though the invoice is paid now
    assert rows() == before
    for other in ({"amount_minor": 14999}, {"invoice_id": elsewhere.id}):
        with pytest.raises(Conflict) as caught, transaction.atomic():
            services.payment_apply(
                **{"invoice_id": invoice.id, "amount_minor": 15000, "currency": "EUR", "reference": "pay_1", **other}
            )
        assert caught.value.code == "payment_conflict"
    assert rows()[1:] == before[1:] and InvoicePayment.objects.filter(reference="pay_1").count() == 1


def test_payment_apply_runs_in_the_callers_transaction_and_checks_its_input(nl: BillingAccount) -> None:
    invoice = issue(nl)
    for field, kwargs in (
        ("amount_minor", {"amount_minor": 0}),
        ("currency", {"currency": "USD"}),
        ("reference", {"reference": " "}),
    ):
        with pytest.raises(ApplicationError) as caught, transaction.atomic():
            services.payment_apply(
                **{"invoice_id": invoice.id, "amount_minor": 100, "currency": "EUR", "reference": "p", **kwargs}
            )
        assert field_of(caught.value) == field
    assert not InvoicePayment.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_payment_apply_and_refund_record_refuse_to_run_outside_a_transaction(
    acct: Callable[..., BillingAccount],
) -> None:
    invoice = issue(acct(currency="EUR", country="NL"))
    with pytest.raises(RuntimeError, match="transaction"):
        services.payment_apply(invoice_id=invoice.id, amount_minor=1, currency="EUR", reference="p")
    with pytest.raises(RuntimeError, match="transaction"):
        services.refund_record(
            invoice_id=invoice.id, amount_minor=1, currency="EUR", reference="r", reason="x", actor=FINANCE
        )
    with pytest.raises(RuntimeError, match="transaction"):
        services.dispute_post(
            dispute_id=1, account_id=invoice.account_id, currency="EUR", amount_minor=1, stage="opened", memo=""
        )
    # The durable wrapper has a transaction of its own.
    assert services.invoice_record_payment(
        invoice_id=invoice.id, amount_minor=invoice.total_minor, currency="EUR", reference="p"
    ).invoice_paid
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_reports_of_one_payment_record_it_once(acct: Callable[..., BillingAccount]) -> None:
    from conftest import in_threads

    first, second = (issue(acct(currency="EUR", country="NL")) for _ in range(2))

    def report(invoice: Invoice, reference: str) -> services.PaymentApplied:
        with transaction.atomic():
            return services.payment_apply(
                invoice_id=invoice.id, amount_minor=12100, currency="EUR", reference=reference
            )

    results = in_threads(4, lambda i: report(first, "pay_twin"))
    assert all(isinstance(r, services.PaymentApplied) for r in results), results
    assert len(set(results)) == 1 and results[0].applied_minor == 12100
    assert InvoicePayment.objects.filter(reference="pay_twin").count() == 1
    assert not CreditGrant.objects.exists()
    # The same reference for two invoices at once: one is recorded, the other is a conflict.
    results = in_threads(2, lambda i: report((first, second)[i], "pay_both"))
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "PaymentApplied"], results
    assert InvoicePayment.objects.filter(reference="pay_both").count() == 1
    assert ledger.check() == []


def test_overpayment_credit_is_spent_on_the_next_invoice(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 13100, "pay_1")  # 10.00 too much
    rated(nl.id, "2026-11-02", "compute.vcpu", "1", "50")
    with time_machine.travel(dt.datetime(2026, 12, 2, tzinfo=dt.UTC), tick=False):
        services.period_close(period=NOVEMBER, actor=FINANCE, account_ids=[nl.id], run_rollup=False, render_pdfs=False)
    november = Invoice.objects.get(account_id=nl.id, period_start=NOVEMBER.start)
    assert (november.total_minor, november.credits_applied_minor) == (6050, 1000)
    assert CreditGrant.objects.get().remaining_minor == 0
    assert ledger.check() == []


# --- Refunds to the card


def test_a_partial_refund_issues_a_credit_note_for_the_gross_and_leaves_no_negative_receivable(
    nl: BillingAccount,
) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    recorded = refund(invoice, 3000, "ref_1")
    note = CreditNote.objects.get(id=recorded.credit_note_id)
    assert recorded.credit_note_number == note.number == "CN-2026-000001"
    assert note.total_minor == note.subtotal_minor + note.tax_minor == 3000
    # 30.00 gross at 21 %: 24.79 net (its rule tax 5.21 reaches 30.00 exactly)
    assert (note.subtotal_minor, note.tax_minor) == (2479, 521)
    assert [(line.sku, line.amount_minor) for line in note.lines.all()] == [("compute.vcpu", 2479)]
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_refunded_minor, invoice.amount_credited_minor) == ("paid", 3000, 3000)
    assert invoice.amount_outstanding_minor == 0 and invoice.balance_minor == 0
    assert balance("receivable", nl.id) == 0
    assert balance("gateway_clearing") == 12100 - 3000
    entry = LedgerEntry.objects.get(source_type="refund", source_id=recorded.refund_id)
    assert {line.ledger_account: line.amount_minor for line in entry.lines.all()} == {
        "receivable": 3000,
        "gateway_clearing": -3000,
    }
    assert ledger.check() == []


def test_refunds_in_parts_never_reverse_more_vat_than_charged(acct: Callable[..., BillingAccount]) -> None:
    account = acct(currency="EUR", country="NL")
    invoice = issue(account, "0.07")  # 0.07 net, 0.01 VAT
    pay(invoice, 8, "pay_1")
    taxes = [
        CreditNote.objects.get(id=refund(invoice, gross, f"ref_{gross}_{i}").credit_note_id).tax_minor
        for i, gross in enumerate((3, 3, 2))
    ]
    assert sum(taxes) == invoice.tax_minor == 1
    assert sum(CreditNote.objects.values_list("subtotal_minor", flat=True)) == invoice.subtotal_minor
    with pytest.raises(ApplicationError) as caught:
        refund(invoice, 1, "ref_more")
    assert (caught.value.code, field_of(caught.value)) == ("invalid_amount", "amount_minor")
    assert ledger.check() == []


def test_a_refund_beyond_what_was_paid_is_refused_and_leaves_nothing(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 5000, "pay_1")
    refund(invoice, 2000, "ref_1")
    before = rows()
    with transaction.atomic():  # the caller catches the refusal and carries on: still nothing written
        with pytest.raises(ApplicationError) as caught:
            services.refund_record(
                invoice_id=invoice.id,
                amount_minor=3001,
                currency="EUR",
                reference="ref_2",
                reason="too much",
                actor=FINANCE,
            )
        assert (caught.value.code, field_of(caught.value)) == ("invalid_amount", "amount_minor")
    assert rows() == before
    assert not InvoiceRefund.objects.filter(reference="ref_2").exists()
    refund(invoice, 3000, "ref_2")  # the rest of what was paid
    invoice.refresh_from_db()
    # A partly paid invoice refunded: what it credited went back, so the customer still owes the same.
    assert (invoice.status, invoice.amount_outstanding_minor) == (InvoiceStatus.ISSUED, 7100)
    assert ledger.check() == []


def test_a_refund_is_idempotent_on_its_reference(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    first = refund(invoice, 12100, "ref_1")  # the whole invoice: exactly its net and tax
    note = CreditNote.objects.get(id=first.credit_note_id)
    assert (note.subtotal_minor, note.tax_minor) == (invoice.subtotal_minor, invoice.tax_minor)
    before = rows()
    assert refund(invoice, 12100, "ref_1") == first
    assert rows() == before
    with pytest.raises(Conflict) as caught:
        refund(invoice, 100, "ref_1")
    assert caught.value.code == "refund_conflict"
    assert ledger.check() == []


@PROFILE
@given(
    rate=st.sampled_from([Decimal(0), Decimal("5.5"), Decimal(19), Decimal(21), Decimal(27)]),
    net=st.integers(1, 10**7),
    cuts=st.lists(st.floats(0.0001, 0.9999), max_size=6),
)
def test_split_gross_parts_sum_to_the_whole_and_each_vat_is_the_rate_on_its_net(
    rate: Decimal, net: int, cuts: list[float]
) -> None:
    """Issue 19: the VAT of a credit note for a gross amount is the invoice's rule on its net
    (rate * net, rounded half-up) whenever any split of that gross can be; where none can,
    one minor unit from it. The parts of an invoice credited in pieces sum to its net and VAT."""
    tax_total = money.percent_of_minor(net, rate)
    total = net + tax_total
    points = sorted({int(total * c) for c in cuts} - {0, total})
    parts = [b - a for a, b in zip([0, *points], [*points, total], strict=True)]
    credited_net = credited_tax = 0
    for i, gross in enumerate(parts):
        part_net, part_tax = taxes.split_gross(
            gross, rate=rate, net_left=net - credited_net, tax_left=tax_total - credited_tax
        )
        assert part_net + part_tax == gross and part_net >= 0 and part_tax >= 0
        rule = money.percent_of_minor(part_net, rate)
        if i == 0 and gross < total:
            near = int(gross * 100 / (100 + rate))  # n + rate * n rises by one or two a step: look close by
            exact = [n for n in range(max(near - 3, 0), near + 4) if n + money.percent_of_minor(n, rate) == gross]
            assert part_tax == rule if exact else abs(part_tax - rule) == 1
        credited_net += part_net
        credited_tax += part_tax
        assert credited_net <= net and credited_tax <= tax_total
    assert (credited_net, credited_tax) == (net, tax_total)


def test_split_gross_of_the_issue_19_refunds() -> None:
    """100.43 gross at 21 % is exactly 83.00 + 17.43; 100.00 gross has no exact split
    (82.64 + 17.35 = 99.99, 82.65 + 17.36 = 100.01): 82.64 + 17.36, the VAT fraction of the
    gross (100.00 * 21/121 = 17.355…), never 82.65 + 17.35."""
    big = {"net_left": 10**9, "tax_left": 10**9}
    assert taxes.split_gross(10043, rate=Decimal(21), **big) == (8300, 1743)
    assert taxes.split_gross(10000, rate=Decimal(21), **big) == (8264, 1736)
    assert taxes.split_gross(12100, rate=Decimal(21), net_left=10000, tax_left=2100) == (10000, 2100)


# --- Credit notes on paid and partly paid invoices


def test_a_credit_note_on_a_paid_invoice_is_settled_as_customer_credit(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    lines = [services.CreditNoteLineIn(description="Outage", amount_minor=1000, sku="compute.vcpu")]
    with pytest.raises(Conflict) as caught:
        services.credit_note_issue(invoice_id=invoice.id, lines=lines, reason="outage", actor=FINANCE)
    assert (caught.value.code, field_of(caught.value)) == ("settlement_required", "settle")
    assert not CreditNote.objects.exists()
    note = services.credit_note_issue(
        invoice_id=invoice.id, lines=lines, reason="outage", actor=FINANCE, settle="credit"
    )
    assert note.total_minor == 1210
    settled = InvoiceRefund.objects.get()
    assert (settled.method, settled.amount_minor, settled.credit_note_id) == ("credit", 1210, note.id)
    assert settled.grant is not None
    assert (settled.grant.kind, settled.grant.remaining_minor) == (CreditKind.OVERPAYMENT, 1210)
    entry = LedgerEntry.objects.get(source_type="credit_grant", source_id=settled.grant_id)
    assert {line.ledger_account: line.amount_minor for line in entry.lines.all()} == {
        "receivable": 1210,
        "customer_credit": -1210,
    }
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_refunded_minor, invoice.balance_minor) == ("paid", 1210, 0)
    assert balance("receivable", nl.id) == 0
    assert balance("gateway_clearing") == 12100  # nothing went back through the gateway
    # What is left to refund to the card is what was paid less what was given back as credit.
    paid = selectors.invoice_paid_amount(invoice.id)
    assert paid is not None and (paid.paid_minor, paid.refundable_minor) == (12100, 12100 - 1210)
    assert ledger.check() == []


def test_a_credit_note_beyond_what_is_outstanding_settles_the_excess_as_credit(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 10000, "pay_1")  # 21.00 outstanding
    note = services.credit_note_issue(
        invoice_id=invoice.id,
        lines=[services.CreditNoteLineIn(description="Outage", amount_minor=5000, sku="compute.vcpu")],
        reason="outage",
        actor=FINANCE,
    )
    assert note.total_minor == 6050
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_refunded_minor, invoice.balance_minor) == ("paid", 6050 - 2100, 0)
    assert CreditGrant.objects.get().amount_minor == 3950
    assert balance("receivable", nl.id) == 0
    assert ledger.check() == []


def test_a_credit_note_on_an_unpaid_invoice_behaves_as_before(nl: BillingAccount) -> None:
    invoice = issue(nl)
    services.credit_note_issue(
        invoice_id=invoice.id,
        lines=[services.CreditNoteLineIn(description="Outage", amount_minor=5000, sku="compute.vcpu")],
        reason="outage",
        actor=FINANCE,
    )
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_outstanding_minor, invoice.amount_refunded_minor) == ("issued", 6050, 0)
    assert not CreditGrant.objects.exists() and not InvoiceRefund.objects.exists()
    with pytest.raises(ApplicationError) as caught:
        services.credit_note_issue(invoice_id=invoice.id, lines=[], reason="x", actor=FINANCE, settle="card")
    assert field_of(caught.value) == "settle"
    assert ledger.check() == []


def test_credit_is_never_granted_as_overpayment_by_hand(nl: BillingAccount) -> None:
    with pytest.raises(ApplicationError) as caught:
        services.credit_grant_create(
            account_id=nl.id, kind="overpayment", amount=Decimal(5), currency="EUR", reason="x", actor=FINANCE
        )
    assert field_of(caught.value) == "kind"


# --- Disputes


def dispute(stage: str, *, dispute_id: int = 77, account_id: int, amount: int = 12100) -> bool:
    with transaction.atomic():
        return services.dispute_post(
            dispute_id=dispute_id,
            account_id=account_id,
            currency="EUR",
            amount_minor=amount,
            stage=stage,
            memo=f"dispute {stage}",
        )


@pytest.mark.parametrize(("close", "lands_in"), [("won", "gateway_clearing"), ("lost", "chargeback_loss")])
def test_a_dispute_posts_each_stage_once(nl: BillingAccount, close: str, lands_in: str) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    assert dispute("opened", account_id=nl.id)
    assert (balance("disputes", nl.id), balance("gateway_clearing")) == (12100, 0)  # the bank took it back
    before = rows()
    assert not dispute("opened", account_id=nl.id)  # a replay posts nothing
    assert rows() == before
    assert dispute(close, account_id=nl.id)
    assert not dispute(close, account_id=nl.id)
    assert balance("disputes", nl.id) == 0
    assert balance(lands_in) == 12100
    other = "lost" if close == "won" else "won"
    with pytest.raises(Conflict) as caught:
        dispute(other, account_id=nl.id)
    assert caught.value.code == "dispute_conflict"
    with pytest.raises(Conflict):
        dispute("opened", account_id=nl.id, amount=1)
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID  # ledger only
    assert ledger.check() == []


def test_a_dispute_closed_before_its_opening_is_known_posts_the_opening_first(nl: BillingAccount) -> None:
    pay(issue(nl), 12100, "pay_1")  # a dispute withdraws money received (ledger_check holds it to that)
    assert dispute("lost", account_id=nl.id, amount=500)
    assert sorted(
        LedgerEntry.objects.filter(source_type__startswith="dispute").values_list("source_type", flat=True)
    ) == ["dispute_lost", "dispute_opened"]
    assert not dispute("opened", account_id=nl.id, amount=500)
    assert (balance("disputes", nl.id), balance("chargeback_loss"), balance("gateway_clearing")) == (0, 500, 11600)
    with pytest.raises(ApplicationError) as caught:
        dispute("reopened", account_id=nl.id)
    assert field_of(caught.value) == "stage"
    assert ledger.check() == []


def test_ledger_check_finds_an_account_given_back_more_through_the_gateway_than_it_paid(nl: BillingAccount) -> None:
    """From the ledger alone: refunds and disputes of an account within what it paid."""
    pay(issue(nl), 12100, "pay_1")
    assert dispute("opened", account_id=nl.id, amount=12100)
    assert ledger.check() == []
    assert dispute("opened", dispute_id=78, account_id=nl.id, amount=1)
    assert ledger.check() == [
        f"account {nl.id} EUR: gateway clearing gave back 12101 (refunds and disputes), more than the 12100 "
        "received through it"
    ]


# --- Selectors


def test_payable_selectors_return_values_in_one_query(
    nl: BillingAccount, acct: Callable[..., BillingAccount], django_assert_num_queries: Callable
) -> None:
    invoice = issue(nl)
    other = acct(currency="EUR", country="NL")
    rated(other.id, "2026-10-03", "network.egress", "1", "10")
    promotional_credit(other.id, "100", reason="x")
    services.period_close(period=OCTOBER, actor=FINANCE, account_ids=[other.id], run_rollup=False, render_pdfs=False)
    covered = Invoice.objects.get(account_id=other.id)
    assert covered.status == InvoiceStatus.PAID  # settled by credits
    found = selectors.payable_invoice(invoice_id=invoice.id)
    assert found == selectors.PayableInvoice(
        invoice_id=invoice.id,
        account_id=nl.id,
        number=invoice.number,
        currency="EUR",
        status="issued",
        kind="period",
        total_minor=12100,
        amount_due_minor=12100,
        outstanding_minor=12100,
        due_at=invoice.due_at,
        issued_at=invoice.issued_at,
        paid=False,
    )
    assert selectors.payable_invoice(invoice_id=invoice.id, account_id=other.id) is None  # another's
    assert selectors.payable_invoice(invoice_id=covered.id, account_id=other.id).paid  # type: ignore[union-attr]
    pay(invoice, 2100, "pay_1")
    with django_assert_num_queries(1):
        payable = selectors.payable_invoices()
    assert [(p.invoice_id, p.outstanding_minor) for p in payable] == [(invoice.id, 10000)]
    assert selectors.payable_invoices(account_id=other.id) == []
    assert selectors.payable_invoices(invoice_ids=[covered.id, invoice.id]) == payable
    assert selectors.overdue_invoices(due_before=NOW) == []
    assert invoice.due_at is not None
    later = invoice.due_at + dt.timedelta(seconds=1)
    assert [p.invoice_id for p in selectors.overdue_invoices(due_before=later)] == [invoice.id]
    assert selectors.overdue_invoices(due_before=later, account_ids=[other.id]) == []
    assert selectors.invoice_numbers([invoice.id, covered.id, 1]) == {
        invoice.id: invoice.number,
        covered.id: covered.number,
    }
    paid = selectors.invoice_paid_amount(invoice.id)
    assert paid == selectors.InvoicePaidAmount(
        invoice_id=invoice.id, currency="EUR", paid_minor=2100, refunded_minor=0, refundable_minor=2100
    )
    assert selectors.invoice_paid_amount(1) is None


# --- Charged after issue


def test_issuing_queues_a_charge_for_each_invoice_with_an_amount_due(acct: Callable[..., BillingAccount]) -> None:
    due, covered, empty = (acct(currency="EUR", country="NL") for _ in range(3))
    rated(due.id, "2026-10-02", "compute.vcpu", "1", "10")
    rated(covered.id, "2026-10-02", "compute.vcpu", "1", "10")
    rated(empty.id, "2026-10-02", "compute.vcpu", "1", "0")
    promotional_credit(covered.id, "50", reason="x")
    services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)
    invoice = Invoice.objects.get(account_id=due.id)
    message = OutboxMessage.objects.get()
    assert (message.name, message.payload, message.dedupe_key) == (
        "payments.charge_invoices",  # one message per chunk of the close
        {"invoice_ids": [invoice.id], "trigger": "after_issue"},
        f"charge-after-issue:{invoice.id}:1",
    )
    services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)  # a re-run
    assert OutboxMessage.objects.count() == 1


# --- The ledger check catches what went wrong


def test_ledger_check_catches_a_corrupted_refund_row(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    recorded = refund(invoice, 3000, "ref_1")
    assert ledger.check() == []
    InvoiceRefund.objects.filter(id=recorded.refund_id).update(amount_minor=3001)
    problems = ledger.check()
    assert f"invoice {invoice.id}: amount refunded does not match the rows behind it" in problems
    assert f"refund {recorded.refund_id}: its credit note or ledger entry is not for its amount" in problems


def test_ledger_check_catches_a_refund_not_posted_and_an_unsettled_excess(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 12100, "pay_1")
    recorded = refund(invoice, 3000, "ref_1")
    with connection.cursor() as cursor:  # someone with the keys goes around the trigger
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("ALTER TABLE invoicing_ledgerentry DISABLE TRIGGER invoicing_ledgerentry_append_only")
        cursor.execute("ALTER TABLE invoicing_ledgerline DISABLE TRIGGER invoicing_ledgerline_append_only")
        cursor.execute(
            "DELETE FROM invoicing_ledgerline WHERE entry_id IN "
            "(SELECT id FROM invoicing_ledgerentry WHERE source_type = 'refund')"
        )
        cursor.execute("DELETE FROM invoicing_ledgerentry WHERE source_type = 'refund'")
        cursor.execute("ALTER TABLE invoicing_ledgerentry ENABLE TRIGGER invoicing_ledgerentry_append_only")
        cursor.execute("ALTER TABLE invoicing_ledgerline ENABLE TRIGGER invoicing_ledgerline_append_only")
    problems = ledger.check()
    assert f"refund {recorded.refund_id} has no ledger entry" in problems
    assert f"account {nl.id} EUR: receivable -3000 in the ledger, 0 by its documents" in problems
    Invoice.objects.filter(id=invoice.id).update(amount_refunded_minor=0)
    InvoiceRefund.objects.filter(id=recorded.refund_id).delete()
    problems = ledger.check()
    assert f"invoice {invoice.id}: owes -3000, less than nothing (an unsettled excess)" in problems


def test_ledger_check_catches_dispute_and_overpayment_inconsistencies(nl: BillingAccount) -> None:
    invoice = issue(nl)
    pay(invoice, 13000, "pay_1")
    grant_id = InvoicePayment.objects.get().credit_grant_id
    InvoicePayment.objects.update(received_minor=13001)
    with transaction.atomic():
        ledger.post(
            [
                ledger.Entry(
                    "dispute_won",
                    5,
                    nl.id,
                    "EUR",
                    "won, never opened",
                    [ledger.Posting("gateway_clearing", 10), ledger.Posting("disputes", -10, nl.id)],
                )
            ],
            posted_at=NOW,
        )
    problems = ledger.check()
    assert "dispute 5: closed without being opened" in problems
    assert f"payment {InvoicePayment.objects.get().id}: its excess is not an overpayment grant from the gateway" in (
        problems
    )
    InvoicePayment.objects.update(received_minor=13000)
    InvoicePayment.objects.update(credit_grant=None, amount_minor=13000)  # the grant is orphaned
    problems = ledger.check()
    assert f"credit grant {grant_id}: an overpayment grant not backed by one payment or settlement" in problems
