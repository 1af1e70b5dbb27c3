"""How an invoice line and its detail are shown: in the API, in the admin and on the PDF.

A line's quantity is stored at full precision (durations as exact unit-seconds divided by
3,600 once, ``metering.selectors.quantity_sum``). Shown, every quantity is rounded once,
half-up, to at most ``QUANTITY_PLACES`` places, with trailing zeros removed (``744``,
``122316.2``), the same figure wherever it appears (``billing_site.common.quantities``, which
the costs API uses too). Only what is shown is rounded: amounts are computed from the
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

from billing_site.common import money, quantities

quantity_text = quantities.quantity_text  # the one rule, shared with the costs API
QUANTITY_PLACES = quantities.QUANTITY_PLACES
_CONTEXT = decimal.Context(prec=60, rounding=ROUND_HALF_UP)  # never out of precision on 38 digits


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
