"""The terms invoices are planned with, written by finance: VAT rates (never overlapping, a
new one closes the one in force only when told, never under an issued invoice) and contract
discounts (never past 100 % together, never back into an issued period), each change audited."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from billing_site.common.errors import ApplicationError
from invoicing import services
from invoicing.models import Invoice, TaxRate, TermsChange
from invoicing.periods import Period
from invoicing.tests.factories import rated
from invoicing.tests.support import FINANCE, NOVEMBER, NOW, OCTOBER, operator

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
