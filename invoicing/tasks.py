"""Celery tasks of the invoicing app: thin, they take ids and call services."""

from __future__ import annotations

import datetime as dt

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from billing_site.common.actors import Actor, ActorKind


@shared_task(name="invoicing.render_documents")
def render_documents(*, kind: str, source_ids: list[int]) -> int:
    """Render and store the PDFs of issued documents (once each; re-runs change nothing)."""
    from invoicing import pdf

    return sum(1 for source_id in source_ids if pdf.document_ensure(kind=kind, source_id=source_id))


@shared_task(name="invoicing.close_last_period")
def close_last_period() -> str:
    """Beat, on the 1st after the grace time for late events: close last month."""
    from invoicing import services
    from invoicing.periods import Period

    now = timezone.now()
    period = Period.containing(now).previous
    grace_over = period.end_at + dt.timedelta(minutes=settings.INVOICING_GRACE_MINUTES)
    if now < grace_over:
        return f"{period}: grace time runs until {grace_over.isoformat()}"
    return services.period_close(period=period, actor=Actor.system("invoicing.beat"), fan_out=True).summary()


@shared_task(name="invoicing.close_shard", acks_late=True)
def close_shard(*, period: str, shard: int, actor_kind: str, actor_name: str, actor_user_id: int | None) -> str:
    """One shard of a fanned-out period close (idempotent: a redelivery finds it issued)."""
    from invoicing import services
    from invoicing.periods import Period

    actor = Actor(kind=ActorKind(actor_kind), name=actor_name, user_id=actor_user_id)
    return services.period_close_shard(period=Period.parse(period), shard=shard, actor=actor).summary()


@shared_task(name="invoicing.close_period")
def close_period(*, period: str, operator_id: int, operator_email: str) -> str:
    """A billing run started by finance from the admin's period-close page."""
    from invoicing import services
    from invoicing.periods import Period

    actor = Actor.operator(operator_id, operator_email)
    return services.period_close(period=Period.parse(period), actor=actor, fan_out=True).summary()


@shared_task(name="invoicing.threshold_billing")
def threshold_billing() -> str:
    """After each rollup drain (queued by metering's task by name): the credit check, and a
    threshold invoice for every account over its credit limit with usage not billed yet."""
    from invoicing import services

    return services.threshold_billing_run().summary()
