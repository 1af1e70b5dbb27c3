"""Admin helpers shared by the apps."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


class ReadOnlyInlineMixin:
    """An inline that shows rows another service owns: every listed field read-only, nothing
    added, changed or deleted from here."""

    extra = 0
    can_delete = False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.fields  # type: ignore[attr-defined]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class WriteThroughServiceMixin:
    """For a ModelAdmin whose ``save_model`` calls a service: the service's write is its own
    durable transaction, so the change view must not wrap it in Django's."""

    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> Any:
        return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined]

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # Inlines here are read-only (their formsets save nothing) and the form was never saved
        # by the ORM (the service wrote), so there is no save_m2m to call.
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)  # type: ignore[attr-defined]
