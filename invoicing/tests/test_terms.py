"""The terms invoices are planned with, written by finance: VAT rates (never overlapping, a
new one closes the one in force only when told, never under an issued invoice) and contract
discounts (never past 100 % together, never back into an issued period), each change audited."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from accounts.models import BillingAccount
from billing_site.common.errors import ApplicationError
from conftest import Customer
from invoicing import selectors, services
from invoicing.models import ContractDiscount, Invoice, TaxRate, TermsChange
from invoicing.periods import Period
from invoicing.tests.factories import rated
from invoicing.tests.support import FINANCE, NOVEMBER, NOW, OCTOBER, operator
from tests.pages import press

pytestmark = [pytest.mark.clock(NOW), pytest.mark.django_db]


def close(period: Period = OCTOBER) -> services.CloseReport:
    return services.period_close(period=period, actor=FINANCE, run_rollup=False, render_pdfs=False)


def nl_rate() -> TaxRate:
    return TaxRate.objects.get(country="NL", valid_from=dt.date(2024, 1, 1))


# --- VAT rates


def test_the_table_refuses_overlapping_rates_of_one_country() -> None:
    with pytest.raises(IntegrityError, match="invoicing_taxrate_no_overlap"), transaction.atomic():
        TaxRate.objects.create(country="NL", rate=Decimal(0), valid_from=dt.date(2026, 11, 1))
    TaxRate.objects.create(
        country="NL", rate=Decimal(0), valid_from=dt.date(2023, 1, 1), valid_until=dt.date(2024, 1, 1)
    )
    TaxRate.objects.create(country="CH", rate=Decimal(8), valid_from=dt.date(2026, 11, 1))  # another country


def test_an_overlapping_rate_added_in_the_admin_is_refused_naming_the_rate_in_force(acct: Callable) -> None:
    finance = operator("finance")
    form = {"country": "NL", "rate": "0", "valid_from": "2026-11-01", "valid_until": "", "note": "typo"}
    page = finance.post("/admin/invoicing/taxrate/add/", form)
    assert page.status_code == 200
    assert "NL 21.00% from 2024-01-01 is in force with no end" in page.content.decode()
    assert TaxRate.objects.filter(country="NL").count() == 1 and nl_rate().valid_until is None
    assert not TermsChange.objects.exists()

    bounded = {**form, "valid_from": "2023-06-01", "valid_until": "2024-06-01"}
    page = finance.post("/admin/invoicing/taxrate/add/", {**bounded, "close_previous": "on"})
    assert page.status_code == 200 and "Overlaps NL 21.00% from 2024-01-01" in page.content.decode()

    # Said explicitly: the rate in force ends the day the new one starts, both audited, and
    # the next NL invoice is taxed at the new rate.
    assert finance.post("/admin/invoicing/taxrate/add/", {**form, "close_previous": "on"}).status_code == 302
    assert nl_rate().valid_until == dt.date(2026, 11, 1)
    assert TaxRate.objects.get(country="NL", valid_from=dt.date(2026, 11, 1)).rate == Decimal(0)
    changes = {(c.action, c.actor_name) for c in TermsChange.objects.filter(subject="tax_rate")}
    assert changes == {("close", "finance@ops.test"), ("create", "finance@ops.test")}
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    assert Invoice.objects.get(account_id=account.id).tax_rate == Decimal("21.00")  # October: still 21 %


def test_finance_withdraws_a_mistaken_rate_from_its_page_and_the_rate_it_closed_runs_again() -> None:
    finance = operator("finance")
    typo = {"country": "NL", "rate": "2.1", "valid_from": "2026-12-01", "valid_until": "", "note": "typo"}
    assert finance.post("/admin/invoicing/taxrate/add/", {**typo, "close_previous": "on"}).status_code == 302
    mistake = TaxRate.objects.get(country="NL", valid_from=dt.date(2026, 12, 1))
    change_page = finance.get(f"/admin/invoicing/taxrate/{mistake.pk}/change/").content.decode()
    delete_url = f"/admin/invoicing/taxrate/{mistake.pk}/delete/"
    assert f'href="{delete_url}" class="deletelink">Withdraw this rate</a>' in change_page  # the page's own link
    assert "NL 21.00% from 2024-01-01" in finance.get(delete_url).content.decode()  # says what runs again

    done = press(finance, delete_url, "Withdraw the rate", reason="typed 2.1 for 21")
    assert done.status_code == 302, done.content[:2000]
    assert not TaxRate.objects.filter(pk=mistake.pk).exists()
    assert nl_rate().valid_until is None  # as before the mistake
    changes = [
        (c.action, c.actor_name, c.reason) for c in TermsChange.objects.filter(subject="tax_rate").order_by("id")
    ]
    assert changes[-2:] == [
        ("withdraw", "finance@ops.test", "typed 2.1 for 21"),
        ("reopen", "finance@ops.test", "the rate from 2026-12-01 was withdrawn: typed 2.1 for 21"),
    ]
    assert list(TaxRate.objects.filter(country="NL")) == [nl_rate()]  # one NL rate again, with no end

    # A temporary rate that simply ends where a withdrawn rate began is not stretched over its days.
    services.tax_rate_update(rate_id=nl_rate().pk, valid_until=dt.date(2027, 1, 1), note="", actor=FINANCE)
    later = services.tax_rate_create(country="NL", rate=Decimal(9), valid_from=dt.date(2027, 1, 1), actor=FINANCE)
    assert services.tax_rate_withdraw(rate_id=later.pk, reason="not yet decided", actor=FINANCE) is None
    assert nl_rate().valid_until == dt.date(2027, 1, 1)


def test_a_rate_an_issued_invoice_was_taxed_with_is_never_withdrawn(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    invoice = Invoice.objects.get(account_id=account.id)
    delete_url = f"/admin/invoicing/taxrate/{nl_rate().pk}/delete/"
    page = operator("finance").get(delete_url).content.decode()
    assert invoice.number in page and "Withdraw the rate" not in page  # why not, and no button
    assert operator("finance").post(delete_url, {"reason": "x"}).status_code == 200
    with pytest.raises(ApplicationError) as refused:
        services.tax_rate_withdraw(rate_id=nl_rate().pk, reason="x", actor=FINANCE)
    assert (refused.value.code, refused.value.status) == ("tax_rate_in_use", 409)
    assert nl_rate().valid_until is None and not TermsChange.objects.exists()
    assert operator("support").get(delete_url).status_code == 403
    assert TaxRate.objects.filter(pk=nl_rate().pk).exists()


def test_a_rate_never_starts_under_an_issued_invoice(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    invoice = Invoice.objects.get(account_id=account.id)  # tax point 2026-10-31, 21 %
    for valid_from in (dt.date(2026, 10, 31), dt.date(2026, 9, 1)):
        with pytest.raises(ApplicationError) as refused:
            services.tax_rate_create(
                country="NL", rate=Decimal(0), valid_from=valid_from, close_previous=True, actor=FINANCE
            )
        assert (refused.value.code, refused.value.status) == ("tax_rate_in_use", 409)
        assert refused.value.errors[0]["field"] == "valid_from"
        assert invoice.number in refused.value.message
    assert nl_rate().valid_until is None and TaxRate.objects.filter(country="NL").count() == 1
    # Ending the rate in force before that invoice's tax point is refused too.
    with pytest.raises(ApplicationError, match=invoice.number):
        services.tax_rate_update(rate_id=nl_rate().id, valid_until=dt.date(2026, 10, 15), note="", actor=FINANCE)
    page = operator("finance").post(
        f"/admin/invoicing/taxrate/{nl_rate().pk}/change/", {"valid_until": "2026-10-15", "note": "x"}
    )
    assert page.status_code == 200 and invoice.number in page.content.decode()
    # From the day after the last tax point, with the rate in force closed explicitly: fine.
    services.tax_rate_create(
        country="NL", rate=Decimal("22.00"), valid_from=NOVEMBER.start, close_previous=True, actor=FINANCE
    )
    assert nl_rate().valid_until == NOVEMBER.start


# --- Contract discounts


def discount(account: BillingAccount, percent: str, prefix: str = "", **dates: dt.date) -> ContractDiscount:
    return services.contract_discount_create(
        account_id=account.id,
        sku_prefix=prefix,
        percent=Decimal(percent),
        valid_from=dates.get("valid_from", NOVEMBER.start),
        valid_until=dates.get("valid_until"),
        reason="commitment",
        actor=FINANCE,
    )


def refused(code: str, account: BillingAccount, percent: str, prefix: str = "", **dates: dt.date) -> str:
    with pytest.raises(ApplicationError) as error:
        discount(account, percent, prefix, **dates)
    assert (error.value.code, error.value.status) == (code, 409)
    return error.value.message


def test_discounts_never_stack_past_100_percent_on_any_sku_on_any_day(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    discount(account, "50", valid_until=dt.date(2027, 1, 1))
    discount(account, "10", valid_from=dt.date(2026, 12, 1))
    # 50 + 10 + 50 from December: refused, naming the discounts in the way and the day.
    message = refused("discount_over_100", account, "50", valid_from=dt.date(2026, 11, 15))
    assert "every SKU would be discounted 110% on 2026-12-01" in message and "10% on every SKU" in message
    # A family under an all-SKU discount: 60 % on compute on top of 50 % is 110 % for compute.
    assert "compute. would be discounted 120% on 2026-12-01" in refused("discount_over_100", account, "60", "compute.")
    discount(account, "40", "compute.")  # 50 + 10 + 40 = 100: the most
    discount(account, "40", "storage.")  # another family: 100 for storage, compute unchanged
    # An all-SKU discount on top of the families: both families would pass 100.
    assert "would be discounted 101%" in refused("discount_over_100", account, "1")
    # Days apart do not add up: after the 50 % ends, another may start.
    discount(account, "5", "compute.vcpu", valid_from=dt.date(2027, 1, 1), valid_until=dt.date(2027, 2, 1))
    assert ContractDiscount.objects.filter(account_id=account.id).count() == 5
    assert TermsChange.objects.filter(subject="contract_discount", account_id=account.id, action="create").count() == 5


def test_a_discount_is_never_backdated_into_an_invoiced_period(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    close()
    number = Invoice.objects.get(account_id=account.id).number
    message = refused("discount_backdated", account, "10", valid_from=dt.date(2025, 1, 1))
    assert "invoiced up to 2026-10-31" in message and number in message
    ending = discount(account, "10")  # from November: fine
    with pytest.raises(ApplicationError) as error:
        services.contract_discount_update(
            discount_id=ending.id, valid_until=dt.date(2026, 10, 20), reason="x", actor=FINANCE
        )
    assert error.value.code == "invalid"  # ends before it starts


def test_finance_writes_discounts_through_the_service_from_the_admin(acct: Callable) -> None:
    account = acct(currency="EUR", country="NL")
    finance = operator("finance")
    form = {
        "account": account.public_id,
        "sku_prefix": "",
        "percent": "50",
        "valid_from": "2026-11-01",
        "valid_until": "",
        "reason": "2027 commitment",
    }
    assert finance.post("/admin/invoicing/contractdiscount/add/", form).status_code == 302
    page = finance.post("/admin/invoicing/contractdiscount/add/", {**form, "percent": "60", "sku_prefix": "compute."})
    assert page.status_code == 200 and "would be discounted 110%" in page.content.decode()
    page = finance.post("/admin/invoicing/contractdiscount/add/", {**form, "valid_from": "2025-01-01", "percent": "51"})
    assert page.status_code == 200 and "every SKU would be discounted 101% on 2026-11-01" in page.content.decode()
    [written] = ContractDiscount.objects.filter(account_id=account.id)
    assert written.created_by == "finance@ops.test"
    change = TermsChange.objects.get(subject="contract_discount", subject_id=written.id)
    assert (change.action, change.actor_name, change.after["percent"]) == ("create", "finance@ops.test", "50.00")
    # Changing it: only its end and reason; the percentage cannot be edited into a stack.
    response = finance.post(
        f"/admin/invoicing/contractdiscount/{written.pk}/change/",
        {"percent": "100", "valid_until": "2027-01-01", "reason": "ends with the year"},
    )
    assert response.status_code == 302
    written.refresh_from_db()
    assert (written.percent, written.valid_until) == (Decimal("50.00"), dt.date(2027, 1, 1))
    assert TermsChange.objects.filter(subject_id=written.id, action="update").count() == 1


def test_the_credit_check_owes_what_the_threshold_invoice_bills_after_discounts(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    free = make_account(customer.user, state="active", currency="EUR", country="NL", credit_limit=Decimal("100"))
    half = make_account(customer.user, state="active", currency="EUR", country="NL", credit_limit=Decimal("100"))
    discount(free, "100", "compute.")
    discount(half, "50", "compute.")
    for account in (free, half):
        rated(account.id, "2026-11-02", "compute.vcpu", "1000", "150")
    # 150 of compute at 100 % off owes nothing; at 50 % off, 75: neither is over its limit of 100.
    for _ in range(2):  # and stays so, run after run: nothing planned again and again
        report = services.threshold_billing_run(render_pdfs=False)
        assert (report.over_limit, report.issued, report.nothing_to_bill) == (0, [], 0)
    owed = {e.account_id: e.unbilled for e in selectors.credit_exposures(over_limit_only=False)}
    assert (owed[free.id], owed[half.id]) == (Decimal(0), Decimal(75))
    # 100 more compute: the half-off account owes 125 > 100 and is invoiced exactly that.
    rated(half.id, "2026-11-03", "compute.vcpu", "1000", "100")
    report = services.threshold_billing_run(render_pdfs=False)
    assert (report.over_limit, len(report.issued), report.nothing_to_bill) == (1, 1, 0)
    early = Invoice.objects.get(id=report.issued[0])
    assert (early.subtotal_minor, early.tax_minor, early.total_minor) == (12500, 2625, 15125)
