"""Antifraud's checkpoints: each records what it saw, runs the enabled rules, stores a
``RiskAssessment`` (score, decision, fired rules with evidence, rules version) and moves the
account's standing with the fraud team (``AccountRisk``). A block reaches the account through
the accounts service, queued through the outbox in the assessment's transaction.

Evaluation reads the database only (antifraud's own tables and the accounts app's selectors):
no network call in the request path."""

from __future__ import annotations

import datetime as dt
import json
import logging
import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts import selectors as account_selectors
from accounts import services as account_services
from antifraud import rule_params, rules
from antifraud.models import (
    AccountRisk,
    AccountSignal,
    BindingFailure,
    CardSeen,
    Checkpoint,
    Decision,
    OutcomeKind,
    PaymentOutcome,
    ReviewAction,
    ReviewDecision,
    RiskAssessment,
    RiskRule,
    RiskSettings,
    RiskStatus,
    RuleCode,
    RulesVersion,
    SignupEvent,
    SignupKind,
)
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.transitions import actor_log_fields
from billing_site.outbox import services as outbox

log = logging.getLogger(__name__)

SYSTEM = Actor.system("antifraud")

Card = rules.Card


# --- Rules as data


def _settings() -> RiskSettings:
    found = RiskSettings.objects.filter(id=1).first()
    return found if found is not None else RiskSettings(id=1)


# The rules in force, read at most every RULES_TTL seconds per process (and at once after a
# change made in this process): evaluation does not pay two queries for what rarely changes.
# A rule whose stored parameters fail its schema (written past the service, by SQL or an older
# release) is not evaluated: it is skipped, recorded on every assessment and logged as an error.
RULES_TTL = 10.0
# [loaded at (monotonic), settings, [(code, weight, params)], [Skipped]]
_rules_cache: list[Any] = []


def _rules_config() -> tuple[RiskSettings, list[tuple[str, int, dict[str, Any]]], list[rules.Skipped]]:
    if not _rules_cache or time.monotonic() - _rules_cache[0] > RULES_TTL:
        enabled, invalid = [], []
        for rule in RiskRule.objects.filter(enabled=True).order_by("code"):
            errors = rule_params.params_errors(rule.code, rule.params)
            if errors:
                invalid.append(
                    rules.Skipped(rule=rule.code, error=f"invalid parameters: {rule_params.describe(errors)}")
                )
                log.error("antifraud.rule_invalid", extra={"rule": rule.code, "params": sorted(errors)})
            else:
                enabled.append((rule.code, rule.weight, rule.params))
        _rules_cache[:] = [time.monotonic(), _settings(), enabled, invalid]
    return _rules_cache[1], _rules_cache[2], _rules_cache[3]


def rules_cache_clear() -> None:
    _rules_cache.clear()


def rules_snapshot() -> dict[str, Any]:
    settings = _settings()
    return {
        "review_score": settings.review_score,
        "block_score": settings.block_score,
        "rules": {
            r.code: {"enabled": r.enabled, "weight": r.weight, "params": r.params}
            for r in RiskRule.objects.order_by("code")
        },
    }


@transaction.atomic
def rules_changed(*, actor: Actor, changes: dict[str, Any] | None = None) -> int:
    """A rule or a band changed: the next version, with what it now means and what changed
    (the audit row: who, when, what → [before, after]). Returns it."""
    settings = RiskSettings.objects.select_for_update().filter(id=1).first() or RiskSettings.objects.create(id=1)
    settings.version += 1
    settings.save(update_fields=["version", "updated_at"])
    RulesVersion.objects.create(
        version=settings.version,
        snapshot=rules_snapshot(),
        changes=changes or {},
        created_by=actor.name,
        created_by_user_id=actor.user_id,
    )
    transaction.on_commit(rules_cache_clear)
    rules_cache_clear()
    log.info(
        "antifraud.rules_changed",
        extra={"version": settings.version, "changed": sorted(changes or {}), **actor_log_fields(actor)},
    )
    return settings.version


