"""Test data for invoicing: accounts, and rated usage written where the rollup writes it."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import factory
from django.db import connection

from billing_site.common.actors import Actor
from invoicing import services
from invoicing.models import ContractDiscount, CreditGrant
from invoicing.tests.support import FINANCE


def rated(
    account_id: int,
    day: str,
    sku: str,
    quantity: str | Decimal,
    amount: str | Decimal,
    *,
    resource_id: str = "",
    labels: dict[str, str] | None = None,
) -> None:
    """One day of rated usage in the daily rollup and the month's spend, as the usage rollup
    leaves them (adds to an existing row of the same key)."""
    moment = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (account_id, day, sku, resource_id, labels) DO UPDATE
            SET quantity = metering_dailyusage.quantity + EXCLUDED.quantity,
                amount = metering_dailyusage.amount + EXCLUDED.amount
            """,
            [account_id, moment, sku, resource_id, json.dumps(labels or {}), Decimal(quantity), Decimal(amount)],
        )
        cursor.execute(
            """
            INSERT INTO metering_monthlyspend AS m (account_id, month, amount) VALUES (%s, %s, %s)
            ON CONFLICT (account_id, month) DO UPDATE SET amount = m.amount + EXCLUDED.amount
            """,
            [account_id, moment.date().replace(day=1), Decimal(amount)],
        )


class ContractDiscountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ContractDiscount

    sku_prefix = "compute."
    percent = Decimal(10)
    valid_from = dt.date(2026, 1, 1)
    reason = "2026 commitment"


def promotional_credit(
    account_id: int,
    amount: str | Decimal,
    *,
    currency: str = "EUR",
    reason: str = "welcome",
    expires_at: dt.datetime | None = None,
    actor: Actor = FINANCE,
) -> CreditGrant:
    """A promotional credit granted through the service, as finance grants it."""
    return services.credit_grant_create(
        account_id=account_id,
        kind="promotional",
        amount=Decimal(amount),
        currency=currency,
        reason=reason,
        actor=actor,
        expires_at=expires_at,
    )
