"""Admin for the price catalog. Every write goes through ``services.catalog_load`` (the same
checks as ``load_catalog``): loaded prices are never edited, a new one supersedes them."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from metering import catalog, services
from metering.models import Price, PriceTier, Sku


def _load_one(document: catalog.CatalogDocument) -> None:
    try:
        catalog.check(document)
        services.catalog_load(document=document)
    except catalog.CatalogError as exc:
        raise ValidationError(str(exc)) from exc


class WriteThroughServiceMixin:
    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> Any:
        # Django wraps this view in a transaction; the write is the service's own durable one.
        return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined]

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # The inlines are read-only (their formsets save nothing) and the form was never
        # saved by the ORM (the service wrote), so there is no save_m2m to call.
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)  # type: ignore[attr-defined]


class PriceInline(admin.TabularInline[Price, Sku]):
    model = Price
    extra = 0
    fields = ("currency", "valid_from", "unit_price", "tier_summary")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

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
class SkuAdmin(WriteThroughServiceMixin, admin.ModelAdmin[Sku]):
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


class PriceTierInline(admin.TabularInline[PriceTier, Price]):
    model = PriceTier
    extra = 0
    fields = ("position", "up_to", "unit_price")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Price)
class PriceAdmin(WriteThroughServiceMixin, admin.ModelAdmin[Price]):
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
