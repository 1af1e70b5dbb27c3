"""CSV exports streamed row by row (``StreamingHttpResponse``): a 10,000,000-row export never
sits in memory; rows are read from the database in chunks (a server-side cursor) and written
as they come. Money is a decimal string with exactly the currency's places (``433.52``) in its
own column beside a ``currency`` column: a spreadsheet sums it, nothing is rounded twice.

``CsvExportMixin`` gives a ModelAdmin an "Export CSV" link on its changelist that exports
exactly the rows the changelist shows (its filters, search and ordering, all pages), with the
columns ``csv_columns`` names."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import URLPattern, path
from django.utils import timezone

from billing_site.common import ids, money

# A column: its header and how its value is taken from a row (a model, a dataclass …).
Column = tuple[str, Callable[[Any], Any]]


class _Echo:
    """A file-like object whose write returns what was written (csv.writer into a generator)."""

    def write(self, value: str) -> str:
        return value


def cell(value: Any) -> str:
    """One value as CSV text: times in UTC ISO 8601, None empty, the rest as str. Text that a
    spreadsheet would run as a formula (=, +, -, @ first) is prefixed with a quote, unless it is
    a number."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    text = str(value)
    if text[:1] in ("=", "+", "-", "@") and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def amount(minor_field: str, currency_field: str = "currency") -> Callable[[Any], str]:
    """A money column from integer minor units: ``43352`` EUR → ``433.52``."""

    def value(row: Any) -> str:
        minor = getattr(row, minor_field)
        return "" if minor is None else money.format_minor(int(minor), getattr(row, currency_field))

    return value


def public_id(prefix: str, id_field: str) -> Callable[[Any], str]:
    """A column of a row's id as customers and staff read it (``acc_…``, ``inv_…``); empty
    where there is none."""

    def value(row: Any) -> str:
        found = getattr(row, id_field)
        return "" if found is None else ids.encode(prefix, found)

    return value


# The account's name, where the changelist's queryset annotates it as ``account_name``.
CUSTOMER: Column = ("customer", lambda row: getattr(row, "account_name", "") or "")


def attr(name: str) -> Callable[[Any], Any]:
    """A column read from an attribute (or a zero-argument method, called)."""

    def value(row: Any) -> Any:
        found = getattr(row, name)
        return found() if callable(found) else found

    return value


def rows_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """CSV lines: the header, then each row."""
    writer = csv.writer(_Echo())
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow([cell(v) for v in row])


def stream_csv(filename: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(rows_csv(header, rows), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def stream_queryset(
    filename: str, columns: Sequence[Column], queryset: QuerySet[Any] | Iterable[Any], chunk_size: int = 2000
) -> StreamingHttpResponse:
    """A queryset's rows (read in chunks through a server-side cursor) as a streamed CSV."""
    items = queryset.iterator(chunk_size=chunk_size) if isinstance(queryset, QuerySet) else queryset
    return stream_csv(filename, [h for h, _ in columns], ([get(row) for _, get in columns] for row in items))


class CsvExportMixin:
    """A ModelAdmin whose changelist exports to CSV what it shows (filters, search, ordering):
    ``<changelist>/export.csv?<the changelist's query>``, linked from the changelist as "Export
    CSV". ``csv_columns`` says the columns; whoever may view the list may export it."""

    csv_columns: Sequence[Column] = ()
    change_list_template: ClassVar[Any] = "admin/csv_export_change_list.html"  # as ModelAdmin declares it

    def get_urls(self) -> list[URLPattern]:
        model = self.model  # type: ignore[attr-defined]
        name = f"{model._meta.app_label}_{model._meta.model_name}_export_csv"
        view = self.admin_site.admin_view(self.export_csv_view)  # type: ignore[attr-defined]
        return [path("export.csv", view, name=name), *super().get_urls()]  # type: ignore[misc]

    def export_csv_view(self, request: HttpRequest) -> HttpResponseBase:
        if not self.has_view_or_change_permission(request):  # type: ignore[attr-defined]
            raise PermissionDenied
        # The changelist's own query (filters, search, ordering), every page of it.
        changelist = self.get_changelist_instance(request)  # type: ignore[attr-defined]
        queryset = changelist.get_queryset(request)
        model: type[Model] = self.model  # type: ignore[attr-defined]
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        return stream_queryset(f"{model._meta.model_name}-{stamp}.csv", self.csv_columns, queryset)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        model = self.model  # type: ignore[attr-defined]
        extra = {
            **(extra_context or {}),
            "csv_export_url_name": f"admin:{model._meta.app_label}_{model._meta.model_name}_export_csv",
        }
        return super().changelist_view(request, extra)  # type: ignore[misc]


__all__ = ["Column", "CsvExportMixin", "amount", "attr", "cell", "rows_csv", "stream_csv", "stream_queryset"]