def rule_params_check(*, code: str, params: Any) -> None:
    """Refuse ``params`` that the rule ``code`` cannot read: 400 ``invalid_params`` naming each
    bad parameter (``params.<name>``)."""
    errors = rule_params.params_errors(code, params)
    if errors:
        raise ApplicationError(
            "invalid_params",
            f"Invalid parameters for {code}: {rule_params.describe(errors)}.",
            errors=[
                {"field": "params" if name == "params" else f"params.{name}", "code": "invalid_params", "message": m}
                for name, m in errors.items()
            ],
        )


@audited
@transaction.atomic
def risk_rule_update(
    *, code: str, actor: Actor, enabled: bool | None = None, weight: int | None = None, params: Any = None
) -> int:
    """Change a rule's switch, weight or parameters (``None``: left as it is), the parameters
    checked against the rule's schema; a new rules version is the audit row. Returns the
    version in force (unchanged when nothing changed). Runs in the caller's transaction when
    there is one (the admin's change form has one)."""
    rule = RiskRule.objects.select_for_update().filter(code=code).first()
    if rule is None:
        raise NotFound(f"No rule {code!r}.")
    if params is not None:
        rule_params_check(code=code, params=params)
    if weight is not None and not 0 <= weight <= 1000:
        raise ApplicationError("invalid", "A weight is between 0 and 1000.", field="weight")
    changes: dict[str, Any] = {}
    for name, value in (("enabled", enabled), ("weight", weight), ("params", params)):
        if value is not None and getattr(rule, name) != value:
            changes[f"{code}.{name}"] = [getattr(rule, name), value]
            setattr(rule, name, value)
    if not changes:
        return _settings().version
    rule.save(update_fields=["enabled", "weight", "params", "updated_at"])
    return rules_changed(actor=actor, changes=changes)


@audited
@transaction.atomic
def risk_settings_update(*, actor: Actor, review_score: int, block_score: int) -> int:
    """Change the score bands (review from, block from; block above review); a new rules
    version is the audit row. Returns the version in force."""
    if not 0 < review_score < block_score:
        raise ApplicationError(
            "invalid_bands", "The block score must be above the review score, and both above 0.", field="block_score"
        )
    settings = RiskSettings.objects.select_for_update().filter(id=1).first() or RiskSettings.objects.create(id=1)
    changes = {
        name: [getattr(settings, name), value]
        for name, value in (("review_score", review_score), ("block_score", block_score))
        if getattr(settings, name) != value
    }
    if not changes:
        return settings.version
    settings.review_score, settings.block_score = review_score, block_score
    settings.save(update_fields=["review_score", "block_score", "updated_at"])
    return rules_changed(actor=actor, changes=changes)


# --- Signals the checkpoints keep


def _client_ip(ip: str | None) -> str | None:
    if not ip:
        return None
    try:
        rules.ip_prefix(ip)
    except ValueError:
        return None
    return ip


def user_signup_record(*, user_id: int, ip: str | None) -> None:
    """A user signed up from ``ip`` (signup velocity counts users too)."""
    ip = _client_ip(ip)
    if ip is None:
        return
    SignupEvent.objects.bulk_create(
        [SignupEvent(kind=SignupKind.USER, subject_id=user_id, ip=ip, ip_prefix=rules.ip_prefix(ip))],
        ignore_conflicts=True,
    )


def binding_failure_record(*, account_id: int, user_id: int | None, ip: str | None, code: str) -> Outcome:
    """A card binding was declined: counted for card testing, and the account assessed again
    (many failures in a short time review or block it)."""
    BindingFailure.objects.create(account_id=account_id, user_id=user_id, ip=_client_ip(ip), code=code[:64])
    with transaction.atomic():
        return _assess(Checkpoint.CARD_BINDING, _subject(account_id, user_id=user_id, ip=ip))


# --- Checkpoints


