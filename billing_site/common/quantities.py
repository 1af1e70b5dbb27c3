"""How a usage quantity is shown, wherever it is shown (the costs API, the admin, invoice
lines in the API and on the PDF): rounded once, half-up, to at most ``QUANTITY_PLACES``
places, trailing zeros removed, never in exponent notation. Only what is shown is rounded;
amounts are computed from the stored quantities, never from these strings."""

from __future__ import annotations

import decimal
from decimal import ROUND_HALF_UP, Decimal

# Places a shown quantity keeps at most (a millionth of a GB-hour is about 3.6 kB for a second).
QUANTITY_PLACES = 6
_QUANTUM = Decimal(1).scaleb(-QUANTITY_PLACES)
# Stored quantities have up to 38 digits (26 before the point); rounding them must never run
# out of the default context's 28 digits of precision.
_CONTEXT = decimal.Context(prec=60, rounding=ROUND_HALF_UP)


def quantity_text(quantity: Decimal | str | None, *, grouped: bool = False) -> str | None:
    """``quantity`` as shown (``Decimal('743.9999999999996')`` → ``'744'``, ``122316.2``);
    ``grouped`` puts commas between thousands, as the PDF prints money. None stays None (a
    line without a quantity)."""
    if quantity is None:
        return None
    rounded = Decimal(quantity).quantize(_QUANTUM, context=_CONTEXT)
    if rounded.is_zero():
        return "0"  # never "-0" (a tiny negative adjustment rounds to zero)
    shown = rounded.normalize(context=_CONTEXT)
    return f"{shown:,f}" if grouped else f"{shown:f}"
