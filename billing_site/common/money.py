"""Money: ISO 4217 minor units and the one rounding rule.

Amounts on documents (invoices, credit notes, ledger lines) are stored as integers in the
currency's minor unit (``*_minor``: cents for EUR, yen for JPY, fils for BHD). The exponent
comes from ISO 4217 (the ``iso4217`` package's table), never a hard-coded 100. Rated usage
keeps full precision; it becomes minor units at exactly one documented point, an invoice line
(or a document's tax), with ``ROUND_HALF_UP`` (ties away from zero, as PostgreSQL's round()).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from functools import cache

import iso4217

# The largest amount (in minor units, either sign) a line, tax, subtotal or total of one
# document may carry: far beyond any real invoice (10^13 EUR, 10^15 JPY) and far inside a
# bigint (9.2 * 10^18), so even the sum of thousands of such documents in the ledger stays
# representable. Usage rating to more than this is not billed: the account is reported.
DOCUMENT_LIMIT_MINOR = 10**15


def within_document_limit(*amounts_minor: int) -> bool:
    """Whether every amount is representable on a document (see ``DOCUMENT_LIMIT_MINOR``)."""
    return all(-DOCUMENT_LIMIT_MINOR <= amount <= DOCUMENT_LIMIT_MINOR for amount in amounts_minor)


@cache
def exponent(currency: str) -> int:
    """Digits after the decimal point of ``currency``'s minor unit (JPY 0, EUR 2, BHD 3)."""
    try:
        value = iso4217.Currency(currency.upper()).exponent
    except ValueError as exc:
        raise ValueError(f"{currency!r} is not an ISO 4217 currency") from exc
    return int(value or 0)


@cache
def exponents() -> dict[str, int]:
    """Every ISO 4217 currency's exponent, for SQL that turns minor units into amounts."""
    return {c.code: int(c.exponent or 0) for c in iso4217.Currency}


def to_minor(amount: Decimal, currency: str) -> int:
    """``amount`` (major units, any precision) rounded half-up to an integer of minor units."""
    scale = Decimal(10) ** exponent(currency)
    return int((amount * scale).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def from_minor(amount_minor: int, currency: str) -> Decimal:
    """Minor units as a Decimal with exactly the currency's places: 1234 EUR → Decimal('12.34')."""
    return Decimal(format_minor(amount_minor, currency))


def format_minor(amount_minor: int, currency: str) -> str:
    """Minor units as a decimal string with exactly the currency's places: 1234 EUR → '12.34',
    -5 EUR → '-0.05', 1234 JPY → '1234' (integer arithmetic only)."""
    places = exponent(currency)
    if places == 0:
        return str(amount_minor)
    whole, fraction = divmod(abs(amount_minor), 10**places)
    return f"{'-' if amount_minor < 0 else ''}{whole}.{fraction:0{places}d}"


def format_amount(amount: Decimal | int, currency: str) -> str:
    """A major-unit amount kept with more places (a credit limit stored with 4) as a string with
    exactly the currency's places, rounded half-up: Decimal('0.0000') EUR → '0.00', JPY → '0'."""
    return format(Decimal(amount).quantize(Decimal(1).scaleb(-exponent(currency)), rounding=ROUND_HALF_UP), "f")


def fits_minor(amount: Decimal, currency: str) -> bool:
    """Whether ``amount`` needs no more places than the currency's minor unit (10.5 JPY: no)."""
    return amount == amount.quantize(Decimal(1).scaleb(-exponent(currency)))


def display(amount_minor: int, currency: str, *, grouped: bool = False) -> str:
    """For people: '1234.50 EUR' (``grouped``: '1,234.50 EUR')."""
    amount = from_minor(amount_minor, currency)
    return f"{amount:,} {currency}" if grouped else f"{amount} {currency}"


def percent_of_minor(amount_minor: int, percent: Decimal) -> int:
    """``percent`` % of an amount already in minor units, rounded half-up once."""
    return int((Decimal(amount_minor) * percent / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def allocate(total_minor: int, weights: list[Decimal]) -> list[int]:
    """Split ``total_minor`` in proportion to ``weights`` so that the parts sum to exactly
    the total (largest remainder: the units left after flooring go to the largest
    fractional parts, ties to the earlier part). Weights count by magnitude; if they are all
    zero the total goes to the first part."""
    if not weights:
        return []
    # Integer arithmetic on the weights scaled to 12 places (rated amounts carry 12).
    scaled = [abs(int(w.scaleb(12))) for w in weights]
    whole = sum(scaled)
    if whole == 0:
        return [total_minor] + [0] * (len(weights) - 1)
    magnitude = abs(total_minor)
    floors_and_rests = [divmod(magnitude * w, whole) for w in scaled]
    parts = [floor for floor, _ in floors_and_rests]
    leftover = magnitude - sum(parts)
    if leftover:
        order = sorted(range(len(parts)), key=lambda i: (-floors_and_rests[i][1], i))
        for i in order[:leftover]:
            parts[i] += 1
    return parts if total_minor >= 0 else [-p for p in parts]
