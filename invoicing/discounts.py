"""Contract discounts, written by finance under the account's billing lock: together never
more than 100 % of any SKU on any day, never back into an invoiced period; audited."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.db import models, transaction

from accounts import selectors as account_selectors
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from invoicing import issuing
from invoicing.models import (
    ContractDiscount,
    Invoice,
    InvoiceStatus,
    TermsSubject,
)
from invoicing.writing import require_reason, terms_audit


def _discount_row(discount: ContractDiscount) -> dict[str, Any]:
    return {
        "sku_prefix": discount.sku_prefix,
        "percent": str(discount.percent),
        "valid_from": discount.valid_from.isoformat(),
        "valid_until": discount.valid_until.isoformat() if discount.valid_until else None,
        "reason": discount.reason,
    }


def _invoiced_until(account_id: int) -> Invoice | None:
    """The account's issued invoice (any kind, any state after issue) whose period ends last."""
    return (
        Invoice.objects.filter(account_id=account_id)
        .exclude(status=InvoiceStatus.DRAFT)
        .order_by("-period_end", "-issued_at")
        .first()
    )


def _require_not_invoiced(account_id: int, day: dt.date, *, field: str) -> None:
    """Refuse a change of the account's discounts from ``day`` on when an issued invoice covers
    ``day``: what an issued invoice discounted is corrected with credit notes."""
    last = _invoiced_until(account_id)
    if last is not None and day < last.period_end:
        raise Conflict(
            "discount_backdated",
            f"The account is invoiced up to {last.period_end - dt.timedelta(days=1)} ({last.number}): "
            f"a discount may change from {last.period_end} on; correct issued invoices with credit notes.",
            field=field,
        )


def _discount_peak(
    *,
    account_id: int,
    sku_prefix: str,
    percent: Decimal,
    valid_from: dt.date,
    valid_until: dt.date | None,
    exclude_id: int | None = None,
) -> tuple[Decimal, dt.date, str, list[ContractDiscount]]:
    """The highest combined percentage any SKU the discount covers would get on any day of
    [valid_from, valid_until) with the account's other discounts: the day, the SKU prefix it
    happens on, and the others in force then. A SKU gets every discount whose prefix starts
    its code; the discounts whose prefixes start with this one's split its SKUs, so each such
    prefix (and this one) is tried, on this discount's first day and each other one's."""
    others = ContractDiscount.objects.filter(account_id=account_id).filter(
        models.Q(valid_until__isnull=True) | models.Q(valid_until__gt=valid_from)
    )
    if valid_until is not None:
        others = others.filter(valid_from__lt=valid_until)
    if exclude_id is not None:
        others = others.exclude(id=exclude_id)
    related = [d for d in others if d.sku_prefix.startswith(sku_prefix) or sku_prefix.startswith(d.sku_prefix)]
    worst: tuple[Decimal, dt.date, str, list[ContractDiscount]] = (percent, valid_from, sku_prefix, [])
    for scope in sorted({sku_prefix} | {d.sku_prefix for d in related if d.sku_prefix.startswith(sku_prefix)}):
        applying = [d for d in related if scope.startswith(d.sku_prefix)]
        for day in sorted({valid_from} | {d.valid_from for d in applying if d.valid_from > valid_from}):
            if valid_until is not None and day >= valid_until:
                continue
            active = [d for d in applying if d.valid_from <= day and (d.valid_until is None or day < d.valid_until)]
            total = percent + sum((d.percent for d in active), Decimal(0))
            if total > worst[0]:
                worst = (total, day, scope, active)
    return worst


