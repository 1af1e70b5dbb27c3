"""VAT rates, written by finance: never overlapping for a country and kind, a new one closing
the rate in force only when told, never changing a day an issued invoice was taxed on, withdrawn
only while no issued invoice used them; audited."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, models, transaction

from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from invoicing import taxes
from invoicing.models import (
    Invoice,
    InvoiceStatus,
    TaxRate,
    TaxRateKind,
    TermsChange,
    TermsSubject,
)
from invoicing.writing import require_reason, terms_audit


def _tax_rate_row(rate: TaxRate) -> dict[str, Any]:
    return {
        "country": str(rate.country),
        "kind": rate.kind,
        "rate": str(rate.rate),
        "valid_from": rate.valid_from.isoformat(),
        "valid_until": rate.valid_until.isoformat() if rate.valid_until else None,
        "note": rate.note,
    }


def _overlapping_rates(
    *, country: str, kind: str, start: dt.date, end: dt.date | None, exclude_id: int | None = None
) -> list[TaxRate]:
    queryset = TaxRate.objects.filter(country=country, kind=kind).filter(
        models.Q(valid_until__isnull=True) | models.Q(valid_until__gt=start)
    )
    if end is not None:
        queryset = queryset.filter(valid_from__lt=end)
    if exclude_id is not None:
        queryset = queryset.exclude(id=exclude_id)
    return list(queryset.order_by("valid_from"))


def _require_no_invoice_taxed(*, country: str, start: dt.date, end: dt.date | None, field: str) -> None:
    """Refuse a change of ``country``'s rate on the days [start, end) when an issued invoice was
    taxed with that country's VAT on one of them: what an issued invoice charged is corrected
    by credit notes, never by moving the rate under it."""
    queryset = (
        Invoice.objects.filter(tax_country=country, period_end__gt=start)  # tax point = period_end - 1 day
        .exclude(status=InvoiceStatus.DRAFT)
        .order_by("-period_end", "-issued_at")
    )
    if end is not None:
        queryset = queryset.filter(period_end__lte=end)
    taxed = queryset.first()
    if taxed is not None:
        raise Conflict(
            "tax_rate_in_use",
            f"Invoice {taxed.number} was issued with {country} VAT at {taxed.tax_rate}% on {taxed.tax_point}: "
            f"a rate cannot change what issued invoices charged (correct them with credit notes).",
            field=field,
        )


def _end_move(rate: TaxRate, valid_until: dt.date | None, *, action: str, actor: Actor, reason: str) -> None:
    """A rate's end moved by a service that checked it (closed by its successor, reopened when
    that one is withdrawn), audited."""
    before = _tax_rate_row(rate)
    rate.valid_until = valid_until
    rate.save(update_fields=["valid_until"])
    terms_audit(
        subject=TermsSubject.TAX_RATE,
        subject_id=rate.id,
        action=action,
        actor=actor,
        reason=reason,
        before=before,
        after=_tax_rate_row(rate),
    )


def _rate_fields(*, rate: Decimal, valid_from: dt.date, valid_until: dt.date | None) -> None:
    if not (isinstance(rate, Decimal) and rate.is_finite() and 0 <= rate < 100 and rate == round(rate, 2)):
        raise ApplicationError("invalid", "A rate is a percentage from 0 to 99.99, at most 2 places.", field="rate")
    if valid_until is not None and valid_until <= valid_from:
        raise ApplicationError("invalid", "The rate must end after it starts.", field="valid_until")


def tax_rate_check(
    *,
    country: str,
    rate: Decimal,
    valid_from: dt.date,
    valid_until: dt.date | None = None,
    kind: str = TaxRateKind.STANDARD,
    close_previous: bool = False,
) -> TaxRate | None:
    """What a new rate would do, or why it may not (``ApplicationError`` naming the field and
    the rate in the way); reads only. Returns the open-ended rate it closes on ``valid_from``
    (``close_previous`` must say so), or None. ``tax_rate_create`` checks it again under the lock."""
    country = country.strip().upper()
    if kind not in TaxRateKind.values:
        raise ApplicationError("invalid", f"kind must be one of {', '.join(TaxRateKind.values)}.", field="kind")
    if len(country) != 2 or not country.isalpha():
        raise ApplicationError("invalid", "A country is a two-letter ISO 3166 code.", field="country")
    _rate_fields(rate=rate, valid_from=valid_from, valid_until=valid_until)
    in_the_way = _overlapping_rates(country=country, kind=kind, start=valid_from, end=valid_until)
    closes = None
    if len(in_the_way) == 1 and in_the_way[0].valid_until is None and in_the_way[0].valid_from < valid_from:
        closes = in_the_way[0]
        if not close_previous:
            raise Conflict(
                "tax_rate_overlap",
                f"{closes} is in force with no end: close it on {valid_from} to replace it "
                f"(tick “Close the rate in force”).",
                field="valid_from",
            )
    elif in_the_way:
        raise Conflict(
            "tax_rate_overlap",
            f"Overlaps {'; '.join(str(r) for r in in_the_way)}: rates of one country never overlap.",
            field="valid_from",
        )
    _require_no_invoice_taxed(country=country, start=valid_from, end=valid_until, field="valid_from")
    return closes


@audited
@transaction.atomic(durable=True)
def tax_rate_create(
    *,
    country: str,
    rate: Decimal,
    valid_from: dt.date,
    actor: Actor,
    valid_until: dt.date | None = None,
    note: str = "",
    kind: str = TaxRateKind.STANDARD,
    close_previous: bool = False,
) -> TaxRate:
    """A new VAT rate for ``country`` from ``valid_from``. If an open-ended rate is in force
    then, it is ended on ``valid_from`` when ``close_previous`` says so (else refused, naming
    it); any other overlap is refused (and impossible in the table: an exclusion constraint).
    Refused when an issued invoice was taxed with the country's VAT on a day the new rate
    covers. Both rows audited (``TermsChange``)."""
    taxes.lock_rates(shared=False)
    closes = tax_rate_check(
        country=country,
        rate=rate,
        valid_from=valid_from,
        valid_until=valid_until,
        kind=kind,
        close_previous=close_previous,
    )
    note = note.strip()[:200]
    if closes is not None:
        _end_move(closes, valid_from, action="close", actor=actor, reason=f"replaced by the rate from {valid_from}")
    try:
        with transaction.atomic():
            created = TaxRate.objects.create(
                country=country.strip().upper(),
                kind=kind,
                rate=rate.quantize(Decimal("0.01")),
                valid_from=valid_from,
                valid_until=valid_until,
                note=note,
            )
    except IntegrityError as exc:  # the exclusion constraint: a rate written meanwhile
        raise Conflict("tax_rate_overlap", "Another rate of the country is in force then.", field="valid_from") from exc
    terms_audit(
        subject=TermsSubject.TAX_RATE,
        subject_id=created.id,
        action="create",
        actor=actor,
        reason=note,
        after=_tax_rate_row(created),
    )
    return created


def tax_rate_update_check(*, rate_id: int, valid_until: dt.date | None) -> TaxRate:
    """Why ``rate_id`` may not end on ``valid_until`` (empty: open-ended), if it may not; reads only."""
    rate = TaxRate.objects.filter(id=rate_id).first()
    if rate is None:
        raise NotFound("No such tax rate.")
    _rate_fields(rate=rate.rate, valid_from=rate.valid_from, valid_until=valid_until)
    in_the_way = _overlapping_rates(
        country=str(rate.country), kind=rate.kind, start=rate.valid_from, end=valid_until, exclude_id=rate.id
    )
    if in_the_way:
        raise Conflict(
            "tax_rate_overlap",
            f"Overlaps {'; '.join(str(r) for r in in_the_way)}: rates of one country never overlap.",
            field="valid_until",
        )
    old, new = rate.valid_until, valid_until
    if old != new:  # the days between the old and the new end change rate (or lose theirs)
        start = min(d for d in (old, new) if d is not None)
        end = None if old is None or new is None else max(old, new)
        _require_no_invoice_taxed(country=str(rate.country), start=start, end=end, field="valid_until")
    return rate


@audited
@transaction.atomic(durable=True)
def tax_rate_update(*, rate_id: int, valid_until: dt.date | None, note: str, actor: Actor) -> TaxRate:
    """End (or re-open, or move the end of) a rate, and its note. Its country, kind, rate
    and start are fixed once written: a different rate is a new rate."""
    taxes.lock_rates(shared=False)
    tax_rate_update_check(rate_id=rate_id, valid_until=valid_until)
    rate = TaxRate.objects.select_for_update().get(id=rate_id)
    before = _tax_rate_row(rate)
    rate.valid_until, rate.note = valid_until, note.strip()[:200]
    try:
        with transaction.atomic():
            rate.save(update_fields=["valid_until", "note"])
    except IntegrityError as exc:
        raise Conflict("tax_rate_overlap", "Another rate is in force then.", field="valid_until") from exc
    if _tax_rate_row(rate) != before:
        terms_audit(
            subject=TermsSubject.TAX_RATE,
            subject_id=rate.id,
            action="update",
            actor=actor,
            reason=rate.note,
            before=before,
            after=_tax_rate_row(rate),
        )
    return rate


def tax_rate_withdraw_check(*, rate_id: int) -> tuple[TaxRate, TaxRate | None]:
    """Why ``rate_id`` may not be withdrawn, if it may not (an issued invoice was taxed on one
    of its days: ``tax_rate_in_use``); else the rate and the rate it closed when it was added
    (the country's rate ending on its first day, whose last audited change is that closing),
    which withdrawing gives its days back to. A rate that simply ended there (a temporary rate,
    bounded when written) is not stretched over them. Reads only."""
    rate = TaxRate.objects.filter(id=rate_id).first()
    if rate is None:
        raise NotFound("No such tax rate.")
    _require_no_invoice_taxed(country=str(rate.country), start=rate.valid_from, end=rate.valid_until, field="rate")
    closed = TaxRate.objects.filter(country=rate.country, kind=rate.kind, valid_until=rate.valid_from).first()
    if closed is not None:
        last = TermsChange.objects.filter(subject=TermsSubject.TAX_RATE, subject_id=closed.id).order_by("-id").first()
        if last is None or last.action != "close" or (last.after or {}).get("valid_until") != str(rate.valid_from):
            closed = None
    return rate, closed


@audited
@transaction.atomic(durable=True)
def tax_rate_withdraw(*, rate_id: int, reason: str, actor: Actor) -> TaxRate | None:
    """Take back a rate no issued invoice was taxed with (a mistyped or mistaken rate: once an
    invoice used it, it stands, and what it charged is corrected by credit notes). The rate it
    closed when it was added, if any, runs again over its days (to its end, or open-ended), as
    before the mistake. Both audited (``TermsChange``: ``withdraw``, ``reopen``). Returns the
    reopened rate, or None."""
    reason = require_reason(reason)
    taxes.lock_rates(shared=False)
    rate, closed = tax_rate_withdraw_check(rate_id=rate_id)
    withdrawn = _tax_rate_row(rate)
    rate.delete()
    terms_audit(
        subject=TermsSubject.TAX_RATE,
        subject_id=rate_id,
        action="withdraw",
        actor=actor,
        reason=reason,
        before=withdrawn,
    )
    if closed is None:
        return None
    # Exactly the withdrawn rate's days: no overlap.
    _end_move(
        closed,
        rate.valid_until,
        action="reopen",
        actor=actor,
        reason=f"the rate from {rate.valid_from} was withdrawn: {reason}",
    )
    return closed
