"""The rules: each looks at what a checkpoint knows of an account (``Subject``) and what the
tables say about it (``Facts``) with its thresholds (``params``) and, when it fires, says
exactly what it saw (``evidence``).

Everything the rules need from the database is read by ``gather`` in ONE statement over
antifraud's own tables (indexed look-ups, each capped): the rules themselves are pure
functions. No network call; a few milliseconds in all (``make bench``). Which accounts are
blocked is antifraud's own knowledge too (``AccountRisk``, told of every block).

A rule may also insist on a decision whatever the score: a card seen on a blocked account
blocks; a link to a blocked account is at least reviewed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import iptocc
import psycopg
from disposable_email_domains import allowlist as DISPOSABLE_ALLOWLIST
from disposable_email_domains import blocklist as DISPOSABLE_BLOCKLIST
from django.db import connection

from antifraud.models import Decision, DomainVerdict, RuleCode
from billing_site.common import ids

log = logging.getLogger(__name__)

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
    user_id: int | None = None
    phone: str = ""  # E.164
    ip: str | None = None  # the client IP of this request
    card: Card | None = None
    spend: Spend | None = None
    # The other accounts of this account's owner: one customer's own accounts sharing a card
    # are not card reuse (read at the card-binding checkpoint only).
    same_owner: frozenset[int] = frozenset()
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass(frozen=True, slots=True)
class Facts:
    """What the tables say about a subject, read at once by ``gather``."""

    signup_ip: str | None = None  # as kept at signup (else the request's)
    signup_ip_country: str = ""
    opened_at: dt.datetime | None = None
    domain_verdicts: dict[str, str] = field(default_factory=dict)  # analysts' verdicts on its domains
    signups_from_ip: int = 0  # others, within the velocity window
    signups_from_network: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # failed bindings by account / user / ip
    card_accounts: list[int] = field(default_factory=list)  # other accounts with the card being bound
    links: dict[int, list[str]] = field(default_factory=dict)  # other account → what it shares
    blocked: frozenset[int] = frozenset()  # among card_accounts and links
    declines: int = 0
    disputes: int = 0


@dataclass(frozen=True, slots=True)
class Fired:
    rule: str
    weight: int
    evidence: dict[str, Any]
    insists: str = ""  # a decision the rule imposes whatever the score ("block", "review")

    def as_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "weight": self.weight, "evidence": self.evidence, "insists": self.insists}


@dataclass(frozen=True, slots=True)
class Skipped:
    """A rule that could not be evaluated (its parameters invalid, or it raised): left out of
    the score, recorded on the assessment, logged as an error."""

    rule: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "error": self.error}


def _acc(account_id: int) -> str:
    return ids.encode("acc", account_id)


def _card_label(brand: str, last4: str) -> str:
    return f"card {brand} •••• {last4}".strip()


def _domains(email: str) -> list[str]:
    """The address's domain and each parent (mail.throwaway.example → throwaway.example)."""
    _, domain = normalise_email(email)
    labels = domain.split(".") if domain else []
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


CAP = 1000  # linked or card-sharing accounts read at most (evidence names the first 20)

