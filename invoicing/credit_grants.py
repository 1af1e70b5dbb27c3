"""Credit: finance's grants (promotional, prepaid) and the writes of every grant with its
ledger entry (overpayments kept as credit are written by the services that receive the money)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import selectors as account_selectors
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from invoicing import ledger
from invoicing.models import (
    GRANTABLE_CREDIT_KINDS,
    CreditGrant,
    CreditKind,
    LedgerSource,
)
from invoicing.writing import require_reason


def credit_grant_check(
    *, account_id: int, kind: str, amount: Decimal, currency: str, expires_at: dt.datetime | None = None
) -> int:
    """Why finance may not grant this credit, if it may not (``ApplicationError`` naming the
    field); else the amount in minor units. Reads only."""
    if kind not in GRANTABLE_CREDIT_KINDS:
        raise ApplicationError("invalid", f"kind must be one of {', '.join(GRANTABLE_CREDIT_KINDS)}.", field="kind")
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None:
        raise NotFound("No such billing account.")
    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    if standing is not None and standing.state == "closed":
        raise Conflict("account_closed", "The account is closed: no credit is granted to it.", field="account")
    account_currency = profile.currency  # the account's currency decides
    if currency != account_currency:
        raise ApplicationError("currency_mismatch", f"The account is billed in {account_currency}.", field="currency")
    amount_minor = money.to_minor(amount, currency)
    if amount_minor <= 0 or not money.fits_minor(amount, currency):
        raise ApplicationError(
            "invalid_amount",
            f"A positive amount with at most {money.exponent(currency)} decimal places is required.",
            field="amount",
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("invalid", "The expiry must be in the future.", field="expires_at")
    return amount_minor


@audited
@transaction.atomic(durable=True)
def credit_grant_create(
    *,
    account_id: int,
    kind: str,
    amount: Decimal,
    currency: str,
    reason: str,
    actor: Actor,
    expires_at: dt.datetime | None = None,
    grant_id: int | None = None,
) -> CreditGrant:
    """Grant credit in ``currency`` (the account's) to an account that is not closed.
    Promotional credit is an expense; prepaid credit was paid through the gateway.
    (Overpayment credit is written by the services that receive the money, never granted by
    hand: money received for a closed account is still kept.) ``grant_id``: the id to write
    it under (an approved four-eyes request's): a grant already written under it is returned."""
    if grant_id is not None:
        existing = CreditGrant.objects.filter(id=grant_id).first()
        if existing is not None:
            return existing
    account_selectors.billing_account_hold(account_id)  # a close racing the grant: one waits for the other
    amount_minor = credit_grant_check(
        account_id=account_id, kind=kind, amount=amount, currency=currency, expires_at=expires_at
    )
    now = timezone.now()
    reason = require_reason(reason)
    try:
        return credit_grant_write(
            account_id=account_id,
            kind=kind,
            currency=currency,
            amount_minor=amount_minor,
            expires_at=expires_at,
            reason=reason,
            granted_by=actor.name,
            debit=ledger.PROMOTIONS if kind == CreditKind.PROMOTIONAL else ledger.GATEWAY_CLEARING,
            memo=f"{kind.title()} credit: {reason}",
            now=now,
            grant_id=grant_id,
        )
    except IntegrityError as exc:  # pragma: no cover - a fresh random id
        raise Conflict("conflict", "Try again.") from exc


def credit_grant_write(
    *,
    account_id: int,
    kind: str,
    currency: str,
    amount_minor: int,
    reason: str,
    granted_by: str,
    debit: str,
    memo: str,
    now: dt.datetime,
    debit_account_id: int | None = None,
    expires_at: dt.datetime | None = None,
    grant_id: int | None = None,
) -> CreditGrant:
    """Write a grant and its ledger entry (source ``credit_grant``): ``debit`` (where the
    credit comes from: promotions, the gateway, the receivable) debited, customer credit
    credited."""
    grant = CreditGrant.objects.create(
        id=grant_id or ids.new_id(),
        account_id=account_id,
        kind=kind,
        currency=currency,
        amount_minor=amount_minor,
        remaining_minor=amount_minor,
        expires_at=expires_at,
        reason=reason[:300],
        granted_by=granted_by,
        created_at=now,
    )
    ledger.post(
        [
            ledger.Entry(
                LedgerSource.CREDIT_GRANT,
                grant.id,
                account_id,
                currency,
                memo[:300],
                [
                    ledger.Posting(debit, amount_minor, debit_account_id),
                    ledger.Posting(ledger.CUSTOMER_CREDIT, -amount_minor, account_id),
                ],
            )
        ],
        posted_at=now,
    )
    return grant
