"""The outbox in the admin: what is waiting, what failed and why, and "deliver now" for
messages an operator does not want to leave to the next drain (``outbox.services.deliver``,
the drain's own path: leased, sent, marked; receivers are idempotent).

Read-only: a message is never edited or deleted by hand. An email's recipient is masked."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from billing_site.common import ids
from billing_site.common.admin import RecordAdminMixin, key_values
from billing_site.common.logs import mask_email
from billing_site.outbox import services
from billing_site.outbox.models import OutboxKind, OutboxMessage

log = logging.getLogger(__name__)

# At most this many messages are delivered by one click (each is a broker call or an email).
DELIVER_LIMIT = 500


class DeliveryStateFilter(admin.SimpleListFilter):
    """Where a message is: waiting, being delivered (leased), failing (an error kept for the
    next drain), or delivered."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("pending", "Pending"),
            ("leased", "Being delivered"),
            ("failing", "Failing (pending with an error)"),
            ("delivered", "Delivered"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> QuerySet[OutboxMessage]:
        now = timezone.now()
        pending = Q(delivered_at__isnull=True)
        if self.value() == "pending":
            return queryset.filter(pending)
        if self.value() == "leased":
            return queryset.filter(pending, leased_until__gt=now)
        if self.value() == "failing":
            return queryset.filter(pending).exclude(last_error="")
        if self.value() == "delivered":
            return queryset.filter(delivered_at__isnull=False)
        return queryset


class AttemptsFilter(admin.SimpleListFilter):
    title = "attempts"
    parameter_name = "attempts"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("0", "Never tried"), ("1", "Once"), ("many", "More than once")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> QuerySet[OutboxMessage]:
        if self.value() in ("0", "1"):
            return queryset.filter(attempts=int(self.value() or 0))
        if self.value() == "many":
            return queryset.filter(attempts__gt=1)
        return queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(RecordAdminMixin, admin.ModelAdmin[OutboxMessage]):
    list_display = ("id", "kind", "name", "account", "state", "attempts", "error_shown", "created_at", "delivered_at")
    list_filter = (
        DeliveryStateFilter,
        "kind",
        "name",
        AttemptsFilter,
        ("last_error", admin.EmptyFieldListFilter),
        ("created_at", admin.DateFieldListFilter),
    )
    search_fields = ("=dedupe_key",)
    search_help_text = "An acc_ id, a message id, or a dedupe key"
    ordering = ("-id",)
    show_full_result_count = False
    list_per_page = 100
    actions = ("deliver_now",)
    fields = (
        "id",
        "kind",
        "name",
        "account",
        "state",
        "payload_shown",
        "dedupe_key",
        "attempts",
        "last_error",
        "next_attempt_at",
        "created_at",
        "leased_until",
        "delivered_at",
    )
    readonly_fields = fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[OutboxMessage], search_term: str) -> Any:
        term = search_term.strip()
        account_id = ids.decode("acc", term)
        if account_id is not None:
            return queryset.filter(account_id=account_id), False
        if term.isdigit():
            return queryset.filter(id=int(term)), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="account", ordering="account_id")
    def account(self, message: OutboxMessage) -> str:
        return ids.encode("acc", message.account_id) if message.account_id else "-"

    @admin.display(description="state")
    def state(self, message: OutboxMessage) -> str:
        if message.delivered_at is not None:
            return "delivered"
        if message.leased_until is not None and message.leased_until > timezone.now():
            return "being delivered"
        return "failing" if message.last_error else "pending"

    @admin.display(description="last error")
    def error_shown(self, message: OutboxMessage) -> str:
        error = message.last_error
        return error if len(error) <= 120 else f"{error[:119]}…"

    @admin.display(description="payload")
    def payload_shown(self, message: OutboxMessage) -> str:
        payload = dict(message.payload or {})
        if message.kind == OutboxKind.EMAIL:
            # The recipient masked (as in the logs); the template's context as it will render.
            to = mask_email(str(payload.get("to", "")))
            return format_html("<p>To: {}</p>{}", to, key_values(payload.get("context") or {}, humanize=False))
        return key_values(payload, humanize=False)

    def has_deliver_permission(self, request: HttpRequest) -> bool:
        # Delivering is what the drain does every 15 s anyway (at least once, idempotent
        # receivers): whoever may watch the outbox may hurry it.
        return self.has_view_permission(request)

    @admin.action(description="Deliver the selected messages now", permissions=["deliver"])
    def deliver_now(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        pending = list(
            queryset.filter(delivered_at__isnull=True).order_by("id").values_list("id", flat=True)[: DELIVER_LIMIT + 1]
        )
        if len(pending) > DELIVER_LIMIT:
            messages.warning(
                request, f"Only the first {DELIVER_LIMIT} pending messages were tried; the drain does the rest."
            )
            pending = pending[:DELIVER_LIMIT]
        if not pending:
            messages.info(request, "Nothing to deliver: the selected messages were delivered already.")
            return
        sent = services.deliver(ids=pending)
        log.info("outbox.deliver_now", extra={"selected": len(pending), "sent": sent, "actor": str(request.user)})
        left = OutboxMessage.objects.filter(id__in=pending, delivered_at__isnull=True)
        failing = list(left.exclude(last_error="").values_list("id", flat=True)[:10])
        if sent == len(pending):
            messages.success(request, f"Delivered {sent} message(s).")
        else:
            detail = f" Failing: {', '.join(f'#{i}' for i in failing)} (see their errors)." if failing else ""
            messages.warning(
                request,
                f"Delivered {sent} of {len(pending)} message(s); the others are left to the drain "
                f"(being delivered elsewhere, or failed).{detail}",
            )