# Every look-up below must stay an index probe under a generic plan (prepared once per
# connection, planned for any parameters): the caps are literals, not parameters (a parameter's
# LIMIT is estimated at a tenth of the table and turned the blocked look-up into a hash join over
# every account's standing), the tax id and phone look-ups repeat their partial indexes'
# predicate (a generic `tax_id = $n` on a column mostly empty was planned as a sequential scan:
# 175 ms on 1,000,000 accounts), and the blocked look-up probes each linked account by key.
_FACTS_SQL = """
WITH sig AS (
    SELECT ip, ip_prefix, ip_country, created_at FROM antifraud_accountsignal WHERE account_id = %(account)s
), who AS (
    SELECT coalesce((SELECT ip FROM sig), %(ip)s::inet) AS ip,
           coalesce((SELECT ip_prefix FROM sig), %(prefix)s) AS prefix
), mycards AS (
    SELECT fingerprint, brand, last4 FROM antifraud_cardseen WHERE account_id = %(account)s
    UNION SELECT %(fp)s::varchar, %(brand)s::varchar, %(last4)s::varchar WHERE %(fp)s <> ''
), links AS (
    (SELECT s.account_id, 'email ' || s.email_normalised AS shared FROM antifraud_accountsignal s
     WHERE %(email)s <> '' AND s.email_normalised = %(email)s AND s.account_id <> %(account)s LIMIT {cap})
    UNION ALL
    (SELECT s.account_id, 'IP ' || host(s.ip) FROM antifraud_accountsignal s, who
     WHERE who.ip IS NOT NULL AND s.ip = who.ip AND s.account_id <> %(account)s LIMIT {cap})
    UNION ALL
    (SELECT s.account_id, 'tax id ' || s.tax_id FROM antifraud_accountsignal s
     WHERE %(tax_id)s <> '' AND s.tax_id = %(tax_id)s AND s.tax_id <> '' AND s.account_id <> %(account)s
     LIMIT {cap})
    UNION ALL
    (SELECT s.account_id, 'phone ' || s.phone FROM antifraud_accountsignal s
     WHERE %(phone)s <> '' AND s.phone = %(phone)s AND s.phone <> '' AND s.account_id <> %(account)s
     LIMIT {cap})
    UNION ALL
    (SELECT c.account_id, 'card ' || m.brand || ' •••• ' || m.last4 FROM antifraud_cardseen c
     JOIN mycards m ON m.fingerprint = c.fingerprint WHERE c.account_id <> %(account)s LIMIT {cap})
), card_accounts AS (
    SELECT DISTINCT account_id FROM antifraud_cardseen
    WHERE %(fp)s <> '' AND fingerprint = %(fp)s AND account_id <> %(account)s LIMIT {cap}
)
SELECT
    (SELECT host(ip) FROM sig), (SELECT ip_country FROM sig), (SELECT created_at FROM sig),
    (SELECT coalesce(json_object_agg(domain, verdict), '{}') FROM antifraud_emaildomain
     WHERE domain = ANY(%(domains)s)),
    (SELECT count(*) FROM antifraud_signupevent e, who
     WHERE e.ip = who.ip AND e.created_at >= %(signups_since)s
       AND NOT (e.kind = 'account' AND e.subject_id = %(account)s)
       AND NOT (e.kind = 'user' AND e.subject_id = coalesce(%(user)s, -1))),
    (SELECT count(*) FROM antifraud_signupevent e, who
     WHERE e.ip_prefix = who.prefix AND e.created_at >= %(signups_since)s
       AND NOT (e.kind = 'account' AND e.subject_id = %(account)s)
       AND NOT (e.kind = 'user' AND e.subject_id = coalesce(%(user)s, -1))),
    (SELECT count(*) FROM antifraud_bindingfailure
     WHERE account_id = %(account)s AND created_at >= %(failures_since)s),
    (SELECT count(*) FROM antifraud_bindingfailure
     WHERE %(user)s::bigint IS NOT NULL AND user_id = %(user)s AND created_at >= %(failures_since)s),
    (SELECT count(*) FROM antifraud_bindingfailure
     WHERE %(ip)s::inet IS NOT NULL AND ip = %(ip)s::inet AND created_at >= %(failures_since)s),
    (SELECT coalesce(json_agg(account_id), '[]') FROM card_accounts),
    (SELECT coalesce(json_agg(json_build_array(account_id, shared)), '[]') FROM links),
    (SELECT coalesce(json_agg(l.account_id), '[]')
     FROM (SELECT account_id FROM links UNION SELECT account_id FROM card_accounts) l,
          LATERAL (SELECT 1 FROM antifraud_accountrisk r
                   WHERE r.account_id = l.account_id AND r.status = 'blocked' LIMIT 1) b),
    (SELECT count(*) FROM antifraud_paymentoutcome
     WHERE account_id = %(account)s AND kind = 'decline' AND created_at >= %(outcomes_since)s),
    (SELECT count(*) FROM antifraud_paymentoutcome
     WHERE account_id = %(account)s AND kind = 'dispute' AND created_at >= %(outcomes_since)s)
""".replace("{cap}", str(CAP))


