"""Template filters for the fraud team's pages (``{% load fraud_display %}``): evidence as
rows, money as money, waits in words (``antifraud.display``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django import template

from antifraud import display

register = template.Library()


@register.filter
def evidence_rows(evidence: Any) -> list[tuple[str, str]]:
    return display.evidence_rows(evidence)


@register.filter
def amount(value: Decimal | int | None, currency: str) -> str:
    return display.amount(value, currency)


@register.filter
def amount_minor(value: int | None, currency: str) -> str:
    return display.amount_minor(value, currency)


@register.filter
def wait(delta: dt.timedelta | None) -> str:
    return display.wait(delta)
