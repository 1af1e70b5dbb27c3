"""What the fraud team reads: the review queue, one account's case on one page, and the
dashboard (queue size and age, decisions per day, precision)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Count, Min, Q, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from accounts import selectors as account_selectors
from antifraud.models import (
    AccountRisk,
    AccountSignal,
    CardSeen,
    Decision,
    PaymentOutcome,
    ReviewDecision,
    RiskAssessment,
    RiskStatus,
)
from billing_site.common import ids
from billing_site.common.backlogs import Backlog


def review_queue() -> QuerySet[AccountRisk]:
    """Accounts in review, riskiest first, then the newest flagged."""
    return AccountRisk.objects.filter(status=RiskStatus.REVIEW).order_by("-score", "-flagged_at", "-account_id")


def review_queue_backlog() -> Backlog:
    """The review queue's size and since when its oldest account waits (by ``flagged_at``), in
    one statement (the staff home page, /metrics, the fraud dashboard)."""
    return Backlog.of(
        AccountRisk.objects.filter(status=RiskStatus.REVIEW).aggregate(
            count=Count("account_id"), oldest_at=Min("flagged_at")
        )
    )


@dataclass(frozen=True, slots=True)
class LinkedAccount:
    account: str
    name: str
    state: str
    shared: list[str]


@dataclass(frozen=True, slots=True)
class CardRow:
    brand: str
    last4: str
    country: str
    funding: str
    accounts_sharing: int  # accounts with this card's fingerprint, this one included


@dataclass
class ReviewCase:
    account_id: int
    account: str
    name: str
    email: str
    country: str
    currency: str
    state: str
    kind: str
    standing: str
    score: int
    assessments: list[RiskAssessment] = field(default_factory=list)
    linked: list[LinkedAccount] = field(default_factory=list)
    cards: list[CardRow] = field(default_factory=list)
    outcomes: list[PaymentOutcome] = field(default_factory=list)
    spend_total: Decimal = Decimal(0)
    spend_by_sku: dict[str, Decimal] = field(default_factory=dict)
    decisions: list[ReviewDecision] = field(default_factory=list)
    spending_cap: Decimal | None = None  # an active account in review: its limit lowered to this
    capped_from: Decimal | None = None  # the limit given back on approval


def review_case(*, account_id: int, now: dt.datetime | None = None) -> ReviewCase | None:
    """Everything an analyst needs to decide on one account."""
    from metering import selectors as metering_selectors

    now = now or timezone.now()
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None:
        return None
    risk = AccountRisk.objects.filter(account_id=account_id).first()
    signal = AccountSignal.objects.filter(account_id=account_id).first()
    cards = list(CardSeen.objects.filter(account_id=account_id).order_by("first_seen_at"))

    links: dict[int, list[str]] = {}
    if signal is not None:
        match = Q()
        if signal.email_normalised:
            match |= Q(email_normalised=signal.email_normalised)
        if signal.ip:
            match |= Q(ip=signal.ip)
        if signal.tax_id:
            match |= Q(tax_id=signal.tax_id)
        if signal.phone:
            match |= Q(phone=signal.phone)
        if match:
            for other in AccountSignal.objects.filter(match).exclude(account_id=account_id)[:200]:
                shared = links.setdefault(other.account_id, [])
                if signal.email_normalised and other.email_normalised == signal.email_normalised:
                    shared.append(f"email {signal.email_normalised}")
                if signal.ip and other.ip == signal.ip:
                    shared.append(f"IP {signal.ip}")
                if signal.tax_id and other.tax_id == signal.tax_id:
                    shared.append(f"tax id {signal.tax_id}")
                if signal.phone and other.phone == signal.phone:
                    shared.append(f"phone {signal.phone}")
    fingerprints = {c.fingerprint: c for c in cards}
    sharing = dict(
        CardSeen.objects.filter(fingerprint__in=list(fingerprints))
        .values_list("fingerprint")
        .annotate(n=Count("account_id"))
    )
    for other_id, fingerprint in (
        CardSeen.objects.filter(fingerprint__in=list(fingerprints))
        .exclude(account_id=account_id)
        .values_list("account_id", "fingerprint")[:200]
    ):
        card = fingerprints[fingerprint]
        links.setdefault(other_id, []).append(f"card {card.brand} •••• {card.last4}")
    others = account_selectors.billing_profiles(account_ids=list(links))
    states = account_selectors.billing_account_standings(set(links) | {account_id})

    since = signal.created_at if signal else now - dt.timedelta(days=30)
    spend = metering_selectors.window_amounts(
        [metering_selectors.AmountWindow(key=account_id, account_id=account_id, sku_prefix="", start=since, end=now)]
    )
    by_sku = {sku: amount for (_, sku), amount in sorted(spend.items())}
    return ReviewCase(
        account_id=account_id,
        account=profile.public_id,
        name=profile.name,
        email=profile.email,
        country=profile.country,
        currency=profile.currency,
        kind=profile.kind,
        state=states[account_id].state if account_id in states else "",
        standing=risk.status if risk else RiskStatus.CLEAR,
        score=risk.score if risk else 0,
        spending_cap=risk.spending_cap if risk else None,
        capped_from=risk.capped_from if risk else None,
        assessments=list(RiskAssessment.objects.filter(account_id=account_id).order_by("-created_at", "-id")[:20]),
        linked=[
            LinkedAccount(
                account=ids.encode("acc", other_id),
                name=others[other_id].name if other_id in others else "",
                state=states[other_id].state if other_id in states else "",
                shared=shared,
            )
            for other_id, shared in sorted(links.items())
        ],
        cards=[
            CardRow(
                brand=c.brand,
                last4=c.last4,
                country=c.country,
                funding=c.funding,
                accounts_sharing=sharing.get(c.fingerprint, 1),
            )
            for c in cards
        ],
        outcomes=list(PaymentOutcome.objects.filter(account_id=account_id).order_by("-created_at")[:50]),
        spend_total=sum(by_sku.values(), Decimal(0)),
        spend_by_sku=by_sku,
        decisions=list(ReviewDecision.objects.filter(account_id=account_id)[:50]),
    )


@dataclass(frozen=True, slots=True)
class Dashboard:
    queue_size: int
    oldest_in_queue: dt.timedelta | None
    decisions_per_day: list[dict[str, Any]]  # {day, approve, block, request_info}
    bad_accounts: int  # blocked or suspended for debt
    bad_flagged_before: int  # of those, flagged (review or block) before
    flagged_accounts: int
    flagged_turned_fine: int  # of those, active and in good standing now
    flagged_share_of_bad: float | None
    fine_share_of_flagged: float | None


def dashboard(*, now: dt.datetime | None = None, days: int = 14) -> Dashboard:
    now = now or timezone.now()
    queue = review_queue_backlog()
    per_day: dict[dt.date, dict[str, Any]] = {}
    for day, action, count in (
        ReviewDecision.objects.filter(created_at__gte=now - dt.timedelta(days=days))
        .annotate(day=TruncDate("created_at"))
        .values_list("day", "action")
        .annotate(n=Count("id"))
    ):
        per_day.setdefault(day, {"day": day, "approve": 0, "block": 0, "request_info": 0})[action] = count
    flagged = set(
        RiskAssessment.objects.filter(decision__in=[Decision.REVIEW, Decision.BLOCK])
        .values_list("account_id", flat=True)
        .distinct()
    )
    known = set(AccountRisk.objects.values_list("account_id", flat=True))
    standings = account_selectors.billing_account_standings(known | flagged)
    bad = {a for a, s in standings.items() if s.state in ("blocked", "suspended")}
    fine = {a for a in flagged if a in standings and standings[a].state == "active"}
    return Dashboard(
        queue_size=queue.count,
        oldest_in_queue=(now - queue.oldest_at) if queue.oldest_at else None,
        decisions_per_day=[per_day[d] for d in sorted(per_day, reverse=True)],
        bad_accounts=len(bad),
        bad_flagged_before=len(bad & flagged),
        flagged_accounts=len(flagged),
        flagged_turned_fine=len(fine),
        flagged_share_of_bad=len(bad & flagged) / len(bad) if bad else None,
        fine_share_of_flagged=len(fine) / len(flagged) if flagged else None,
    )
