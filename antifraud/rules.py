"""The rules: each looks at what a checkpoint knows of an account (``Subject``) with its
thresholds (``params``) and, when it fires, says exactly what it saw (``evidence``). Rules read
antifraud's own tables and the accounts app's selectors with indexed queries: no network call,
a few milliseconds in all (``make bench``).

A rule may also insist on a decision whatever the score: a card seen on a blocked account
blocks; a link to a blocked account is at least reviewed."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import iptocc
from disposable_email_domains import allowlist as DISPOSABLE_ALLOWLIST
from disposable_email_domains import blocklist as DISPOSABLE_BLOCKLIST
from django.db.models import Count, Q

from antifraud.models import (
    AccountSignal,
    BindingFailure,
    CardSeen,
    Decision,
    DomainVerdict,
    EmailDomain,
    OutcomeKind,
    PaymentOutcome,
    RuleCode,
    SignupEvent,
)
from billing_site.common import ids

# Providers that deliver ``first.last+tag@`` to ``firstlast@``: dots and +tags are removed for
# the dot-blind ones, +tags for the rest.
DOT_BLIND = {"gmail.com", "googlemail.com"}
PLUS_TAGGED = DOT_BLIND | {
    "outlook.com",
    "hotmail.com",
    "live.com",
    "icloud.com",
    "me.com",
    "fastmail.com",
    "protonmail.com",
    "proton.me",
}


def normalise_email(email: str) -> tuple[str, str]:
    """``(normalised address, domain)``: lower case; for providers that ignore them, no dots
    (Gmail) and no ``+tag``; ``googlemail.com`` is ``gmail.com``."""
    local, _, domain = email.strip().lower().rpartition("@")
    if domain == "googlemail.com":
        domain = "gmail.com"
    if domain in PLUS_TAGGED:
        local = local.split("+", 1)[0]
    if domain in DOT_BLIND:
        local = local.replace(".", "")
    return (f"{local}@{domain}" if local else "", domain)


def ip_prefix(ip: str) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 one (where one customer's addresses live)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    bits = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def ip_country(ip: str | None) -> str:
    """The IP address's country from the offline registry data (``iptocc``); '' if unknown."""
    if not ip:
        return ""
    try:
        return iptocc.country_code(ip) or ""
    except ValueError:
        return ""


@dataclass(frozen=True, slots=True)
class Card:
    fingerprint: str
    brand: str = ""
    last4: str = ""
    country: str = ""
    funding: str = ""


@dataclass(frozen=True, slots=True)
class Spend:
    """A new account's rated usage, as the usage checkpoint read it (amounts in its currency)."""

    currency: str
    first_day_amount: Decimal  # in the 24 hours after signup
    first_day_gpu_hours: Decimal
    since_signup_amount: Decimal
    typical_amount: Decimal  # the median of new accounts' spend since signup, same currency
    credit_limit: Decimal  # 0: none set


@dataclass(frozen=True, slots=True)
class Subject:
    """What a checkpoint knows of the account it assesses."""

    account_id: int
    email: str
    country: str  # the billing country
    tax_id: str
    created_at: dt.datetime
    user_id: int | None = None
    ip: str | None = None  # the client IP of this request
    signup_ip: str | None = None
    card: Card | None = None
    spend: Spend | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass(frozen=True, slots=True)
class Fired:
    rule: str
    weight: int
    evidence: dict[str, Any]
    insists: str = ""  # a decision the rule imposes whatever the score ("block", "review")

    def as_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "weight": self.weight, "evidence": self.evidence, "insists": self.insists}


Standings = Callable[[set[int]], dict[int, str]]  # account id → state


def _acc(account_id: int) -> str:
    return ids.encode("acc", account_id)