def _subject(
    account_id: int,
    *,
    user_id: int | None,
    ip: str | None,
    card: rules.Card | None = None,
    spend: rules.Spend | None = None,
) -> rules.Subject:
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None:
        raise NotFound("No such billing account.")
    return rules.Subject(
        account_id=account_id,
        email=profile.email,
        country=profile.country,
        tax_id=profile.tax_id,
        phone=profile.phone,
        user_id=user_id,
        ip=_client_ip(ip),
        card=card,
        spend=spend,
        same_owner=account_selectors.billing_account_ids_same_owner(account_id=account_id) if card else frozenset(),
        now=timezone.now(),
    )


def _standings(account_ids: set[int]) -> dict[int, str]:
    return {a: s.state for a, s in account_selectors.billing_account_standings(account_ids).items()}


def _decide(fired: list[rules.Fired], settings: RiskSettings) -> tuple[int, str]:
    score = sum(f.weight for f in fired)
    decision = Decision.ALLOW
    if score >= settings.block_score:
        decision = Decision.BLOCK
    elif score >= settings.review_score:
        decision = Decision.REVIEW
    insisted = {f.insists for f in fired}
    if Decision.BLOCK in insisted:
        decision = Decision.BLOCK
    elif Decision.REVIEW in insisted and decision == Decision.ALLOW:
        decision = Decision.REVIEW
    return score, decision.value


_RECORD_SQL = """
WITH card AS (  -- the card being bound, if any: kept once per account (the facts read it from the subject)
    INSERT INTO antifraud_cardseen (account_id, fingerprint, brand, last4, country, funding, first_seen_at)
    SELECT %(account)s, %(fp)s, %(brand)s, %(last4)s, %(card_country)s, %(funding)s, %(now)s
    WHERE %(fp)s::varchar <> ''
    ON CONFLICT (account_id, fingerprint) DO NOTHING
), assessment AS (
    INSERT INTO antifraud_riskassessment (account_id, checkpoint, score, decision, fired, skipped, rules_version,
                                          created_at)
    VALUES (%(account)s, %(checkpoint)s, %(score)s, %(decision)s, %(fired)s, %(skipped)s, %(version)s, %(now)s)
    RETURNING id
)
INSERT INTO antifraud_accountrisk AS r (account_id, status, score, last_assessment_id, flagged_at, updated_at)
SELECT %(account)s::bigint, %(status)s::varchar, %(score)s::integer, assessment.id,
       CASE WHEN %(status)s::varchar = 'review' THEN %(now)s::timestamptz END, %(now)s::timestamptz
FROM assessment
ON CONFLICT (account_id) DO UPDATE SET
    status = CASE WHEN EXCLUDED.status = 'blocked' THEN 'blocked'
                  WHEN EXCLUDED.status = 'review' AND r.status IN ('clear', 'approved') THEN 'review'
                  ELSE r.status END,
    flagged_at = CASE WHEN EXCLUDED.status = 'review' AND r.status IN ('clear', 'approved') THEN %(now)s
                      ELSE r.flagged_at END,
    score = EXCLUDED.score,
    last_assessment_id = EXCLUDED.last_assessment_id,
    updated_at = EXCLUDED.updated_at
RETURNING last_assessment_id, status
"""
_STATUS_OF = {Decision.ALLOW: RiskStatus.CLEAR, Decision.REVIEW: RiskStatus.REVIEW, Decision.BLOCK: RiskStatus.BLOCKED}


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: str  # allow | review | block
    assessment: RiskAssessment
    standing: str = RiskStatus.CLEAR.value  # the account's standing after it