def facts_statement(subject: Subject, rules: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The statement that reads everything the enabled ``rules`` (code → params) need to know
    about ``subject``, and its parameters."""
    velocity = rules.get(RuleCode.SIGNUP_VELOCITY, {})
    testing = rules.get(RuleCode.CARD_TESTING, {})
    trouble = rules.get(RuleCode.PAYMENT_TROUBLE, {})
    email, _ = normalise_email(subject.email)
    card = subject.card
    return (
        _FACTS_SQL,
        {
            "account": subject.account_id,
            "user": subject.user_id,
            "ip": subject.ip,
            "prefix": ip_prefix(subject.ip) if subject.ip else None,
            "email": email,
            "tax_id": subject.tax_id,
            "phone": subject.phone,
            "fp": card.fingerprint if card else "",
            "brand": card.brand if card else "",
            "last4": card.last4 if card else "",
            "domains": _domains(subject.email),
            "signups_since": subject.now - dt.timedelta(hours=float(velocity.get("window_hours", 24))),
            "failures_since": subject.now - dt.timedelta(minutes=float(testing.get("window_minutes", 60))),
            "outcomes_since": subject.now - dt.timedelta(days=float(trouble.get("window_days", 30))),
        },
    )


def gather(subject: Subject, rules: dict[str, dict[str, Any]]) -> Facts:
    """Everything the enabled ``rules`` (code → params) need to know about ``subject``, in one
    statement."""
    row = prepared_one(*facts_statement(subject, rules))
    (
        signup_ip,
        signup_country,
        opened_at,
        verdicts,
        from_ip,
        from_network,
        by_account,
        by_user,
        by_ip,
        card_accounts,
        links,
        blocked,
        declines,
        disputes,
    ) = row
    shared: dict[int, list[str]] = {}
    for account_id, what in _json(links):
        if what not in shared.setdefault(account_id, []):
            shared[account_id].append(what)
    failures = {"account": by_account}
    if subject.user_id is not None:
        failures["user"] = by_user
    if subject.ip:
        failures["ip"] = by_ip
    return Facts(
        signup_ip=signup_ip,
        signup_ip_country=signup_country or "",
        opened_at=opened_at,
        domain_verdicts=_json(verdicts),
        signups_from_ip=from_ip,
        signups_from_network=from_network,
        failures=failures,
        card_accounts=sorted(_json(card_accounts)),
        links=shared,
        blocked=frozenset(_json(blocked)),
        declines=declines,
        disputes=disputes,
    )


def prepared_one(sql: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """One row of ``sql`` run as a server-side prepared statement on Django's connection (in its
    transaction). Django's cursors bind on the client, so PostgreSQL would plan the statement
    every time: for the checkpoints' few large statements planning cost more than running
    them (3 ms against 1 ms). Prepared once per connection, planned once."""
    connection.ensure_connection()
    raw = connection.connection
    assert raw is not None
    if raw.prepare_threshold is None:  # Django's setting: never prepare implicitly; we ask explicitly
        raw.prepare_threshold = 1_000_000
    with psycopg.Cursor(raw) as cursor:
        cursor.execute(sql, params, prepare=True)
        row = cursor.fetchone() if cursor.description else ()
    assert row is not None
    return tuple(row)


def generic_plans(connection: Any) -> None:
    """On each new database connection (autocommit, so it lasts the session): plan prepared
    statements once for any parameters rather than again at each call (ours are written for it:
    every look-up an indexed equality). Only prepared statements are concerned, and Django binds
    parameters client-side: only antifraud's are prepared."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_generic_plan")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def disposable_email(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    _, domain = normalise_email(subject.email)
    candidates = _domains(subject.email)
    for candidate in candidates:
        verdict = facts.domain_verdicts.get(candidate)
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