def disposable_email(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    _, domain = normalise_email(subject.email)
    if not domain:
        return None
    # The domain and each parent (mail.throwaway.example → throwaway.example): one query.
    labels = domain.split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    overrides = dict(EmailDomain.objects.filter(domain__in=candidates).values_list("domain", "verdict"))
    for candidate in candidates:
        verdict = overrides.get(candidate)
        if verdict == DomainVerdict.ALLOWED:
            return None
        if verdict == DomainVerdict.DISPOSABLE:
            return {"domain": domain, "listed": candidate, "source": "analysts"}
    for candidate in candidates:
        if candidate in DISPOSABLE_ALLOWLIST:
            return None
        if candidate in DISPOSABLE_BLOCKLIST:
            return {"domain": domain, "listed": candidate, "source": "disposable-email-domains"}
    return None


def signup_velocity(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """Other users and billing accounts created from the same IP, or its /24 or /64, within
    the window: fires when either count reaches its threshold."""
    ip = subject.signup_ip or subject.ip
    if not ip:
        return None
    since = subject.now - dt.timedelta(hours=float(params.get("window_hours", 24)))
    prefix = ip_prefix(ip)
    others = SignupEvent.objects.filter(created_at__gte=since).exclude(kind="account", subject_id=subject.account_id)
    if subject.user_id is not None:
        others = others.exclude(kind="user", subject_id=subject.user_id)
    same_ip = others.filter(ip=ip).count()
    same_prefix = others.filter(ip_prefix=prefix).count()
    max_ip, max_prefix = int(params.get("max_per_ip", 3)), int(params.get("max_per_prefix", 10))
    if same_ip < max_ip and same_prefix < max_prefix:
        return None
    return {
        "ip": ip,
        "network": prefix,
        "signups_from_ip": same_ip,
        "signups_from_network": same_prefix,
        "window_hours": params.get("window_hours", 24),
        "thresholds": {"ip": max_ip, "network": max_prefix},
    }


def card_reuse(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """The same card on more than ``max_accounts`` billing accounts (this one included); on a
    blocked account, whatever the count: block."""
    if subject.card is None or not subject.card.fingerprint:
        return None
    others = set(
        CardSeen.objects.filter(fingerprint=subject.card.fingerprint)
        .exclude(account_id=subject.account_id)
        .values_list("account_id", flat=True)[:1000]
    )
    if not others:
        return None
    states = standings(others)
    blocked = sorted(a for a, state in states.items() if state == "blocked")
    limit = int(params.get("max_accounts", 2))
    if not blocked and len(others) + 1 <= limit:
        return None
    evidence: dict[str, Any] = {
        "card": f"{subject.card.brand} •••• {subject.card.last4}".strip(),
        "fingerprint": subject.card.fingerprint,
        "accounts": len(others) + 1,
        "max_accounts": limit,
        "shared_with": [_acc(a) for a in sorted(others)[:20]],
    }
    if blocked:
        evidence["blocked_accounts"] = [_acc(a) for a in blocked[:20]]
        evidence["insists"] = Decision.BLOCK.value
    return evidence


def card_testing(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    since = subject.now - dt.timedelta(minutes=float(params.get("window_minutes", 60)))
    limit = int(params.get("max_failures", 5))
    recent = BindingFailure.objects.filter(created_at__gte=since)
    counts = {"account": recent.filter(account_id=subject.account_id).count()}
    if subject.user_id is not None:
        counts["user"] = recent.filter(user_id=subject.user_id).count()
    if subject.ip:
        counts["ip"] = recent.filter(ip=subject.ip).count()
    over = {k: v for k, v in counts.items() if v >= limit}
    if not over:
        return None
    return {
        "failed_bindings": counts,
        "over_threshold": sorted(over),
        "ip": subject.ip,
        "window_minutes": params.get("window_minutes", 60),
        "max_failures": limit,
    }


def country_mismatch(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """The card's issuing country, the billing country and the signup IP's country: fires
    when two that are known disagree."""
    seen = {
        "billing": subject.country,
        "card": subject.card.country if subject.card else "",
        "ip": ip_country(subject.signup_ip or subject.ip),
    }
    known = {k: v for k, v in seen.items() if v}
    if len(set(known.values())) <= 1:
        return None
    return {"countries": known, "ip": subject.signup_ip or subject.ip}


def prepaid_card(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    if subject.card is None or subject.card.funding != "prepaid":
        return None
    days = float(params.get("new_account_days", 30))
    age = subject.now - subject.created_at
    if age > dt.timedelta(days=days):
        return None
    return {
        "card": f"{subject.card.brand} •••• {subject.card.last4}".strip(),
        "funding": "prepaid",
        "account_age_days": round(age.total_seconds() / 86400, 1),
        "new_account_days": days,
    }


def linked_accounts(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """Accounts sharing the normalised email, the signup IP, the tax id or the card with a
    blocked account: at least a review, with the links shown."""
    email, _ = normalise_email(subject.email)
    ip = subject.signup_ip or subject.ip
    match = Q()
    if email:
        match |= Q(email_normalised=email)
    if ip:
        match |= Q(ip=ip)
    if subject.tax_id:
        match |= Q(tax_id=subject.tax_id)
    links: dict[int, list[str]] = {}
    if match:
        for account_id, their_email, their_ip, their_tax in (
            AccountSignal.objects.filter(match)
            .exclude(account_id=subject.account_id)
            .values_list("account_id", "email_normalised", "ip", "tax_id")[:1000]
        ):
            shared = links.setdefault(account_id, [])
            if email and their_email == email:
                shared.append(f"email {email}")
            if ip and their_ip == ip:
                shared.append(f"IP {ip}")
            if subject.tax_id and their_tax == subject.tax_id:
                shared.append(f"tax id {subject.tax_id}")
    # The card being bound, and the cards bound before.
    cards = {
        c.fingerprint: f"card {c.brand} •••• {c.last4}" for c in CardSeen.objects.filter(account_id=subject.account_id)
    }
    if subject.card is not None and subject.card.fingerprint:
        cards[subject.card.fingerprint] = f"card {subject.card.brand} •••• {subject.card.last4}".strip()
    if cards:
        for account_id, fingerprint in (
            CardSeen.objects.filter(fingerprint__in=list(cards))
            .exclude(account_id=subject.account_id)
            .values_list("account_id", "fingerprint")[:1000]
        ):
            links.setdefault(account_id, []).append(cards[fingerprint])
    if not links:
        return None
    states = standings(set(links))
    blocked = {a: shared for a, shared in links.items() if states.get(a) == "blocked"}
    if not blocked:
        return None
    return {
        "linked_blocked_accounts": [{"account": _acc(a), "shared": shared} for a, shared in sorted(blocked.items())],
        "insists": Decision.REVIEW.value,
    }


def payment_trouble(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """Declines and disputes on the account within the window: fires at either threshold; a
    dispute (a chargeback: the card's owner says it was not them) asks for a review."""
    since = subject.now - dt.timedelta(days=float(params.get("window_days", 30)))
    counts = dict.fromkeys((OutcomeKind.DECLINE.value, OutcomeKind.DISPUTE.value), 0)
    for kind, count in (
        PaymentOutcome.objects.filter(account_id=subject.account_id, created_at__gte=since, kind__in=list(counts))
        .values_list("kind")
        .annotate(Count("id"))
    ):
        counts[kind] = count
    max_declines, max_disputes = int(params.get("max_declines", 3)), int(params.get("max_disputes", 1))
    if counts["decline"] < max_declines and counts["dispute"] < max_disputes:
        return None
    evidence: dict[str, Any] = {
        "declines": counts["decline"],
        "disputes": counts["dispute"],
        "window_days": params.get("window_days", 30),
        "thresholds": {"declines": max_declines, "disputes": max_disputes},
    }
    if counts["dispute"] >= max_disputes:
        evidence["insists"] = Decision.REVIEW.value
    return evidence


def spend_velocity(subject: Subject, params: dict[str, Any], standings: Standings) -> dict[str, Any] | None:
    """A new account spending far faster than it should: more than ``first_day_max`` (per
    currency) or ``first_day_gpu_hours_max`` GPU-hours in its first 24 hours, more than
    ``limit_multiple`` times its credit limit, or more than ``typical_multiple`` times the
    typical new account's spend since signup."""
    spend = subject.spend
    if spend is None:
        return None
    why = []
    first_day_max = (params.get("first_day_max") or {}).get(spend.currency)
    if first_day_max is not None and spend.first_day_amount > Decimal(str(first_day_max)):
        why.append(f"first 24 h spend {spend.first_day_amount:.2f} > {first_day_max} {spend.currency}")
    gpu_max = params.get("first_day_gpu_hours_max")
    if gpu_max is not None and spend.first_day_gpu_hours > Decimal(str(gpu_max)):
        why.append(f"{spend.first_day_gpu_hours:.1f} GPU-hours in the first 24 h > {gpu_max}")
    limit_multiple = Decimal(str(params.get("limit_multiple", 2)))
    if spend.credit_limit > 0 and spend.since_signup_amount > limit_multiple * spend.credit_limit:
        why.append(
            f"spend {spend.since_signup_amount:.2f} > {limit_multiple} x the credit limit {spend.credit_limit:.2f}"
        )
    typical_multiple = Decimal(str(params.get("typical_multiple", 10)))
    if spend.typical_amount > 0 and spend.since_signup_amount > typical_multiple * spend.typical_amount:
        why.append(
            f"spend {spend.since_signup_amount:.2f} > {typical_multiple} x a typical new account's "
            f"{spend.typical_amount:.2f}"
        )
    if not why:
        return None
    return {
        "currency": spend.currency,
        "first_day_amount": str(spend.first_day_amount.quantize(Decimal("0.01"))),
        "first_day_gpu_hours": str(spend.first_day_gpu_hours.quantize(Decimal("0.1"))),
        "since_signup_amount": str(spend.since_signup_amount.quantize(Decimal("0.01"))),
        "why": why,
    }


RULES: dict[str, Callable[[Subject, dict[str, Any], Standings], dict[str, Any] | None]] = {
    RuleCode.DISPOSABLE_EMAIL: disposable_email,
    RuleCode.SIGNUP_VELOCITY: signup_velocity,
    RuleCode.CARD_REUSE: card_reuse,
    RuleCode.CARD_TESTING: card_testing,
    RuleCode.COUNTRY_MISMATCH: country_mismatch,
    RuleCode.PREPAID_CARD: prepaid_card,
    RuleCode.LINKED_ACCOUNTS: linked_accounts,
    RuleCode.PAYMENT_TROUBLE: payment_trouble,
    RuleCode.SPEND_VELOCITY: spend_velocity,
}


def evaluate(subject: Subject, rules: list[tuple[str, int, dict[str, Any]]], standings: Standings) -> list[Fired]:
    """Run the enabled ``rules`` (code, weight, params) on ``subject``: the ones that fired."""
    fired = []
    for code, weight, params in rules:
        evidence = RULES[code](subject, params, standings)
        if evidence is not None:
            insists = evidence.pop("insists", "")
            fired.append(Fired(rule=code, weight=weight, evidence=evidence, insists=insists))
    return fired
