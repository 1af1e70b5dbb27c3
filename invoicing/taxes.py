"""EU VAT: which rate and legal note an invoice carries.

The seller is established in ``settings.INVOICING_SELLER_COUNTRY`` (default NL). Decided per
invoice, at the tax point (the period's last day; for a credit note, its invoice's decision):

- customer in the seller's country: that country's standard rate (domestic);
- business customer in another member state with a valid VAT number: 0 %, reverse charge;
- any other customer in another member state: that state's standard rate (OSS);
- customer outside the EU: 0 %, outside the scope of EU VAT.

Standard rates live in ``TaxRate`` (finance edits them in the admin, with validity dates).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db import connection
from stdnum.eu import vat as eu_vat

from billing_site.common import money
from billing_site.common.countries import EU_COUNTRIES
from billing_site.common.errors import ApplicationError
from invoicing.models import TaxRate, TaxRateKind, TaxTreatment

NOTES = {
    TaxTreatment.DOMESTIC: "",
    TaxTreatment.OSS: "VAT of the customer's member state (One-Stop Shop, Art. 58 Directive 2006/112/EC).",
    TaxTreatment.REVERSE_CHARGE: "Reverse charge: VAT to be accounted for by the recipient "
    "(Art. 196 Directive 2006/112/EC).",
    TaxTreatment.OUTSIDE_EU: "Outside the scope of EU VAT (place of supply outside the EU).",
}

# Standard rates in force on 2026-11-26 (and the earlier rate where it changed since 2024),
# seeded by migration 0002; finance maintains them in the admin from then on.
SEED_RATES: list[tuple[str, str, str, str | None]] = [
    ("AT", "20.00", "2024-01-01", None),
    ("BE", "21.00", "2024-01-01", None),
    ("BG", "20.00", "2024-01-01", None),
    ("CY", "19.00", "2024-01-01", None),
    ("CZ", "21.00", "2024-01-01", None),
    ("DE", "19.00", "2024-01-01", None),
    ("DK", "25.00", "2024-01-01", None),
    ("EE", "22.00", "2024-01-01", "2025-07-01"),
    ("EE", "24.00", "2025-07-01", None),
    ("ES", "21.00", "2024-01-01", None),
    ("FI", "24.00", "2024-01-01", "2024-09-01"),
    ("FI", "25.50", "2024-09-01", None),
    ("FR", "20.00", "2024-01-01", None),
    ("GR", "24.00", "2024-01-01", None),
    ("HR", "25.00", "2024-01-01", None),
    ("HU", "27.00", "2024-01-01", None),
    ("IE", "23.00", "2024-01-01", None),
    ("IT", "22.00", "2024-01-01", None),
    ("LT", "21.00", "2024-01-01", None),
    ("LU", "17.00", "2024-01-01", None),
    ("LV", "21.00", "2024-01-01", None),
    ("MT", "18.00", "2024-01-01", None),
    ("NL", "21.00", "2024-01-01", None),
    ("PL", "23.00", "2024-01-01", None),
    ("PT", "23.00", "2024-01-01", None),
    ("RO", "19.00", "2024-01-01", "2025-08-01"),
    ("RO", "21.00", "2025-08-01", None),
    ("SE", "25.00", "2024-01-01", None),
    ("SI", "22.00", "2024-01-01", None),
    ("SK", "20.00", "2024-01-01", "2025-01-01"),
    ("SK", "23.00", "2025-01-01", None),
]


@dataclass(frozen=True, slots=True)
class TaxDecision:
    treatment: str
    country: str  # whose VAT is charged ('' when none)
    rate: Decimal  # percent
    note: str


@dataclass(frozen=True, slots=True)
class Buyer:
    country: str
    kind: str  # accounts.AccountKind
    tax_id: str


class RateTable:
    """The standard rates, loaded once for a batch of decisions."""

    def __init__(self) -> None:
        self._rates: dict[str, list[tuple[dt.date, dt.date | None, Decimal]]] = {}
        for rate in TaxRate.objects.filter(kind=TaxRateKind.STANDARD):
            self._rates.setdefault(str(rate.country), []).append((rate.valid_from, rate.valid_until, rate.rate))

    def rate(self, country: str, on: dt.date) -> Decimal:
        for valid_from, valid_until, rate in self._rates.get(country, []):
            if valid_from <= on and (valid_until is None or on < valid_until):
                return rate
        raise ApplicationError(
            "tax_rate_missing", f"No standard VAT rate for {country} on {on}: add it in the admin (Tax rates)."
        )


RATES_LOCK = "invoicing.tax_rates"


def lock_rates(*, shared: bool) -> None:
    """Hold the rates still for this transaction: issuing takes it shared before it reads the
    rates (chunks issue side by side), a change of a rate exclusively before it checks which
    issued invoices it would touch. So no invoice is issued with a rate that a change
    committing meanwhile makes wrong."""
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {function}(hashtextextended(%s, 0))", [RATES_LOCK])


def has_valid_vat_number(buyer: Buyer) -> bool:
    """A VAT number with a valid checksum for the buyer's own member state (python-stdnum).
    Validation against VIES is a network call and is not made here."""
    if not buyer.tax_id:
        return False
    prefix = "EL" if buyer.country == "GR" else buyer.country
    return buyer.tax_id.upper().startswith(prefix) and bool(eu_vat.is_valid(buyer.tax_id))


def decide(buyer: Buyer, *, tax_point: dt.date, rates: RateTable, seller_country: str | None = None) -> TaxDecision:
    seller = (seller_country or settings.INVOICING_SELLER_COUNTRY).upper()
    country = buyer.country.upper()
    if country == seller:
        treatment, charged = TaxTreatment.DOMESTIC, seller
    elif country not in EU_COUNTRIES:
        treatment, charged = TaxTreatment.OUTSIDE_EU, ""
    elif buyer.kind == "business" and has_valid_vat_number(buyer):
        treatment, charged = TaxTreatment.REVERSE_CHARGE, ""
    else:
        treatment, charged = TaxTreatment.OSS, country
    rate = rates.rate(charged, tax_point) if charged else Decimal("0.00")
    return TaxDecision(treatment=treatment, country=charged, rate=rate, note=NOTES[treatment])


def rule_tax(cumulative_net: int, *, rate: Decimal, credited_tax: int, invoice_tax: int) -> int:
    """The tax of a credit note that brings the net credited on an invoice to
    ``cumulative_net``: the rate on it, rounded half-up once, less the tax already credited,
    kept within what is left of the invoice's tax."""
    cumulative = money.percent_of_minor(cumulative_net, rate)
    return min(max(cumulative - credited_tax, 0), invoice_tax - credited_tax)


