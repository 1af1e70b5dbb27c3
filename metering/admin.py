"""Admin for the price catalog. Every write goes through ``services.catalog_load`` (the same
checks as ``load_catalog``): loaded prices are never edited, a new one supersedes them."""

from __future__ import annotations

import datetime as dt
import json
import threading
from decimal import Decimal
from typing import Any

import msgspec
from django import forms
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from accounts import selectors as account_selectors
from billing_site.audit.admin import AuditHistoryMixin
from billing_site.common import ids, money
from billing_site.common.admin import ReadOnlyInlineMixin, RecordAdminMixin, WriteThroughServiceMixin, key_values
from billing_site.common.durations import duration_text
from billing_site.common.staff import require_permission
from metering import catalog, selectors, services
from metering.models import Price, PriceTier, RollupShard, Sku


def _load_one(document: catalog.CatalogDocument) -> None:
    try:
        catalog.check(document)
        services.catalog_load(document=document)
    except catalog.CatalogError as exc:
        raise ValidationError(str(exc)) from exc


class PriceInline(ReadOnlyInlineMixin, admin.TabularInline[Price, Sku]):
    model = Price
    fields = ("currency", "valid_from", "unit_price", "tier_summary")
    show_change_link = True

    @admin.display(description="Tiers")
    def tier_summary(self, price: Price) -> str:
        return tiers_text(price)


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def tiers_text(price: Price) -> str:
    if not price.is_tiered:
        return "-"
    return "; ".join(
        f"up to {_plain(t.up_to) if t.up_to is not None else '∞'}: {_plain(t.unit_price)}" for t in price.tiers.all()
    )


class SkuForm(forms.ModelForm[Sku]):
    class Meta:
        model = Sku
        fields = ("code", "name", "unit", "kind")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        if self.instance.pk is None and Sku.objects.filter(code=data.get("code")).exists():
            raise ValidationError("A SKU with this code exists: change it instead.")
        # On change, code and kind are read-only (not in the form): they are the instance's.
        code = data.get("code") or self.instance.code
        kind = data.get("kind") or self.instance.kind
        try:
            document = msgspec.convert(  # the file format's rules
                {"skus": [{"code": code, "name": data["name"], "unit": data["unit"], "kind": kind}]},
                catalog.CatalogDocument,
            )
        except msgspec.ValidationError as exc:
            raise ValidationError(f"Not a valid SKU: {exc}") from exc
        self.document = document
        return data

    def validate_unique(self) -> None:
        pass  # the service decides: the code is the SKU's identity, loading it again updates it


@admin.register(Sku)
class SkuAdmin(AuditHistoryMixin, WriteThroughServiceMixin, admin.ModelAdmin[Sku]):
    form = SkuForm
    list_display = ("code", "name", "unit", "kind", "updated_at")
    list_filter = ("kind",)
    search_fields = ("code", "name")

    def get_inlines(self, request: HttpRequest, obj: Sku | None) -> Any:
        return (PriceInline,) if obj is not None else ()

    def get_readonly_fields(self, request: HttpRequest, obj: Sku | None = None) -> Any:
        return ("code", "kind") if obj is not None else ()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # usage refers to SKUs by code

    def save_model(self, request: HttpRequest, obj: Sku, form: Any, change: bool) -> None:
        _load_one(form.document)
        obj.pk = Sku.objects.get(code=form.document.skus[0].code).pk


class PriceAddForm(forms.ModelForm[Price]):
    tiers_json = forms.CharField(
        label="Tiers",
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text='Graduated price instead of a unit price, e.g. [{"up_to": "100", "unit_price": "0"}, '
        '{"up_to": null, "unit_price": "0.07"}]',
    )

    class Meta:
        model = Price
        fields = ("sku", "currency", "valid_from", "unit_price")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        sku: Sku = data["sku"]
        try:
            raw_tiers = json.loads(data["tiers_json"]) if data.get("tiers_json") else None
            price = {
                "currency": data["currency"],
                "valid_from": data["valid_from"].isoformat(),
                "unit_price": str(data["unit_price"]) if data.get("unit_price") is not None else None,
                "tiers": raw_tiers,
            }
            document = msgspec.convert(
                {"skus": [{"code": sku.code, "name": sku.name, "unit": sku.unit, "kind": sku.kind, "prices": [price]}]},
                catalog.CatalogDocument,
            )
        except (ValueError, msgspec.ValidationError) as exc:
            raise ValidationError(f"Not a valid price: {exc}") from exc
        try:
            catalog.check(document)
        except catalog.CatalogError as exc:
            raise ValidationError(str(exc)) from exc
        if Price.objects.filter(sku=sku, currency=data["currency"], valid_from=data["valid_from"]).exists():
            raise ValidationError("A price for this SKU, currency and time exists; prices never change.")
        self.document = document
        return data


