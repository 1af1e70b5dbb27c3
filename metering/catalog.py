"""The price catalog document (``load_catalog FILE.json``): parsed and checked as a whole
before anything is written, so a bad file is refused with the reason and loads nothing."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from django.conf import settings

SkuCode = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
AwareTime = Annotated[dt.datetime, msgspec.Meta(tz=True)]

MAX_PRICE_PLACES = 18


class TierDocument(msgspec.Struct, forbid_unknown_fields=True):
    up_to: Decimal | None
    unit_price: Decimal


class PriceDocument(msgspec.Struct, forbid_unknown_fields=True):
    currency: Currency
    valid_from: AwareTime
    unit_price: Decimal | None = None
    tiers: list[TierDocument] | None = None


class SkuDocument(msgspec.Struct, forbid_unknown_fields=True):
    code: SkuCode
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    unit: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    kind: Literal["duration", "quantity"]
    prices: list[PriceDocument] = []


class CatalogDocument(msgspec.Struct, forbid_unknown_fields=True):
    skus: list[SkuDocument]


class CatalogError(ValueError):
    """A catalog document that cannot be loaded; the message says where and why."""


def parse(raw: bytes) -> CatalogDocument:
    try:
        document = msgspec.json.decode(raw, type=CatalogDocument)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"invalid catalog: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise CatalogError(f"not JSON: {exc}") from exc
    check(document)
    return document


def _check_amount(value: Decimal, where: str, *, places: int) -> None:
    if not value.is_finite() or value < 0:
        raise CatalogError(f"{where}: must be a finite amount >= 0, got {value}")
    if value >= Decimal(10) ** (38 - places):  # the column: numeric(38, places)
        raise CatalogError(f"{where}: too large, got {value}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > places:
        raise CatalogError(f"{where}: at most {places} decimal places, got {value}")


def check(document: CatalogDocument) -> None:
    """The rules a schema cannot say: one price form, ordered tiers, no duplicates."""
    seen_codes: set[str] = set()
    for i, sku in enumerate(document.skus):
        at = f"skus[{i}] ({sku.code})"
        if sku.code in seen_codes:
            raise CatalogError(f"{at}: SKU code appears twice")
        seen_codes.add(sku.code)
        seen_prices: set[tuple[str, dt.datetime]] = set()
        for j, price in enumerate(sku.prices):
            where = f"{at}.prices[{j}]"
            if price.currency not in settings.BILLING_CURRENCIES:
                raise CatalogError(
                    f"{where}.currency: {price.currency} is not one of {', '.join(settings.BILLING_CURRENCIES)}"
                )
            try:
                year = price.valid_from.astimezone(dt.UTC).year
            except OverflowError:
                year = 0
            if not 1970 <= year <= 9998:
                raise CatalogError(f"{where}.valid_from: out of range, got {price.valid_from.isoformat()}")
            key = (price.currency, price.valid_from)
            if key in seen_prices:
                raise CatalogError(f"{where}: a second {price.currency} price from {price.valid_from.isoformat()}")
            seen_prices.add(key)
            if (price.unit_price is None) == (price.tiers is None):
                raise CatalogError(f"{where}: give either unit_price or tiers")
            if price.unit_price is not None:
                _check_amount(price.unit_price, f"{where}.unit_price", places=MAX_PRICE_PLACES)
                continue
            tiers = price.tiers or []
            if not tiers:
                raise CatalogError(f"{where}.tiers: at least one tier")
            previous = Decimal(0)
            for k, tier in enumerate(tiers):
                tier_at = f"{where}.tiers[{k}]"
                _check_amount(tier.unit_price, f"{tier_at}.unit_price", places=MAX_PRICE_PLACES)
                last = k == len(tiers) - 1
                if tier.up_to is None:
                    if not last:
                        raise CatalogError(f"{tier_at}.up_to: only the last tier may be unbounded (null)")
                    continue
                _check_amount(tier.up_to, f"{tier_at}.up_to", places=12)
                if tier.up_to <= previous:
                    raise CatalogError(f"{tier_at}.up_to: tiers must rise; {tier.up_to} <= {previous}")
                previous = tier.up_to
                if last:
                    raise CatalogError(f"{tier_at}.up_to: the last tier must be unbounded (null)")