def seed_rates(model: type[TaxRate] = TaxRate) -> int:
    """Insert the seed rates that are missing (idempotent); the number added."""
    added = 0
    for country, rate, valid_from, valid_until in SEED_RATES:
        _, created = model.objects.get_or_create(
            country=country,
            valid_from=dt.date.fromisoformat(valid_from),
            defaults={
                "rate": Decimal(rate),
                "valid_until": dt.date.fromisoformat(valid_until) if valid_until else None,
                "note": "seeded",
            },
        )
        added += created
    return added


def split_gross(gross: int, *, rate: Decimal, net_left: int, tax_left: int) -> tuple[int, int]:
    """Net and VAT of ``gross`` (VAT included, minor units) taxed at ``rate`` percent, on a
    document of which ``net_left`` and ``tax_left`` are still to credit (a refund's credit
    note): ``net + vat == gross`` exactly.

    Rounding, the invoice's rule read backwards: the VAT is the VAT fraction of the gross,
    ``gross * rate / (100 + rate)``, rounded half-up once to the minor unit; the net is the
    rest. Whenever some net ``n`` has ``n + round(n * rate) == gross`` (the invoice's own rule,
    VAT = rate * net rounded half-up), this is that split, so the VAT is exactly
    ``round(net * rate)`` — 21 % of 100.43 gross is 83.00 + 17.43. Where no net does (the
    rounded VAT steps by a unit there: 100.00 at 21 % has 82.64 + 17.35 = 99.99 and
    82.65 + 17.36 = 100.01), the VAT is the fraction of the gross rounded, 17.36 on 82.64,
    one unit from ``round(net * rate)`` and never more. Kept within what is left of the net
    and of the VAT; crediting all that is left takes exactly the rest of both, so the parts
    of an invoice credited in pieces sum to its net and its VAT."""
    if gross >= net_left + tax_left:
        return net_left, tax_left
    vat = int((Decimal(gross) * rate / (100 + rate)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    vat = min(max(vat, gross - net_left, 0), tax_left)
    return gross - vat, vat
