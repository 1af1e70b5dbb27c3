"""Reads of the outbox: what waits to be delivered (the staff home page, /metrics)."""

from __future__ import annotations

from django.db.models import Count, Min

from billing_site.common.backlogs import Backlog
from billing_site.outbox.models import OutboxMessage


def backlog() -> Backlog:
    """Messages not delivered yet, and the oldest one's creation (the partial index
    ``outbox_pending`` holds exactly them)."""
    return Backlog.of(
        OutboxMessage.objects.filter(delivered_at__isnull=True).aggregate(
            count=Count("id"), oldest_at=Min("created_at")
        )
    )