def _assess(checkpoint: str, subject: rules.Subject) -> Outcome:
    """Evaluate (one read), store the assessment, move the account's standing and keep the card
    being bound (one write), in the caller's transaction; a block is queued for the account
    through the outbox."""
    settings, enabled, invalid = _rules_config()
    fired, failed = rules.evaluate(subject, enabled)
    skipped = invalid + failed
    score, decision = _decide(fired, settings)
    after_approval = _after_approval(subject.account_id, fired, score, decision)
    if after_approval is not None:  # an analyst cleared this account: see _after_approval
        decision = after_approval
    assessment = RiskAssessment(
        account_id=subject.account_id,
        checkpoint=checkpoint,
        score=score,
        decision=decision,
        fired=[f.as_json() for f in fired],
        skipped=[s.as_json() for s in skipped],
        rules_version=settings.version,
        created_at=subject.now,
    )
    assessment.id, standing = rules.prepared_one(
        _RECORD_SQL,
        {
            "account": subject.account_id,
            "checkpoint": checkpoint,
            "score": score,
            "decision": decision,
            "fired": json.dumps(assessment.fired),
            "skipped": json.dumps(assessment.skipped),
            "version": settings.version,
            "now": subject.now,
            "status": _STATUS_OF[Decision(decision)].value,
            "fp": card.fingerprint if (card := subject.card) else "",
            "brand": card.brand if card else "",
            "last4": card.last4 if card else "",
            "card_country": card.country if card else "",
            "funding": card.funding if card else "",
        },
    )
    if decision == Decision.BLOCK:  # idempotent: an account blocked already is left alone
        outbox.enqueue_task(
            "antifraud.account_block",
            account_id=subject.account_id,
            assessment_id=assessment.id,
            dedupe_key=f"antifraud:block:{assessment.id}",
        )
    elif decision == Decision.REVIEW and checkpoint != Checkpoint.SIGNUP:
        # An active account in review spends under a cap (a pending one stays pending).
        outbox.enqueue_task(
            "antifraud.spending_cap", account_id=subject.account_id, dedupe_key=f"antifraud:cap:{assessment.id}"
        )
    log.info(
        "antifraud.assessed",
        extra={
            "account_id": ids.encode("acc", subject.account_id),
            "assessment_id": assessment.id,
            "checkpoint": checkpoint,
            "score": score,
            "decision": decision,
            "rules": [f.rule for f in fired],
            "skipped": [s.rule for s in skipped],
            "rules_version": settings.version,
            "standing": standing,
            "after_approval": after_approval,
        },
    )
    return Outcome(decision=decision, assessment=assessment, standing=standing)


def _after_approval(account_id: int, fired: list[rules.Fired], score: int, decision: str) -> str | None:
    """What an analyst's approval makes of a review or a block, or None (it changes nothing).
    Automation never overrules a person: on an account whose standing is an approval, what the
    analyst saw (no rule beyond the ones fired in the assessment they approved, and a score no
    higher) stays cleared (``allow``); anything more goes back to them (``review``), never to a
    block by score. A rule that insists on a block (a card of a blocked account) still blocks."""
    if decision == Decision.ALLOW or any(f.insists == Decision.BLOCK for f in fired):
        return None
    if not AccountRisk.objects.filter(account_id=account_id, status=RiskStatus.APPROVED).exists():
        return None
    approval = (
        ReviewDecision.objects.filter(account_id=account_id, action=ReviewAction.APPROVE)
        .select_related("assessment")
        .order_by("-created_at", "-id")
        .first()
    )
    seen = approval.assessment if approval is not None else None
    if seen is not None and {f.rule for f in fired} <= {f["rule"] for f in seen.fired} and score <= seen.score:
        return Decision.ALLOW.value
    return Decision.REVIEW.value


_SIGNAL_SQL = """
WITH signal AS (
    INSERT INTO antifraud_accountsignal (account_id, user_id, ip, ip_prefix, ip_country, email_normalised,
                                         email_domain, tax_id, phone, country, created_at)
    VALUES (%(account)s, %(user)s, %(ip)s, %(prefix)s, %(country_of_ip)s, %(email)s, %(domain)s, %(tax_id)s, %(phone)s,
            %(country)s, %(now)s)
    ON CONFLICT (account_id) DO NOTHING
)
INSERT INTO antifraud_signupevent (kind, subject_id, ip, ip_prefix, created_at)
SELECT 'account', %(account)s, %(ip)s, %(prefix)s, %(now)s WHERE %(ip)s::inet IS NOT NULL
ON CONFLICT (kind, subject_id) DO NOTHING
"""