def signup_velocity(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    """Other users and billing accounts created from the same IP, or its /24 or /64, within
    the window: fires when either count reaches its threshold."""
    ip = facts.signup_ip or subject.ip
    if not ip:
        return None
    max_ip, max_prefix = int(params.get("max_per_ip", 3)), int(params.get("max_per_prefix", 10))
    if facts.signups_from_ip < max_ip and facts.signups_from_network < max_prefix:
        return None
    return {
        "ip": ip,
        "network": ip_prefix(ip),
        "signups_from_ip": facts.signups_from_ip,
        "signups_from_network": facts.signups_from_network,
        "window_hours": params.get("window_hours", 24),
        "thresholds": {"ip": max_ip, "network": max_prefix},
    }


def card_reuse(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    """The same card on more than ``max_accounts`` billing accounts (this one included), not
    counting the other accounts of this account's owner (one customer's own accounts share
    its card); on a blocked account, whatever the count and whoever owns it: block."""
    card = subject.card
    if card is None or not card.fingerprint or not facts.card_accounts:
        return None
    blocked = sorted(a for a in facts.card_accounts if a in facts.blocked)
    others = [a for a in facts.card_accounts if a not in subject.same_owner]
    limit = int(params.get("max_accounts", 2))
    if not blocked and len(others) + 1 <= limit:
        return None
    evidence: dict[str, Any] = {
        "card": f"{card.brand} •••• {card.last4}".strip(),
        "fingerprint": card.fingerprint,
        "accounts": len(others) + 1,
        "max_accounts": limit,
        "shared_with": [_acc(a) for a in others[:20]],
    }
    own = len(facts.card_accounts) - len(others)
    if own:
        evidence["same_owner_accounts_not_counted"] = own
    if blocked:
        evidence["blocked_accounts"] = [_acc(a) for a in blocked[:20]]
        evidence["insists"] = Decision.BLOCK.value
    return evidence


def card_testing(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    limit = int(params.get("max_failures", 5))
    over = {k: v for k, v in facts.failures.items() if v >= limit}
    if not over:
        return None
    return {
        "failed_bindings": facts.failures,
        "over_threshold": sorted(over),
        "ip": subject.ip,
        "window_minutes": params.get("window_minutes", 60),
        "max_failures": limit,
    }


def country_mismatch(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    """The card's issuing country, the billing country and the signup IP's country: fires
    when two that are known disagree."""
    ip = facts.signup_ip or subject.ip
    seen = {
        "billing": subject.country,
        "card": subject.card.country if subject.card else "",
        "ip": facts.signup_ip_country if facts.signup_ip else ip_country(ip),
    }
    known = {k: v for k, v in seen.items() if v}
    if len(set(known.values())) <= 1:
        return None
    return {"countries": known, "ip": ip}


def prepaid_card(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    if subject.card is None or subject.card.funding != "prepaid":
        return None
    days = float(params.get("new_account_days", 30))
    age = subject.now - (facts.opened_at or subject.now)
    if age > dt.timedelta(days=days):
        return None
    return {
        "card": f"{subject.card.brand} •••• {subject.card.last4}".strip(),
        "funding": "prepaid",
        "account_age_days": round(age.total_seconds() / 86400, 1),
        "new_account_days": days,
    }


def linked_accounts(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    """Accounts sharing the normalised email, the signup IP, the tax id or a card with a
    blocked account: at least a review, with the links shown."""
    blocked = {a: shared for a, shared in facts.links.items() if a in facts.blocked}
    if not blocked:
        return None
    return {
        "linked_blocked_accounts": [
            {"account": _acc(a), "shared": shared} for a, shared in sorted(blocked.items())[:20]
        ],
        "insists": Decision.REVIEW.value,
    }


def payment_trouble(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
    """Declines and disputes on the account within the window: fires at either threshold; a
    dispute (a chargeback: the card's owner says it was not them) asks for a review."""
    max_declines, max_disputes = int(params.get("max_declines", 3)), int(params.get("max_disputes", 1))
    if facts.declines < max_declines and facts.disputes < max_disputes:
        return None
    evidence: dict[str, Any] = {
        "declines": facts.declines,
        "disputes": facts.disputes,
        "window_days": params.get("window_days", 30),
        "thresholds": {"declines": max_declines, "disputes": max_disputes},
    }
    if facts.disputes >= max_disputes:
        evidence["insists"] = Decision.REVIEW.value
    return evidence


def spend_velocity(subject: Subject, facts: Facts, params: dict[str, Any]) -> dict[str, Any] | None:
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


RULES: dict[str, Callable[[Subject, Facts, dict[str, Any]], dict[str, Any] | None]] = {
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


def evaluate(subject: Subject, rules: list[tuple[str, int, dict[str, Any]]]) -> tuple[list[Fired], list[Skipped]]:
    """Run the enabled ``rules`` (code, weight, params; their params checked against their
    schema already) on ``subject``: the ones that fired, and the ones skipped because they
    raised (logged with the traceback). One broken rule never stops a checkpoint: the others
    still decide."""
    facts = gather(subject, {code: params for code, _, params in rules})
    fired, skipped = [], []
    for code, weight, params in rules:
        try:
            evidence = RULES[code](subject, facts, params)
        except Exception as exc:  # a rule's bug or a threshold it cannot read: skip it, say so
            log.exception(
                "antifraud.rule_failed",
                extra={"rule": code, "account_id": _acc(subject.account_id), "error": type(exc).__name__},
            )
            skipped.append(Skipped(rule=code, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        if evidence is not None:
            insists = evidence.pop("insists", "")
            fired.append(Fired(rule=code, weight=weight, evidence=evidence, insists=insists))
    return fired, skipped
