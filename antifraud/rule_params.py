"""What each rule's parameters may be: one schema per rule, checked wherever a rule is written
(the admin's form and ``services.risk_rule_update``) and again when the rules in force are
loaded for evaluation (a row written past both, by SQL or an old release, makes that rule
skipped and recorded on the assessment, never the checkpoint fail).

A rule's ``params`` is a JSON object; every key must be one its rule reads (a misspelt
threshold would otherwise be ignored in silence), each value of its kind. A key left out takes
the rule's default."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from billing_site.common import money


class Kind(StrEnum):
    COUNT = "count"  # a whole number (JSON integer) ≥ ``minimum``
    NUMBER = "number"  # a number (JSON number or a decimal string) > 0
    TEXT = "text"  # a non-empty string
    AMOUNTS = "amounts"  # {ISO 4217 currency: amount ≥ 0 (number or decimal string)}


@dataclass(frozen=True, slots=True)
class Param:
    kind: Kind
    help: str
    minimum: int = 1  # for counts


RULE_PARAMS: dict[str, dict[str, Param]] = {
    "disposable_email": {},
    "signup_velocity": {
        "window_hours": Param(Kind.NUMBER, "Hours of signups counted"),
        "max_per_ip": Param(Kind.COUNT, "Fires at this many other signups from the IP"),
        "max_per_prefix": Param(Kind.COUNT, "Fires at this many other signups from its /24 or /64"),
    },
    "card_reuse": {
        "max_accounts": Param(Kind.COUNT, "Fires above this many accounts (of different owners) with one card"),
    },
    "card_testing": {
        "window_minutes": Param(Kind.NUMBER, "Minutes of failed bindings counted"),
        "max_failures": Param(Kind.COUNT, "Fires at this many failed bindings by account, user or IP"),
    },
    "country_mismatch": {},
    "prepaid_card": {"new_account_days": Param(Kind.NUMBER, "Accounts younger than this many days")},
    "linked_accounts": {},
    "payment_trouble": {
        "window_days": Param(Kind.NUMBER, "Days of payment outcomes counted"),
        "max_declines": Param(Kind.COUNT, "Fires at this many declines"),
        "max_disputes": Param(Kind.COUNT, "Fires (and asks for a review) at this many disputes"),
    },
    "spend_velocity": {
        "new_account_days": Param(Kind.NUMBER, "Accounts opened within this many days are measured"),
        "first_day_max": Param(Kind.AMOUNTS, "First 24 hours' spend limit per currency"),
        "first_day_gpu_hours_max": Param(Kind.NUMBER, "First 24 hours' GPU-hours limit"),
        "gpu_sku_prefix": Param(Kind.TEXT, "SKUs counted as GPU-hours"),
        "limit_multiple": Param(Kind.NUMBER, "Fires above this many times the credit limit"),
        "typical_multiple": Param(Kind.NUMBER, "Fires above this many times a typical new account's spend"),
    },
}


def _number(value: Any) -> Decimal | None:
    """A JSON number or a decimal string as a finite Decimal; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(str(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _value_error(param: Param, value: Any) -> str:
    """What is wrong with ``value`` for ``param`` ('' when nothing)."""
    if param.kind == Kind.COUNT:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, at least {param.minimum} (got {value!r})"
        if value < param.minimum:
            return f"must be at least {param.minimum} (got {value})"
        return ""
    if param.kind == Kind.NUMBER:
        number = _number(value)
        if number is None or number <= 0:
            return f"must be a number above 0 (got {value!r})"
        return ""
    if param.kind == Kind.TEXT:
        return "" if isinstance(value, str) and value.strip() else f"must be non-empty text (got {value!r})"
    if not isinstance(value, dict):
        return f'must be an object of amounts by currency, e.g. {{"EUR": "500"}} (got {value!r})'
    for currency, amount in value.items():
        try:
            money.exponent(str(currency))
        except ValueError:
            return f"{currency!r} is not an ISO 4217 currency"
        number = _number(amount)
        if number is None or number < 0:
            return f"the amount for {currency} must be a number, at least 0 (got {amount!r})"
    return ""


def params_errors(code: str, params: Any) -> dict[str, str]:
    """What is wrong with ``params`` for the rule ``code``: parameter name → message (empty when
    they are fine). A parameter list that is not an object is reported under ``params``."""
    schema = RULE_PARAMS.get(code)
    if schema is None:
        return {"code": f"no rule {code!r}"}
    if not isinstance(params, dict):
        return {"params": f'must be a JSON object of named parameters, e.g. {{"name": 3}} (got {params!r})'}
    errors: dict[str, str] = {}
    for name, value in params.items():
        param = schema.get(name)
        if param is None:
            known = ", ".join(sorted(schema)) or "none"
            errors[str(name)] = f"is not a parameter of {code} (its parameters: {known})"
        elif problem := _value_error(param, value):
            errors[name] = problem
    return errors


def describe(errors: dict[str, str]) -> str:
    """``errors`` as one line: 'max_accounts must be a whole number …; window_days …'."""
    return "; ".join(f"{name} {problem}" for name, problem in errors.items())
