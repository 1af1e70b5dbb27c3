"""The outbox: side effects that must not be lost, written in the transaction of the state
change that causes them and delivered after it commits (``billing_site.outbox.services``)."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class OutboxKind(models.TextChoices):
    TASK = "task", "Celery task"
    EMAIL = "email", "Email"


class OutboxMessage(models.Model):
    """One side effect: a Celery task by name with its keyword arguments (ids), or an email
    from a template. ``dedupe_key`` (optional, unique) makes the enqueue itself idempotent:
    "charge invoice X after issue" is written once however often the cause is replayed."""

    kind = models.CharField(max_length=8, choices=OutboxKind.choices)
    name = models.CharField(max_length=100, help_text="Task name (payments.charge_invoice) or email template")
    payload = models.JSONField(default=dict, blank=True)
    dedupe_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    account_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # A deliverer leases a message until this time; another takes it over after that.
    leased_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # After a failure the drain leaves the message until then (a backoff doubling per attempt).
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["id"], condition=Q(delivered_at__isnull=True), name="outbox_pending"),
            models.Index(fields=["account_id", "created_at"], name="outbox_account"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} #{self.id}"
