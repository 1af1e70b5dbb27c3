"""Credit limits, antifraud's bound on what its rules do not catch: a new account's limit from
its policy (``CreditLimitPolicy``: the most specific active one for the account's currency, kind
and country), limits raised after invoices paid on time, and the review cap (an active account
raised for review spends under its policy's new-account limit, never below what it has already
spent, until an analyst decides; approval gives the old limit back).

Each runs as an outbox or beat task (``antifraud.credit_limit_initial``,
``antifraud.spending_cap``, ``antifraud.spending_cap_lift``, ``antifraud.credit_limits_review``)
and writes the limit through the accounts service, with the limit it expects to find (a policy
never overwrites a limit someone changed meanwhile). Threshold billing against the limits is
invoicing's."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import ROUND_CEILING, ROUND_DOWN, Decimal

from django.db import transaction

from accounts import selectors as account_selectors
from accounts import services as account_services
from antifraud.models import AccountRisk, CreditLimitPolicy, RiskStatus
from billing_site.common import ids, money

log = logging.getLogger(__name__)


def credit_policy_for(*, currency: str, kind: str, country: str) -> CreditLimitPolicy | None:
    """The most specific active policy of the currency: kind and country, country, kind, any."""
    candidates = CreditLimitPolicy.objects.filter(
        is_active=True, currency=currency, account_kind__in=[kind, ""], country__in=[country, ""]
    )
    ranked = sorted(candidates, key=lambda p: (p.country == "", p.account_kind == ""))
    return ranked[0] if ranked else None


def credit_limit_initial(*, account_id: int) -> Decimal | None:
    """A new account's credit limit from its policy, unless one is set already (an analyst's
    is never overwritten: the limit changes only if it still is 0). Returns the limit set."""
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if profile is None:
        return None
    policy = credit_policy_for(currency=profile.currency, kind=profile.kind, country=profile.country)
    if policy is None:
        return None
    account = account_services.billing_account_update(
        account_id=account_id, changes={}, credit_limit=policy.initial_limit, credit_limit_was=Decimal(0)
    )
    log.info(
        "antifraud.credit_limit",
        extra={
            "account_id": ids.encode("acc", account_id),
            "policy": policy.name,
            "limit": str(account.credit_limit),
            "currency": profile.currency,
            "reason": "initial",
        },
    )
    return account.credit_limit


def _exposure(account_id: int, currency: str) -> Decimal | None:
    """What an active account has already spent against its credit limit, as threshold billing
    counts it (usage not invoiced yet plus what its issued invoices still owe), rounded up to
    the currency's minor unit. None when it cannot be read (invoicing reads only accounts with
    a limit set)."""
    from invoicing import selectors as invoicing_selectors

    found = invoicing_selectors.credit_exposures(account_ids=[account_id], over_limit_only=False)
    if not found:
        return None
    return found[0].exposure.quantize(Decimal(1).scaleb(-money.exponent(currency)), rounding=ROUND_CEILING)


def spending_cap(*, account_id: int) -> Decimal | None:
    """An active account raised for review: its credit limit lowered to the new-account limit
    of its policy (the cap), the limit it had kept to give back on approval. Threshold billing
    then charges it early, or suspends it, once its exposure passes the cap. Idempotent: a
    capped account, one out of review, a pending or blocked one, or one whose limit is
    already under the cap is left as it is. Returns the cap set.

    A cap is never set below what the account has already spent (its exposure): that would
    invoice and charge everything at once, and suspend the account if the charge failed, for a
    review that has decided nothing yet. The cap is then held at the spend (no further credit
    until an analyst decides), which the log line (``held_at_spend``) and the review page say."""
    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if standing is None or standing.state != "active" or profile is None:
        return None
    policy = credit_policy_for(currency=profile.currency, kind=profile.kind, country=profile.country)
    if policy is None:
        log.warning("antifraud.spending_cap_skipped", extra={"account_id": ids.encode("acc", account_id)})
        return None
    current = account_selectors.credit_limits(account_ids=[account_id])[account_id][0]
    spent = _exposure(account_id, profile.currency) if current > 0 else None
    cap = max(policy.initial_limit, spent or Decimal(0))
    if 0 < current <= cap:
        return None  # nothing to lower: under the cap, or already spent its whole limit
    with transaction.atomic(durable=True):
        if not AccountRisk.objects.filter(
            account_id=account_id, status=RiskStatus.REVIEW, spending_cap__isnull=True
        ).update(spending_cap=cap, capped_from=current):
            return None
    account = account_services.billing_account_update(
        account_id=account_id, changes={}, credit_limit=cap, credit_limit_was=current
    )
    if current == 0:  # no limit before: what it spent can be read only now that it has one
        spent = _exposure(account_id, profile.currency)
        if spent is not None and spent > cap:
            account = account_services.billing_account_update(
                account_id=account_id, changes={}, credit_limit=spent, credit_limit_was=cap
            )
            AccountRisk.objects.filter(account_id=account_id, spending_cap=cap).update(spending_cap=spent)
            cap = spent
    log.info(
        "antifraud.spending_cap",
        extra={
            "account_id": ids.encode("acc", account_id),
            "cap": str(cap),
            "policy_cap": str(policy.initial_limit),
            "spent": str(spent) if spent is not None else None,
            "held_at_spend": cap > policy.initial_limit,
            "limit_before": str(current),
            "limit": str(account.credit_limit),
            "currency": profile.currency,
        },
    )
    return cap


def spending_cap_lift(*, account_id: int) -> Decimal | None:
    """Approved: the limit the account had before its review cap comes back, unless someone
    changed the limit meanwhile (then theirs stays). Returns the limit given back."""
    risk = AccountRisk.objects.filter(account_id=account_id).first()
    if risk is None or risk.spending_cap is None or risk.capped_from is None:
        return None
    cap, before = risk.spending_cap, risk.capped_from
    account_services.billing_account_update(
        account_id=account_id, changes={}, credit_limit=before, credit_limit_was=cap
    )
    AccountRisk.objects.filter(account_id=account_id, spending_cap=cap).update(spending_cap=None, capped_from=None)
    log.info(
        "antifraud.spending_cap_lifted",
        extra={"account_id": ids.encode("acc", account_id), "cap": str(cap), "limit": str(before)},
    )
    return before


def credit_limits_review(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Daily: every ``raise_after_on_time_payments`` invoices an account paid by their due date
    raise its limit by ``raise_percent``, up to ``max_limit``. The on-time counts of all accounts
    come from invoicing in one statement; only accounts due a raise are touched, each raise
    marked before it is made (a crash in between loses a raise, never doubles one)."""
    from invoicing import selectors as invoicing_selectors

    counts = invoicing_selectors.invoices_paid_on_time()
    if not counts:
        return {"accounts": 0, "raised": 0}
    marks = dict(
        AccountRisk.objects.filter(account_id__in=list(counts)).values_list("account_id", "limit_raised_at_count")
    )
    capped = set(
        AccountRisk.objects.filter(account_id__in=list(counts), spending_cap__isnull=False).values_list(
            "account_id", flat=True
        )
    )  # under a review cap: not raised until an analyst decides
    profiles = account_selectors.billing_profiles(
        account_ids=[a for a, n in counts.items() if n > marks.get(a, 0) and a not in capped]
    )
    limits = account_selectors.credit_limits(account_ids=list(profiles))
    raised = 0
    for account_id, profile in sorted(profiles.items()):
        policy = credit_policy_for(currency=profile.currency, kind=profile.kind, country=profile.country)
        every = policy.raise_after_on_time_payments if policy else 0
        on_time = counts[account_id]
        due = on_time - on_time % every if every else 0
        if policy is None or not due or due <= marks.get(account_id, 0):
            continue
        current = limits[account_id][0]
        target = min(policy.max_limit, current * (1 + policy.raise_percent / 100))
        target = target.quantize(Decimal(1).scaleb(-money.exponent(profile.currency)), rounding=ROUND_DOWN)
        if target <= current:
            continue
        with transaction.atomic(durable=True):
            AccountRisk.objects.get_or_create(account_id=account_id)
            if not AccountRisk.objects.filter(account_id=account_id, limit_raised_at_count__lt=due).update(
                limit_raised_at_count=due
            ):
                continue  # a run at the same moment raised it
        account_services.billing_account_update(
            account_id=account_id, changes={}, credit_limit=target, credit_limit_was=current
        )
        raised += 1
        log.info(
            "antifraud.credit_limit",
            extra={
                "account_id": ids.encode("acc", account_id),
                "policy": policy.name,
                "limit": str(target),
                "currency": profile.currency,
                "reason": f"{due} invoices paid on time",
            },
        )
    log.info("antifraud.credit_limits_review", extra={"accounts": len(counts), "raised": raised})
    return {"accounts": len(counts), "raised": raised}
