"""Thin Celery tasks of the antifraud app (queue ``antifraud``; limits in billing_site/celery.py).
Each takes ids, calls a service, and is idempotent: the outbox delivers at least once."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="antifraud.account_block")
def account_block(*, account_id: int, assessment_id: int) -> bool:
    from antifraud import services

    return services.account_block(account_id=account_id, assessment_id=assessment_id)


@shared_task(name="antifraud.account_transition")
def account_transition(**message: Any) -> bool:
    """An analyst's approval or block reaching the account: the message is
    ``services.account_transition``'s keywords, which say what they mean (messages queued
    before ``actor_user_id`` existed are antifraud's own)."""
    from antifraud import services

    return services.account_transition(**message)


@shared_task(name="antifraud.usage_sweep")
def usage_sweep() -> dict[str, int]:
    from antifraud import services

    return services.usage_sweep()


@shared_task(name="antifraud.account_blocked")
def account_blocked(*, account_id: int) -> int:
    """Queued by the accounts service (through the outbox) whenever an account is blocked, by
    antifraud or by an operator: the accounts linked to it are assessed again."""
    from antifraud import services

    return services.account_blocked(account_id=account_id)


@shared_task(name="antifraud.account_unblocked")
def account_unblocked(*, account_id: int) -> None:
    from antifraud import services

    services.account_unblocked(account_id=account_id)


@shared_task(name="antifraud.credit_limit_initial")
def credit_limit_initial(*, account_id: int) -> str:
    from antifraud import credit_limits

    return str(credit_limits.credit_limit_initial(account_id=account_id))


@shared_task(name="antifraud.spending_cap")
def spending_cap(*, account_id: int) -> str:
    """An active account raised for review: its limit lowered to the cap (through the outbox)."""
    from antifraud import credit_limits

    return str(credit_limits.spending_cap(account_id=account_id))


@shared_task(name="antifraud.spending_cap_lift")
def spending_cap_lift(*, account_id: int) -> str:
    """Approved: the limit before the cap given back (through the outbox)."""
    from antifraud import credit_limits

    return str(credit_limits.spending_cap_lift(account_id=account_id))


@shared_task(name="antifraud.credit_limits_review")
def credit_limits_review() -> dict[str, int]:
    from antifraud import credit_limits

    return credit_limits.credit_limits_review()