def contract_discount_check(
    *,
    account_id: int,
    sku_prefix: str,
    percent: Decimal,
    valid_from: dt.date,
    valid_until: dt.date | None = None,
    discount_id: int | None = None,
) -> None:
    """Why the discount (a new one, or ``discount_id`` with a new end) may not be, if it may
    not; reads only (``contract_discount_create``/``_update`` check again under the account's
    billing lock). Combined with the account's other discounts no SKU is discounted more
    than 100 % on any day, and nothing changes on days an issued invoice covers."""
    if account_selectors.billing_profiles(account_ids=[account_id]).get(account_id) is None:
        raise NotFound("No such billing account.")
    if not (
        isinstance(percent, Decimal) and percent.is_finite() and 0 < percent <= 100 and percent == round(percent, 2)
    ):
        raise ApplicationError(
            "invalid", "A discount is more than 0 and at most 100 %, at most 2 places.", field="percent"
        )
    if valid_until is not None and valid_until <= valid_from:
        raise ApplicationError("invalid", "The discount must end after it starts.", field="valid_until")
    if discount_id is None:
        _require_not_invoiced(account_id, valid_from, field="valid_from")
    total, day, scope, others = _discount_peak(
        account_id=account_id,
        sku_prefix=sku_prefix,
        percent=percent,
        valid_from=valid_from,
        valid_until=valid_until,
        exclude_id=discount_id,
    )
    if total > 100:
        named = "; ".join(
            f"{d.percent.normalize():f}% on {d.sku_prefix or 'every SKU'} from {d.valid_from}" for d in others
        )
        raise Conflict(
            "discount_over_100",
            f"With {named}, {scope or 'every SKU'} would be discounted {total.normalize():f}% on {day}: "
            f"an account's discounts together stay within 100 %.",
            field="percent",
        )


@audited
@transaction.atomic(durable=True)
def contract_discount_create(
    *,
    account_id: int,
    sku_prefix: str,
    percent: Decimal,
    valid_from: dt.date,
    reason: str,
    actor: Actor,
    valid_until: dt.date | None = None,
) -> ContractDiscount:
    """A negotiated discount of ``percent`` on the SKUs starting with ``sku_prefix`` (empty:
    all) for usage on [valid_from, valid_until), checked under the account's billing lock (a
    period close of the account waits, and so does another discount), audited."""
    reason = require_reason(reason)[:200]
    sku_prefix = sku_prefix.strip()
    issuing.lock_accounts([account_id])
    contract_discount_check(
        account_id=account_id, sku_prefix=sku_prefix, percent=percent, valid_from=valid_from, valid_until=valid_until
    )
    discount = ContractDiscount.objects.create(
        account_id=account_id,
        sku_prefix=sku_prefix,
        percent=percent.quantize(Decimal("0.01")),
        valid_from=valid_from,
        valid_until=valid_until,
        reason=reason,
        created_by=actor.name,
    )
    terms_audit(
        subject=TermsSubject.CONTRACT_DISCOUNT,
        subject_id=discount.id,
        account_id=account_id,
        action="create",
        actor=actor,
        reason=reason,
        after=_discount_row(discount),
    )
    return discount


@audited
@transaction.atomic(durable=True)
def contract_discount_update(
    *, discount_id: int, valid_until: dt.date | None, reason: str, actor: Actor
) -> ContractDiscount:
    """Move a discount's end (end it, extend it, make it open-ended) and its reason. Its SKUs,
    percentage and start are fixed once written (a different discount is a new one); the
    days between the old and the new end must not be invoiced yet."""
    reason = require_reason(reason)[:200]
    found = ContractDiscount.objects.filter(id=discount_id).values_list("account_id", flat=True).first()
    if found is None:
        raise NotFound("No such contract discount.")
    issuing.lock_accounts([found])
    discount = ContractDiscount.objects.select_for_update().get(id=discount_id)
    contract_discount_check(
        account_id=discount.account_id,
        sku_prefix=discount.sku_prefix,
        percent=discount.percent,
        valid_from=discount.valid_from,
        valid_until=valid_until,
        discount_id=discount.id,
    )
    if valid_until != discount.valid_until:
        changed = [d for d in (valid_until, discount.valid_until) if d is not None]
        _require_not_invoiced(discount.account_id, min(changed), field="valid_until")
    before = _discount_row(discount)
    discount.valid_until, discount.reason = valid_until, reason
    discount.save(update_fields=["valid_until", "reason"])
    if _discount_row(discount) != before:
        terms_audit(
            subject=TermsSubject.CONTRACT_DISCOUNT,
            subject_id=discount.id,
            account_id=discount.account_id,
            action="update",
            actor=actor,
            reason=reason,
            before=before,
            after=_discount_row(discount),
        )
    return discount