def signup_assess(*, account_id: int, user_id: int | None, ip: str | None) -> Outcome:
    """Checkpoint 1, a billing account opened: keep its identity signals (as first seen),
    assess it. Before the account can be activated: a review keeps it pending, a block blocks
    it."""
    subject = _subject(account_id, user_id=user_id, ip=ip)
    email, domain = rules.normalise_email(subject.email)
    with transaction.atomic():
        rules.prepared_one(
            _SIGNAL_SQL,
            {
                "account": account_id,
                "user": user_id,
                "ip": subject.ip,
                "prefix": rules.ip_prefix(subject.ip) if subject.ip else "",
                "country_of_ip": rules.ip_country(subject.ip),
                "email": email,
                "domain": domain,
                "tax_id": subject.tax_id,
                "phone": subject.phone,
                "country": subject.country,
                "now": subject.now,
            },
        )
        outcome = _assess(Checkpoint.SIGNUP, subject)
        # Delivered by the outbox's drain (every 15 s), not after this commit: the signup request
        # does not wait for it, and a pending account spends nothing meanwhile.
        outbox.enqueue_task(
            "antifraud.credit_limit_initial",
            account_id=account_id,
            dedupe_key=f"credit-limit:{account_id}",
            prompt=False,
        )
        return outcome


def card_binding_assess(*, account_id: int, user_id: int | None, ip: str | None, card: rules.Card) -> Outcome:
    """Checkpoint 2, a card bound (in the binding's transaction): assess the account with the
    card, and keep its fingerprint (with the assessment). The decision says whether the card may
    activate a pending account: ``allow`` only when this assessment allows and no review is open
    on the account."""
    outcome = _assess(Checkpoint.CARD_BINDING, _subject(account_id, user_id=user_id, ip=ip, card=card))
    decision = outcome.decision
    if decision == Decision.ALLOW and outcome.standing == RiskStatus.REVIEW:
        decision = Decision.REVIEW.value
    elif outcome.standing == RiskStatus.BLOCKED:
        decision = Decision.BLOCK.value
    return Outcome(decision=decision, assessment=outcome.assessment, standing=outcome.standing)


def payment_outcome_record(
    *, account_id: int, kind: str, reference: str, code: str = "", amount_minor: int = 0, currency: str = ""
) -> Outcome | None:
    """Checkpoint 3, a payment outcome (a decline, a dispute opened, a refund), in the caller's
    transaction: kept once per reference, and the account assessed again. None: recorded before."""
    if kind not in OutcomeKind.values:
        raise ValueError(f"unknown payment outcome {kind!r}")
    try:
        with transaction.atomic():  # a savepoint: the unique (kind, reference) decides
            PaymentOutcome.objects.create(
                account_id=account_id,
                kind=kind,
                reference=reference[:32],
                code=code[:64],
                amount_minor=amount_minor,
                currency=currency,
            )
    except IntegrityError:
        return None
    return _assess(Checkpoint.PAYMENT, _subject(account_id, user_id=None, ip=None))


