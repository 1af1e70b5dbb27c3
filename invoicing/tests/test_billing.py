"""Period close: amounts to the cent, tax rules, late usage, credits, discounts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
import time_machine

from accounts.models import BillingAccount
from billing_site.common.errors import ApplicationError
from invoicing import ledger, services
from invoicing.line_display import detail_view
from invoicing.models import BilledUsage, CreditApplication, Invoice, InvoiceStatus, InvoiceTransition, LineKind
from invoicing.periods import Period
from invoicing.tests.factories import ContractDiscountFactory, promotional_credit, rated
from invoicing.tests.support import FINANCE, NOVEMBER, NOW, OCTOBER

pytestmark = pytest.mark.clock(NOW)


def close(period: Period = OCTOBER, **kwargs: object) -> services.CloseReport:
    return services.period_close(period=period, actor=FINANCE, run_rollup=False, render_pdfs=False, **kwargs)


def invoice_of(account: BillingAccount, period: Period = OCTOBER) -> Invoice:
    return Invoice.objects.get(account_id=account.id, period_start=period.start)


def test_a_line_at_half_a_cent_rounds_up_once_and_tax_once_per_invoice(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    # 10.125 EUR over two days and two resources: rounded once, on the line → 10.13
    rated(account.id, "2026-10-02", "compute.vcpu", "500", "6.0625", resource_id="vm-1")
    rated(account.id, "2026-10-20", "compute.vcpu", "310", "4.0625", resource_id="vm-2")
    # 0.004 EUR: a line of 0.00
    rated(account.id, "2026-10-05", "storage.object.requests", "10000", "0.004")
    report = close()
    assert report.issued == 1
    invoice = invoice_of(account)
    lines = {line.sku: line for line in invoice.lines.all()}
    assert lines["compute.vcpu"].amount_minor == 1013
    assert lines["compute.vcpu"].rated_amount == Decimal("10.125")
    assert lines["compute.vcpu"].quantity == 810
    assert lines["storage.object.requests"].amount_minor == 0
    assert invoice.subtotal_minor == 1013
    # NL customer of an NL seller: 21 % of 10.13 = 2.1273 → 2.13
    assert (invoice.tax_treatment, invoice.tax_rate, invoice.tax_minor) == ("domestic", Decimal("21.00"), 213)
    assert invoice.total_minor == 1226
    assert invoice.number == "INV-2026-000001"
    assert invoice.status == InvoiceStatus.ISSUED
    assert invoice.due_at == NOW + dt.timedelta(days=14)
    assert invoice.buyer["name"] == account.name and invoice.seller["vat_id"]
    # the detail by resource sums to the line exactly (largest remainder)
    parts = detail_view(lines["compute.vcpu"].detail, 1013, "EUR")["resources"]
    assert [(p["key"], p["amount"]) for p in parts] == [("vm-1", "6.07"), ("vm-2", "4.06")]


def test_half_a_cent_of_tax_rounds_up(acct: Callable) -> None:
    account = acct(currency="EUR", country="DE", kind="individual", tax_id="")
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "0.50")  # 19 % of 0.50 = 0.095 → 0.10
    close()
    invoice = invoice_of(account)
    assert (invoice.tax_treatment, invoice.tax_country, invoice.tax_minor, invoice.total_minor) == ("oss", "DE", 10, 60)


def test_jpy_has_no_minor_unit(acct: Callable) -> None:
    account = acct(currency="JPY", country="NL")
    rated(account.id, "2026-10-02", "compute.gpu.a100", "3.3", "1237.5")
    close()
    invoice = invoice_of(account)
    assert invoice.lines.get().amount_minor == 1238  # yen: 1237.5 → 1238
    assert invoice.tax_minor == 260  # 21 % of 1238 = 259.98
    assert invoice.total_minor == 1498


@pytest.mark.parametrize(
    ("country", "kind", "tax_id", "treatment", "rate", "note"),
    [
        ("NL", "individual", "", "domestic", "21.00", ""),
        ("DE", "business", "DE136695976", "reverse_charge", "0", "Reverse charge"),
        ("DE", "business", "", "oss", "19.00", "One-Stop Shop"),
        ("FR", "individual", "", "oss", "20.00", "One-Stop Shop"),
        ("US", "business", "", "outside_eu", "0", "Outside the scope of EU VAT"),
        ("CH", "individual", "", "outside_eu", "0", "Outside the scope of EU VAT"),
    ],
)
def test_tax_rules(acct: Callable, country: str, kind: str, tax_id: str, treatment: str, rate: str, note: str) -> None:
    account = acct(currency="EUR", country=country, kind=kind, tax_id=tax_id)
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    invoice = invoice_of(account)
    assert invoice.tax_treatment == treatment
    assert invoice.tax_rate == Decimal(rate)
    assert invoice.tax_minor == Decimal(rate) * 100
    assert note in invoice.tax_note


def test_a_rate_is_taken_at_the_tax_point(acct: Callable) -> None:
    from invoicing.models import TaxRate

    TaxRate.objects.filter(country="NL", valid_until__isnull=True).update(valid_until=dt.date(2026, 10, 31))
    TaxRate.objects.create(country="NL", rate=Decimal("22.00"), valid_from=dt.date(2026, 10, 31))
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    assert invoice_of(account).tax_rate == Decimal("22.00")  # in force on the period's last day


def test_re_running_changes_nothing(acct: Callable) -> None:
    accounts = [acct(currency="EUR") for _ in range(3)]
    for a in accounts:
        rated(a.id, "2026-10-02", "compute.vcpu", "100", "12.34")
    first = close(chunk_size=2)
    assert first.issued == 3
    before = list(Invoice.objects.order_by("id").values())
    again = close(chunk_size=2)
    assert (again.issued, again.already_issued) == (0, 3)
    assert list(Invoice.objects.order_by("id").values()) == before
    assert sorted(Invoice.objects.values_list("number", flat=True)) == [
        "INV-2026-000001",
        "INV-2026-000002",
        "INV-2026-000003",
    ]
    assert ledger.check() == []


def test_the_current_period_cannot_be_closed(acct: Callable) -> None:
    with pytest.raises(ApplicationError) as caught:
        close(NOVEMBER)
    assert caught.value.code == "period_open"


def test_accounts_without_usage_get_no_invoice(acct: Callable) -> None:
    busy, idle = acct(), acct()
    rated(busy.id, "2026-10-02", "compute.vcpu", "1", "1")
    close()
    assert Invoice.objects.filter(account_id=idle.id).count() == 0
    assert Invoice.objects.filter(account_id=busy.id).count() == 1


def test_accounts_without_usage_get_a_zero_invoice_when_configured(acct: Callable, settings: object) -> None:
    settings.INVOICING_ISSUE_EMPTY = True  # type: ignore[attr-defined]
    with time_machine.travel(dt.datetime(2026, 9, 15, tzinfo=dt.UTC), tick=False):
        idle = acct(currency="EUR")
    close()
    invoice = invoice_of(idle)
    assert (invoice.total_minor, invoice.lines.count(), invoice.status) == (0, 0, InvoiceStatus.PAID)
    assert ledger.check() == []
    # Fanned out by shard, the idle account is found in its own shard only.
    from metering.rollup import SHARDS, shard_of

    found = [services.period_chunks(period=OCTOBER, shard=s) for s in range(SHARDS)]
    assert [s for s, chunks in enumerate(found) if [idle.id] in chunks] == [shard_of(idle.id)]


def test_dry_run_writes_nothing(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    report = close(dry_run=True)
    assert (report.issued, dict(report.totals_minor)) == (1, {"EUR": 12100})
    assert not Invoice.objects.exists()


def test_late_usage_is_billed_on_the_next_invoice_as_an_adjustment(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-30", "network.egress", "200", "9")
    close()
    october = invoice_of(account)
    frozen = list(october.lines.values())
    # Late October usage arrives after October's invoice was issued; then November is used.
    rated(account.id, "2026-10-31", "network.egress", "50", "4.5")
    rated(account.id, "2026-11-10", "network.egress", "10", "0.9")
    with time_machine.travel(dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC), tick=False):
        close(NOVEMBER)
    assert list(invoice_of(account).lines.values()) == frozen  # issued invoices never change
    lines = list(invoice_of(account, NOVEMBER).lines.order_by("position"))
    assert [(line.kind, line.description, line.amount_minor, line.quantity) for line in lines] == [
        (LineKind.USAGE, "Internet egress", 90, 10),
        (LineKind.ADJUSTMENT, "Usage adjustment for 2026-10: Internet egress", 450, 50),
    ]
    assert BilledUsage.objects.filter(account_id=account.id, usage_month=OCTOBER.start).count() == 2
    # Closing November again bills nothing twice.
    with time_machine.travel(dt.datetime(2026, 12, 1, 4, tzinfo=dt.UTC), tick=False):
        assert close(NOVEMBER).issued == 0


def test_a_draft_is_recomputed_and_then_issued(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "1")
    draft = services.invoice_draft_compute(account_id=account.id, period=OCTOBER)
    assert draft is not None and draft.number is None and draft.total_minor == 100
    rated(account.id, "2026-10-03", "compute.vcpu", "1", "1")
    draft = services.invoice_draft_compute(account_id=account.id, period=OCTOBER)
    assert draft is not None and draft.total_minor == 200 and draft.lines.count() == 1
    issued = services.invoice_issue(invoice_id=draft.id, actor=FINANCE)
    assert (issued.id, issued.status, issued.number, issued.total_minor) == (draft.id, "issued", "INV-2026-000001", 200)
    assert issued.lines.count() == 1
    assert list(InvoiceTransition.objects.values_list("from_state", "to_state")) == [("draft", "issued")]


def test_contract_discounts_are_their_own_rounded_lines(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "10.05")
    rated(account.id, "2026-10-20", "compute.ram", "100", "5")
    rated(account.id, "2026-10-20", "network.egress", "100", "7")
    # 12.5 % on compute from Oct 10: applies to 5.00 of RAM only -> -0.625 -> -0.63
    ContractDiscountFactory(account_id=account.id, percent=Decimal("12.5"), valid_from=dt.date(2026, 10, 10))
    close()
    invoice = invoice_of(account)
    discount = invoice.lines.get(kind=LineKind.DISCOUNT)
    assert discount.amount_minor == -63
    assert "12.5%" in discount.description
    assert invoice.subtotal_minor == 1005 + 500 + 700 - 63


def test_credits_are_applied_soonest_expiring_first(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    later = promotional_credit(account.id, "30", expires_at=NOW + dt.timedelta(days=90))
    never = services.credit_grant_create(
        account_id=account.id, kind="prepaid", amount=Decimal("100"), currency="EUR", reason="top-up", actor=FINANCE
    )
    soon = promotional_credit(account.id, "20", reason="apology", expires_at=NOW + dt.timedelta(days=10))
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "60")
    close()
    invoice = invoice_of(account)
    assert (invoice.total_minor, invoice.credits_applied_minor, invoice.amount_due_minor) == (6000, 6000, 0)
    assert invoice.status == InvoiceStatus.PAID
    spent = dict(CreditApplication.objects.values_list("grant_id", "amount_minor"))
    assert spent == {soon.id: 2000, later.id: 3000, never.id: 1000}
    assert ledger.check() == []


def test_credit_is_never_spent_across_currencies(acct: Callable) -> None:
    account = acct(currency="USD", country="US")
    dollars = promotional_credit(account.id, "5", currency="USD", expires_at=NOW + dt.timedelta(days=10))
    # No service moves an account to another currency; a data fix could. Its dollars stay dollars.
    BillingAccount.objects.filter(id=account.id).update(currency="EUR")
    with pytest.raises(ApplicationError) as refused:
        promotional_credit(account.id, "5", currency="USD", reason="x")
    assert refused.value.code == "currency_mismatch"
    euros = services.credit_grant_create(
        account_id=account.id, kind="prepaid", amount=Decimal("20"), currency="EUR", reason="top-up", actor=FINANCE
    )
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "60")
    close()
    invoice = invoice_of(account)
    assert (invoice.currency, invoice.total_minor, invoice.credits_applied_minor, invoice.amount_due_minor) == (
        "EUR",
        6000,
        2000,
        4000,
    )
    assert dict(CreditApplication.objects.values_list("grant_id", "amount_minor")) == {euros.id: 2000}
    dollars.refresh_from_db()
    assert (dollars.currency, dollars.remaining_minor) == ("USD", 500)
    assert ledger.check() == []


# --- Found in review


def test_late_usage_is_rounded_on_the_month_total_not_on_the_difference(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "10.004")
    close()
    assert invoice_of(account).subtotal_minor == 1000  # 10.004 → 10.00
    rated(account.id, "2026-10-03", "compute.vcpu", "1", "0.003")  # the month is now 10.007 → 10.01
    rated(account.id, "2026-11-02", "compute.vcpu", "1", "1")
    with time_machine.travel(dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC), tick=False):
        close(NOVEMBER)
    adjustment = invoice_of(account, NOVEMBER).lines.get(kind=LineKind.ADJUSTMENT)
    assert (adjustment.rated_amount, adjustment.amount_minor) == (Decimal("0.003"), 1)  # the missing cent


def test_no_negative_invoice_the_difference_is_set_off_later(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-02", "compute.vcpu", "10", "60")
    close()
    rated(account.id, "2026-10-02", "compute.vcpu", "-5", "-30")  # re-rated lower (a late stop)
    rated(account.id, "2026-11-02", "compute.vcpu", "1", "1")
    with time_machine.travel(dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC), tick=False):
        report = close(NOVEMBER)
    assert (report.issued, report.nothing_to_bill) == (0, 1)  # -29.00 is not invoiced
    assert not Invoice.objects.filter(account_id=account.id, period_start=NOVEMBER.start).exists()
    # December's usage absorbs it.
    rated(account.id, "2026-12-02", "compute.vcpu", "100", "50")
    with time_machine.travel(dt.datetime(2027, 1, 1, 3, tzinfo=dt.UTC), tick=False):
        close(Period(dt.date(2026, 12, 1)))
    december = invoice_of(account, Period(dt.date(2026, 12, 1)))
    assert december.subtotal_minor == 5000 + 100 - 3000
    assert ledger.check() == []


def test_a_discount_covers_late_usage_of_a_month_it_covered_whole(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    ContractDiscountFactory(account_id=account.id, percent=Decimal(10), valid_from=dt.date(2026, 1, 1))
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "50")
    close()
    rated(account.id, "2026-10-20", "compute.vcpu", "1", "100")  # late October compute
    with time_machine.travel(dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC), tick=False):
        close(NOVEMBER)
    lines = {(line.kind, line.amount_minor) for line in invoice_of(account, NOVEMBER).lines.all()}
    assert lines == {(LineKind.ADJUSTMENT, 10000), (LineKind.DISCOUNT, -1000)}


def test_usage_and_adjustment_that_net_to_zero_post_nothing_and_check_passes(acct: Callable) -> None:
    account = acct(currency="EUR", country="US")
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "5")
    close()
    rated(account.id, "2026-10-02", "compute.ram", "-1", "-5")  # a late correction in the same family
    rated(account.id, "2026-11-02", "compute.vcpu", "1", "5")
    with time_machine.travel(dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC), tick=False):
        close(NOVEMBER)
    assert invoice_of(account, NOVEMBER).total_minor == 0
    assert ledger.check() == []
