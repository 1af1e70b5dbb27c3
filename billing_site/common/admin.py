"""Admin helpers shared by the apps, and the admin site's own settings (every app's admin
imports this module)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse_lazy
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django_countries import countries

from billing_site.common import money


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


class PartInline(ReadOnlyInlineMixin):
    """Rows that are part of another record's story (a payment's attempts, an invoice's
    lines): whoever may view that record (``view_permission``, e.g. ``payments.view_payment``)
    may view them."""

    view_permission: str

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(self.view_permission)


HISTORY_FIELDS = ("created_at", "from_state", "to_state", "actor_kind", "actor_name", "reason")


class HistoryInline(PartInline):
    """A state machine's audit rows (its ``StateChangeRecord`` table), as its "History"."""

    verbose_name_plural: Any = "History"  # Any: to agree with the admin classes it is mixed into
    fields: Any = HISTORY_FIELDS


class RecordAdminMixin:
    """A ModelAdmin over records (audits, assessments, events): listed and viewed, never added,
    changed or deleted from the admin."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
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


# --- The admin site itself

# "View site" goes to the API docs: the project has no public site of its own at "/".
admin.site.site_url = reverse_lazy("api-docs")  # type: ignore[assignment]  # a lazy str, resolved when shown
admin.site.site_header = "Billing back office"
admin.site.site_title = "Billing back office"


# --- Money typed by a person

_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # ASCII digits only: no exponent, no separators


def places_of(amount: Decimal) -> int:
    exponent = amount.as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def whole_digits(amount: Decimal) -> int:
    _sign, digits, exponent = amount.as_tuple()
    return max(0, len(digits) + exponent) if isinstance(exponent, int) else 0


class AmountField(forms.CharField):
    """An amount of money typed by a person: plain decimal notation (``1234.50``), nothing a
    reader could misread: no exponent (``1e3``), thousands separators, spaces inside or
    non-ASCII digits. The value is a ``Decimal`` exactly as typed.

    The number of places is checked against the currency's minor unit (ISO 4217): by the field
    when ``currency`` is known as the form is built (``field.currency = "EUR"``), else by the
    form's ``clean`` with ``check_places`` once the currency is known. Every message names the
    field, so a mistake is clear wherever it is shown."""

    def __init__(
        self,
        *,
        label: str,
        currency: str | None = None,
        allow_zero: bool = False,
        max_whole_digits: int = 13,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("help_text", "Plain decimal notation, e.g. 1250.00")
        super().__init__(label=label, **kwargs)
        self.currency = currency
        self.allow_zero = allow_zero
        self.max_whole_digits = max_whole_digits

    def to_python(self, value: Any) -> Decimal | None:  # type: ignore[override]
        if isinstance(value, Decimal):
            return value
        text = super().to_python(value)
        if text is None or text in self.empty_values:
            return None
        if not _PLAIN_DECIMAL.fullmatch(text):
            raise ValidationError(
                f"{self.label}: enter an amount in plain decimal notation, such as 1250.00 "
                "(no exponent, spaces or thousands separators).",
                code="invalid",
            )
        amount = Decimal(text)
        if len(text) > self.max_whole_digits + 20 or whole_digits(amount) > self.max_whole_digits:
            raise ValidationError(f"{self.label}: the amount is too large.", code="max_digits")
        return amount

    def validate(self, value: Any) -> None:
        super().validate(value)
        if value is None:
            return
        if value < 0 or (value == 0 and not self.allow_zero):
            qualifier = "zero or more" if self.allow_zero else "more than zero"
            raise ValidationError(f"{self.label}: the amount must be {qualifier}.", code="min_value")
        if self.currency:
            self.check_places(value, self.currency)

    def check_places(self, amount: Decimal, currency: str) -> None:
        """Refuse more places than ``currency``'s minor unit has (100.505 EUR, 10.5 JPY)."""
        places = money.exponent(currency)
        # Trailing zeros count: "100.500" EUR may be a European "100 500" typed with a dot.
        if places_of(amount) > places:
            allowed = "no decimal places" if places == 0 else f"at most {places} decimal places"
            raise ValidationError(
                f"{self.label}: {currency} amounts have {allowed} ({amount} has more).", code="places"
            )

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            before = self.to_python(initial) if initial not in self.empty_values else None
            after = self.to_python(data)
        except ValidationError:
            return True
        return before != after


# --- Display helpers


def key_values(
    mapping: Mapping[str, Any] | None,
    *,
    labels: Mapping[str, str] | None = None,
    order: Sequence[str] = (),
    humanize: bool = True,
) -> str:
    """A JSON object (a party's snapshot, a resource's spec or labels) as a small definition
    list, every key and value escaped; lists become lines. Keys named in ``order`` come first in
    that order, the others after them alphabetically (jsonb keeps no order a person would
    choose). ``humanize``: keys become labels ("tax_id" → "Tax id"); off for keys that are
    identifiers (SKU codes in a spec, label keys). Empty: a dash, as the admin shows empty values."""
    if not mapping:
        return "-"
    labels = labels or {}
    rank = {key: i for i, key in enumerate(order)}
    items = []
    for key in sorted(mapping, key=lambda k: (rank.get(k, len(rank)), str(k))):
        value = mapping[key]
        if isinstance(value, list | tuple):
            shown = format_html_join(mark_safe("<br>"), "{}", ((v,) for v in value))
        elif isinstance(value, Mapping):
            shown = format_html("{}", ", ".join(f"{k}: {v}" for k, v in value.items()))
        else:
            shown = format_html("{}", "-" if value is None or value == "" else value)
        label = labels.get(key) or (str(key).replace("_", " ").capitalize() if humanize else str(key))
        items.append(format_html("<dt>{}</dt><dd>{}</dd>", label, shown))
    return format_html('<dl class="key-values">{}</dl>', mark_safe("".join(items)))  # noqa: S308 (each item escaped)


class CountryInUseFilter(admin.SimpleListFilter):
    """The ``country`` filter listing only the countries some row has (not all 249), by name."""

    title = "country"
    parameter_name = "country"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        codes = model_admin.model.objects.order_by().values_list("country", flat=True).distinct()
        return sorted(
            ((code, f"{countries.name(code) or code} ({code})") for code in codes if code), key=lambda c: c[1]
        )

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(country=self.value())
        return queryset