def usage_sweep(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Checkpoint 4, from the rated rollups (a beat task in the ``antifraud`` queue): every
    account opened within the spend-velocity rule's ``new_account_days`` is measured in two
    set-based reads of the hourly rollup (its first 24 hours, and since signup), against its
    credit limit and the typical new account of its currency; those the rule would flag are
    assessed, each at most once a day."""
    from metering import selectors as metering_selectors

    now = now or timezone.now()
    rule = RiskRule.objects.filter(code=RuleCode.SPEND_VELOCITY, enabled=True).first()
    if rule is None:
        log.info("antifraud.usage_sweep", extra={"accounts": 0, "assessed": 0, "rule": "disabled"})
        return {"accounts": 0, "assessed": 0}
    params = rule.params
    errors = rule_params.params_errors(rule.code, params)
    if errors:  # written past the service: the sweep cannot read its thresholds; someone must look
        log.error(
            "antifraud.usage_sweep", extra={"accounts": 0, "assessed": 0, "rule": "invalid", "params": sorted(errors)}
        )
        return {"accounts": 0, "assessed": 0}
    since = now - dt.timedelta(days=float(params.get("new_account_days", 7)))
    opened = dict(AccountSignal.objects.filter(created_at__gte=since).values_list("account_id", "created_at"))
    windows = [
        metering_selectors.AmountWindow(
            key=account_id, account_id=account_id, sku_prefix="", start=at, end=min(at + dt.timedelta(hours=24), now)
        )
        for account_id, at in opened.items()
    ]
    first_day = metering_selectors.hourly_spend(windows)
    total = metering_selectors.hourly_spend(
        [
            metering_selectors.AmountWindow(key=w.key, account_id=w.account_id, sku_prefix="", start=w.start, end=now)
            for w in windows
        ]
    )
    gpu_prefix = str(params.get("gpu_sku_prefix", "compute.gpu."))
    first_amount: dict[int, Decimal] = {}
    gpu_hours: dict[int, Decimal] = {}
    for (account_id, sku), (quantity, amount) in first_day.items():
        first_amount[account_id] = first_amount.get(account_id, Decimal(0)) + amount
        if sku.startswith(gpu_prefix):
            gpu_hours[account_id] = gpu_hours.get(account_id, Decimal(0)) + quantity
    spent: dict[int, Decimal] = {}
    for (account_id, _sku), (_quantity, amount) in total.items():
        spent[account_id] = spent.get(account_id, Decimal(0)) + amount
    limits = account_selectors.credit_limits(account_ids=list(spent))
    by_currency: dict[str, list[Decimal]] = {}
    for account_id, amount in spent.items():
        if account_id in limits and amount > 0:
            by_currency.setdefault(limits[account_id][1], []).append(amount)
    typical = {currency: statistics.median(amounts) for currency, amounts in by_currency.items()}
    recent = set(
        RiskAssessment.objects.filter(
            checkpoint=Checkpoint.USAGE, created_at__gte=now - dt.timedelta(hours=24), account_id__in=list(spent)
        ).values_list("account_id", flat=True)
    )
    assessed = 0
    for account_id, amount in sorted(spent.items()):
        if account_id in recent or account_id not in limits:
            continue
        limit, currency = limits[account_id]
        spend = rules.Spend(
            currency=currency,
            first_day_amount=first_amount.get(account_id, Decimal(0)),
            first_day_gpu_hours=gpu_hours.get(account_id, Decimal(0)),
            since_signup_amount=amount,
            typical_amount=typical.get(currency, Decimal(0)),
            credit_limit=limit,
        )
        probe = rules.Subject(account_id=account_id, email="", country="", tax_id="", spend=spend, now=now)
        if rules.spend_velocity(probe, rules.Facts(), params) is None:
            continue
        with transaction.atomic():
            _assess(Checkpoint.USAGE, _subject(account_id, user_id=None, ip=None, spend=spend))
        assessed += 1
    log.info("antifraud.usage_sweep", extra={"accounts": len(spent), "assessed": assessed})
    return {"accounts": len(spent), "assessed": assessed}


def account_standing(*, account_id: int) -> str:
    found = AccountRisk.objects.filter(account_id=account_id).values_list("status", flat=True).first()
    return found or RiskStatus.CLEAR.value


# --- The review queue: an analyst's decisions (audited)


def _review_record(account_id: int, action: str, *, actor: Actor, reason: str) -> AccountRisk:
    reason = reason.strip()
    if not reason:
        raise ApplicationError("reason_required", "A reason is required.", field="reason")
    risk, _ = AccountRisk.objects.select_for_update().get_or_create(account_id=account_id)
    ReviewDecision.objects.create(
        account_id=account_id,
        action=action,
        reason=reason,
        assessment=risk.last_assessment,
        analyst_user_id=actor.user_id,
        analyst_name=actor.name,
    )
    log.info(
        "antifraud.review",
        extra={"account_id": ids.encode("acc", account_id), "action": action, **actor_log_fields(actor)},
    )
    return risk


def unblock_target(*, account_id: int) -> str | None:
    """Where approving this account takes it, if it is blocked: back to the state it had before
    its block (``active``; ``pending``, or ``active`` when a card is bound, as approving a pending
    account activates it). None: it is not blocked. An account blocked while suspended for an
    unpaid balance cannot go back there by an unblock (only to active or pending), so approving
    it is refused (409 ``blocked_while_suspended``): its debt is finance's to settle first."""
    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    if standing is None or standing.state != "blocked":
        return None
    block = (
        account_selectors.billing_account_history(account_id=account_id)
        .filter(to_state="blocked")
        .order_by("-created_at", "-id")
        .first()
    )
    before = block.from_state if block is not None else "pending"
    if before == "suspended":
        raise Conflict(
            "blocked_while_suspended",
            "The account was suspended for an unpaid balance when it was blocked; approving it cannot unblock it "
            "to active. Unblock it from the billing account's page once its debt is settled.",
        )
    if before == "active" or CardSeen.objects.filter(account_id=account_id).exists():
        return "active"
    return "pending"


@audited
@transaction.atomic(durable=True)
def review_approve(*, account_id: int, actor: Actor, reason: str) -> AccountRisk:
    """The analyst finds the account fine: out of review, a spending cap lifted (through the
    outbox); a pending account with a card bound is activated, and a blocked one is unblocked
    (``unblock_target``), both by the analyst, through the outbox. Later assessments may raise
    it again."""
    target = unblock_target(account_id=account_id)  # refuses before anything is written
    risk = _review_record(account_id, ReviewAction.APPROVE, actor=actor, reason=reason)
    risk.status = RiskStatus.APPROVED
    risk.save(update_fields=["status", "updated_at"])
    if risk.spending_cap is not None:
        outbox.enqueue_task("antifraud.spending_cap_lift", account_id=account_id)
    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    transition = ""
    if target is not None:
        transition = "unblock"
    elif (
        standing is not None and standing.state == "pending" and CardSeen.objects.filter(account_id=account_id).exists()
    ):
        transition = "activate"
    if transition:
        outbox.enqueue_task(
            "antifraud.account_transition",
            account_id=account_id,
            transition=transition,
            to_state=target,
            reason=f"approved by an analyst: {reason.strip()}"[:500],
            actor_user_id=actor.user_id,
            actor_name=actor.name,
        )
    return risk


@audited
@transaction.atomic(durable=True)
def review_block(*, account_id: int, actor: Actor, reason: str) -> AccountRisk:
    """The analyst blocks the account (through the accounts service, via the outbox)."""
    risk = _review_record(account_id, ReviewAction.BLOCK, actor=actor, reason=reason)
    risk.status = RiskStatus.BLOCKED
    risk.save(update_fields=["status", "updated_at"])
    outbox.enqueue_task(
        "antifraud.account_transition",
        account_id=account_id,
        transition="block",
        reason=f"blocked by an analyst: {reason.strip()}"[:500],
        actor_user_id=actor.user_id,
        actor_name=actor.name,
    )
    return risk


@audited
@transaction.atomic(durable=True)
def review_request_info(*, account_id: int, actor: Actor, message: str) -> AccountRisk:
    """Ask the customer for more information (an email to the account's address); the account
    stays in review."""
    risk = _review_record(account_id, ReviewAction.REQUEST_INFO, actor=actor, reason=message)
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None or not profile.email:
        raise ApplicationError("no_email", "The account has no email address to write to.")
    outbox.enqueue_email(
        "antifraud/email/request_info",
        to=profile.email,
        account_id=account_id,
        context={"account_name": profile.name, "account_id": profile.public_id, "message": message.strip()},
    )
    return risk


# --- Decisions reaching the account (outbox tasks)


def account_blocked(*, account_id: int) -> int:
    """The accounts service blocked ``account_id`` (antifraud's decision or an operator's):
    antifraud records it (its rules read blocks from ``AccountRisk``) and assesses the accounts
    linked to it again. Returns how many were."""
    AccountRisk.objects.update_or_create(account_id=account_id, defaults={"status": RiskStatus.BLOCKED})
    return linked_accounts_reassess(account_id=account_id)


def account_unblocked(*, account_id: int) -> None:
    """An operator unblocked the account: it is cleared (later assessments may flag it again)."""
    AccountRisk.objects.filter(account_id=account_id, status=RiskStatus.BLOCKED).update(
        status=RiskStatus.APPROVED, updated_at=timezone.now()
    )


# A block re-assesses at most this many linked accounts, the newest first (a ring is recent;
# an IP behind a carrier's NAT may be shared by tens of thousands of old accounts, and one task
# assessing them all would outrun its time limit and be retried forever).
REASSESS_CAP = 1000


def linked_accounts_reassess(*, account_id: int) -> int:
    """``account_id`` was blocked: the accounts sharing its normalised email, signup IP, tax id,
    phone or a card are assessed again, the newest ``REASSESS_CAP`` of them (the linked-accounts
    rule raises each for review, with the link shown). Returns how many were assessed."""
    signal = AccountSignal.objects.filter(account_id=account_id).first()
    match = Q(pk__in=[])
    if signal is not None:
        if signal.email_normalised:
            match |= Q(email_normalised=signal.email_normalised)
        if signal.ip:
            match |= Q(ip=signal.ip)
        if signal.tax_id:
            match |= Q(tax_id=signal.tax_id)
        if signal.phone:
            match |= Q(phone=signal.phone)
    read = 2 * REASSESS_CAP  # the newest from each source, with room for blocked and closed ones
    seen: dict[int, dt.datetime] = {}  # each linked account, when it was last seen sharing
    fingerprints = CardSeen.objects.filter(account_id=account_id).values_list("fingerprint", flat=True)
    for other, at in [
        *AccountSignal.objects.filter(match)
        .exclude(account_id=account_id)
        .order_by("-created_at")
        .values_list("account_id", "created_at")[:read],
        *CardSeen.objects.filter(fingerprint__in=fingerprints)
        .exclude(account_id=account_id)
        .order_by("-first_seen_at")
        .values_list("account_id", "first_seen_at")[:read],
    ]:
        seen[other] = max(at, seen.get(other, at))
    states = _standings(set(seen))
    eligible = sorted(
        (a for a in seen if states.get(a) not in (None, "blocked", "closed")), key=lambda a: seen[a], reverse=True
    )
    for other in eligible[:REASSESS_CAP]:
        with transaction.atomic():
            _assess(Checkpoint.LINKED, _subject(other, user_id=None, ip=None))
    assessed = min(len(eligible), REASSESS_CAP)
    log.info(
        "antifraud.linked_reassessed",
        extra={
            "account_id": ids.encode("acc", account_id),
            "assessed": assessed,
            "left_out": len(eligible) - assessed,  # at least: only the newest were read
        },
    )
    return assessed


def account_block(*, account_id: int, assessment_id: int) -> bool:
    """Block the account for a risk assessment (idempotent: an account already blocked, or
    closed, is left alone)."""
    assessment = RiskAssessment.objects.filter(id=assessment_id).first()
    rules_fired = ", ".join(f["rule"] for f in assessment.fired) if assessment else ""
    reason = f"risk assessment {assessment_id} ({assessment.checkpoint if assessment else '?'}): {rules_fired}"
    return account_transition(account_id=account_id, transition="block", reason=reason[:500])


def account_transition(
    *,
    account_id: int,
    transition: str,
    reason: str,
    to_state: str | None = None,
    actor_user_id: int | None = None,
    actor_name: str = "",
) -> bool:
    """An analyst's decision reaching the account, as that analyst (an operator) when queued
    with ``actor_user_id``, else as antifraud (idempotent: a transition no longer allowed from
    the account's state is left alone)."""
    if transition not in ("activate", "block", "unblock"):
        raise ValueError(f"antifraud does not {transition} accounts")
    actor = Actor.operator(actor_user_id, actor_name) if actor_user_id is not None else SYSTEM
    try:
        account_services.billing_account_transition(
            account_id=account_id, transition=transition, actor=actor, reason=reason, to_state=to_state
        )
    except (Conflict, NotFound):
        return False
    return True
