"""The trail in the admin: each tracked record's "History" (``AuditHistoryMixin``, mixed into
the record's ModelAdmin) and the whole trail (``Audit trail``), searchable by object, actor
and date range."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.dateparse import parse_date

from billing_site.audit import selectors
from billing_site.audit.models import AuditEvent
from billing_site.common.admin import RecordAdminMixin
from billing_site.common.staff import PermissionRequired


class AuditHistoryMixin:
    """A ModelAdmin whose "History" is the record's audit trail: every change with the
    fields before and after, who made it, why and from where (instead of Django's LogEntry,
    which says "Changed Email." and misses every change not made through the admin)."""

    object_history_template: Any = "admin/audit/object_history.html"  # Any: agrees with ModelAdmin's

    def history_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> HttpResponse:
        model_admin: Any = self
        obj = model_admin.get_object(request, admin.utils.unquote(object_id))
        if obj is None:
            return model_admin._get_obj_does_not_exist_redirect(request, model_admin.opts, object_id)
        if not model_admin.has_view_or_change_permission(request, obj):
            opts_ = model_admin.model._meta
            raise PermissionRequired(f"{opts_.app_label}.view_{opts_.model_name}", action="History")
        opts = model_admin.model._meta
        context = {
            **model_admin.admin_site.each_context(request),
            "title": f"History: {obj}",
            "subtitle": None,
            "entries": selectors.object_trail(obj),
            "module_name": str(opts.verbose_name_plural).capitalize(),
            "object": obj,
            "opts": opts,
            "preserved_filters": model_admin.get_preserved_filters(request),
            **(extra_context or {}),
        }
        request.current_app = model_admin.admin_site.name
        return TemplateResponse(request, self.object_history_template, context)


def _day(value: str) -> dt.datetime | None:
    day = parse_date(value or "")
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC) if day else None


@admin.register(AuditEvent)
class AuditTrailAdmin(RecordAdminMixin, admin.ModelAdmin[AuditEvent]):
    """One page of the whole trail: filter by model, object (pk or public id), actor and
    dates (``from`` inclusive, ``to`` inclusive, UTC days); newest first, 200 at most."""

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionRequired("audit.view_auditevent", action="The audit trail")
        q = request.GET
        since = _day(q.get("from", ""))
        until = _day(q.get("to", ""))
        if until:
            until += dt.timedelta(days=1)
        filters = {
            "model": q.get("model", "").strip(),
            "object": q.get("object", "").strip(),
            "actor": q.get("actor", "").strip(),
            "from": q.get("from", ""),
            "to": q.get("to", ""),
        }
        entries = selectors.search(
            model=filters["model"], object_id=filters["object"], actor=filters["actor"], since=since, until=until
        )
        models = sorted(m.pgh_tracked_model._meta.label for m in selectors.event_models())  # type: ignore[attr-defined]
        context = {
            **self.admin_site.each_context(request),
            "title": "Audit trail",
            "subtitle": None,
            "opts": self.model._meta,
            "entries": entries,
            "filters": filters,
            "models": models,
            "now": timezone.now(),
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/audit/trail.html", context)