class PriceTierInline(ReadOnlyInlineMixin, admin.TabularInline[PriceTier, Price]):
    model = PriceTier
    fields = ("position", "up_to", "unit_price")


@admin.register(Price)
class PriceAdmin(AuditHistoryMixin, WriteThroughServiceMixin, admin.ModelAdmin[Price]):
    list_display = ("sku", "currency", "valid_from", "unit_price", "tiers_display")
    list_filter = ("currency", "sku__kind", "sku")
    search_fields = ("sku__code",)
    date_hierarchy = "valid_from"

    @admin.display(description="Tiers")
    def tiers_display(self, price: Price) -> str:
        return tiers_text(price)

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).select_related("sku").prefetch_related("tiers")

    def get_form(self, request: HttpRequest, obj: Price | None = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = PriceAddForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Price | None = None) -> Any:
        if obj is None:
            return ("sku", "currency", "valid_from", "unit_price", "tiers_json")
        return ("sku", "currency", "valid_from", "unit_price", "created_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Price | None = None) -> Any:
        return ("sku", "currency", "valid_from", "unit_price", "created_at") if obj is not None else ()

    def get_inlines(self, request: HttpRequest, obj: Price | None) -> Any:
        return (PriceTierInline,) if obj is not None else ()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # rated usage refers to prices: supersede, never delete

    def save_model(self, request: HttpRequest, obj: Price, form: Any, change: bool) -> None:
        if change:
            return  # nothing is editable
        _load_one(form.document)
        price = form.document.skus[0].prices[0]
        obj.pk = Price.objects.get(
            sku__code=form.document.skus[0].code, currency=price.currency, valid_from=price.valid_from
        ).pk


def this_month() -> tuple[dt.date, dt.date]:
    """The first day of this month (UTC) and of the next: the usage page's default range."""
    first = timezone.now().astimezone(dt.UTC).date().replace(day=1)
    return first, (first + dt.timedelta(days=32)).replace(day=1)


class UsageLookupForm(forms.Form):
    account = forms.CharField(label="Billing account", help_text="acc_…")
    start = forms.DateField(required=False, help_text="YYYY-MM-DD, UTC, inclusive; blank: the 1st of this month")
    end = forms.DateField(required=False, help_text="exclusive; blank: the 1st of next month")

    def clean_account(self) -> account_selectors.BillingProfile:
        account_id = ids.decode("acc", self.cleaned_data["account"].strip())
        if account_id is None:
            raise ValidationError("Not a billing account id (acc_…).")
        profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
        if profile is None:
            raise ValidationError("No such billing account.")
        return profile

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        first, next_first = this_month()
        start, end = data.get("start") or first, data.get("end") or next_first
        if "start" not in self.errors and "end" not in self.errors:
            if end <= start:
                self.add_error("end", "The end must be after the start.")
            elif (end - start).days > selectors.MAX_RANGE_DAYS["day"]:
                self.add_error("end", f"At most {selectors.MAX_RANGE_DAYS['day']} days at a time.")
        data["start"], data["end"] = start, end
        return data


@admin.register(RollupShard)
class RollupShardAdmin(RecordAdminMixin, admin.ModelAdmin[RollupShard]):
    """Rollup progress per shard, and the usage page (costs, resources, data quality).

    Per shard: when its last run committed and how long ago, its lag (the age of its oldest
    waiting event or dirty hour), the events and dirty hours waiting, and how long its last run
    took, red when the shard is behind (``selectors.ShardProgress.behind``): read once per page
    by ``selectors.rollup_progress``, so "updated at 9:31" 35 minutes later with events waiting
    shows as what it is."""

    list_display = (
        "shard_shown",
        "last_run",
        "since_last_run",
        "lag",
        "events_waiting",
        "hours_waiting",
        "last_duration",
        "watermark",
        "events_processed",
        "txid_horizon",
    )
    list_display_links = None
    readonly_fields = ("shard", "watermark", "txid_horizon", "events_processed", "updated_at", "last_duration_ms")
    change_list_template = "admin/metering/rollupshard/change_list.html"
    _page = threading.local()  # this request's progress of every shard, read once per page

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        now = timezone.now()
        self._page.now = now
        self._page.progress = {p.shard: p for p in selectors.rollup_progress()}
        context = {
            "rollup_as_of": now,
            "rollup_threshold": duration_text(dt.timedelta(seconds=settings.DASHBOARD_ROLLUP_LAG_SECONDS)),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def _progress(self, shard: RollupShard) -> selectors.ShardProgress | None:
        return getattr(self._page, "progress", {}).get(shard.shard)

    def _red(self, shard: RollupShard, text: str) -> str:
        progress = self._progress(shard)
        if progress is not None and progress.behind(self._page.now):
            return format_html('<strong style="color: #ba2121">{} ⚠</strong>', text)
        return text

    @admin.display(description="Shard", ordering="shard")
    def shard_shown(self, shard: RollupShard) -> str:
        return self._red(shard, str(shard.shard))

    @admin.display(description="Last run", ordering="updated_at")
    def last_run(self, shard: RollupShard) -> dt.datetime:
        return shard.updated_at

    @admin.display(description="Since last run")
    def since_last_run(self, shard: RollupShard) -> str:
        progress = self._progress(shard)
        return self._red(shard, duration_text(progress.since_last_run(self._page.now) if progress else None))

    @admin.display(description="Lag (oldest waiting)")
    def lag(self, shard: RollupShard) -> str:
        progress = self._progress(shard)
        return self._red(shard, duration_text(progress.lag(self._page.now)) if progress else "-")

    @admin.display(description="Events waiting")
    def events_waiting(self, shard: RollupShard) -> str:
        progress = self._progress(shard)
        if progress is None:
            return "-"
        return self._red(shard, f"{progress.events_waiting:,}{'+' if progress.capped else ''}")

    @admin.display(description="Dirty hours waiting")
    def hours_waiting(self, shard: RollupShard) -> str:
        progress = self._progress(shard)
        return "-" if progress is None else f"{progress.hours_waiting:,}"

    @admin.display(description="Last run took", ordering="last_duration_ms")
    def last_duration(self, shard: RollupShard) -> str:
        return "-" if shard.last_duration_ms is None else f"{shard.last_duration_ms:,} ms"

    def get_urls(self) -> list[Any]:
        from django.urls import path

        return [path("usage/", self.admin_site.admin_view(self.usage_view), name="metering_usage"), *super().get_urls()]

    def usage_view(self, request: HttpRequest) -> Any:
        from django.template.response import TemplateResponse

        require_permission(request, "metering.view_rollupshard", action="The usage page")
        first, next_first = this_month()
        form = UsageLookupForm(request.GET or None, initial={"start": first, "end": next_first})
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Usage and costs",
            "form": form,
        }
        if form.is_valid():
            profile: account_selectors.BillingProfile = form.cleaned_data["account"]
            start_day, end_day = form.cleaned_data["start"], form.cleaned_data["end"]
            start = dt.datetime.combine(start_day, dt.time(), tzinfo=dt.UTC)
            end = dt.datetime.combine(end_day, dt.time(), tzinfo=dt.UTC)
            rows, total = selectors.cost_breakdown(
                selectors.CostQuery(account_id=profile.account_id, start=start, end=end, granularity="day", by_sku=True)
            )
            for row in rows:
                row["amount"] = _plain(row["amount"])
                row["quantity"] = selectors.quantity_text(row.get("quantity")) or ""
            resources = selectors.resource_states(account_id=profile.account_id)
            context.update(
                title=f"Usage and costs of {profile.name} ({profile.public_id})",
                account=profile,
                range_start=start_day,
                range_last=end_day - dt.timedelta(days=1),
                range_end=end_day,
                rows=rows,
                total=f"{money.format_amount(total, profile.currency)} {profile.currency}",
                total_exact=f"{_plain(total)} {profile.currency}",
                resources=[
                    (resource, key_values(resource.spec, humanize=False), key_values(resource.labels, humanize=False))
                    for resource in resources
                ],
                quality=selectors.data_quality(account_id=profile.account_id),
            )
        return TemplateResponse(request, "admin/metering/usage.html", context)
