"""How the fraud team's pages show what the rules saw: evidence as labelled rows (never a
Python dict), money as money (the currency's places, from ``billing_site.common.money``),
waits in words."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from billing_site.common import money

_WORDS = {"ip": "IP", "gpu": "GPU", "ips": "IPs"}


def _words(key: object) -> str:
    """``signups_from_ip`` → 'signups from IP'."""
    return " ".join(_WORDS.get(word, word) for word in str(key).split("_"))


def _label(key: object) -> str:
    text = _words(key)
    return text[:1].upper() + text[1:]


def evidence_value(value: Any) -> str:
    """One evidence value in words: lists joined, objects as ``name: value`` pairs."""
    if value is None or value == "" or value == [] or value == {}:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{_words(k)}: {evidence_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, dict) for v in value):
            return "; ".join(evidence_value(v) for v in value)
        return ", ".join(evidence_value(v) for v in value)
    return str(value)


def evidence_rows(evidence: Any) -> list[tuple[str, str]]:
    """A fired rule's evidence as (label, value) rows, in the order the rule gave them."""
    if not isinstance(evidence, dict):
        return [("Evidence", evidence_value(evidence))]
    return [(_label(key), evidence_value(value)) for key, value in evidence.items()]


def amount(value: Decimal | int | None, currency: str) -> str:
    """A major-unit amount kept with more places (rated spend at 12, limits at 4) as money:
    '550.51 EUR'."""
    if value is None:
        return "—"
    if not currency:
        return str(value)
    return f"{money.format_amount(value, currency)} {currency}"


def amount_minor(value: int | None, currency: str) -> str:
    """An amount in minor units as money: 43352 EUR → '433.52 EUR'."""
    if value is None:
        return "—"
    if not currency:
        return str(value)
    return money.display(value, currency)


def wait(delta: dt.timedelta | None) -> str:
    """How long something has waited, in words: 'under a minute', '13 min', '5 h 2 min',
    '3.2 days' (from two days on)."""
    if delta is None:
        return "—"
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    return f"{delta.total_seconds() / 86400:.1f} days"
