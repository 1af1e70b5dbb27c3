"""How an invoice line and its detail are shown: in the API, in the admin and on the PDF.

A line's quantity is stored at full precision: the sum of per-hour fractions, each rounded to
12 places, so a resource that ran all 744 hours of October can add up to 743.999999999999 or
744.000000000001 vCPU-hours. Shown, every quantity is rounded once, half-up, to at most
``QUANTITY_PLACES`` places, with trailing zeros removed (``744``, ``122316.2``), the same
figure wherever it appears. Only what is shown is rounded: amounts are computed from the
stored full-precision quantities, as before, and never from these strings.

A line's detail (its usage by resource and by ``project`` label, see ``planning._line_detail``)
is shown the same way: each row's quantity rounded as above, and the line's rounded amount
split over the rows in proportion to their rated amounts so that each split sums to the line
exactly (largest remainder, ``money.allocate``). Computed from frozen data, so it never changes.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing_site.common import money

# Places a shown quantity keeps at most (a millionth of a GB-hour is about 3.6 kB for a second).
QUANTITY_PLACES = 6
_QUANTUM = Decimal(1).scaleb(-QUANTITY_PLACES)
# Stored quantities have up to 38 digits (26 before the point); rounding them must never run
# out of the default context's 28 digits of precision.
_CONTEXT = decimal.Context(prec=60, rounding=ROUND_HALF_UP)


def quantity_text(quantity: Decimal | str | None, *, grouped: bool = False) -> str | None:
    """``quantity`` as shown: rounded half-up to at most 6 places, no trailing zeros, never in
    exponent notation (``Decimal('743.9999999999996')`` → ``'744'``); ``grouped`` puts commas
    between thousands, as the PDF prints money. None stays None (a line without a quantity)."""
    if quantity is None:
        return None
    rounded = Decimal(quantity).quantize(_QUANTUM, context=_CONTEXT)
    if rounded.is_zero():
        return "0"  # never "-0" (a tiny negative adjustment rounds to zero)
    shown = rounded.normalize(context=_CONTEXT)
    return f"{shown:,f}" if grouped else f"{shown:f}"


def unit_price_text(unit_price: Decimal | None) -> str | None:
    """A unit price as shown: all its places (prices may carry many: 0.0000125 per request),
    no trailing zeros. None when the price was tiered or changed in the period."""
    return None if unit_price is None else f"{unit_price.normalize(context=_CONTEXT):f}"


def detail_view(
    detail: dict[str, Any],
    amount_minor: int,
    currency: str,
    *,
    amount_text: Callable[[int, str], str] = money.format_minor,
    grouped: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """A line's detail as shown: per dimension (``resources``, ``projects``), a row per key with
    its quantity (rounded as ``quantity_text``) and its part of the line's amount. The API
    shows amounts as decimal strings (``money.format_minor``); the PDF passes its own
    ``amount_text`` and ``grouped``."""
    view: dict[str, list[dict[str, str]]] = {}
    for dimension, rows in detail.items():
        parts = money.allocate(amount_minor, [Decimal(amount) for _, _, amount in rows])
        view[dimension] = [
            {
                "key": key,
                "quantity": quantity_text(quantity, grouped=grouped) or "",
                "amount": amount_text(part, currency),
            }
            for (key, quantity, _), part in zip(rows, parts, strict=True)
        ]
    return view
