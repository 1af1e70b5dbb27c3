"""Admin for support, finance and fraud staff. Every write goes through ``accounts.services``."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone

from accounts import debts, selectors, services, validation
from accounts.models import (
    AccountState,
    ApiKey,
    BillingAccount,
    BillingAccountProfileChange,
    BillingAccountTransition,
    Membership,
    Scope,
    TransitionCause,
    User,
)
from billing_site.audit.admin import AuditHistoryMixin
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.admin import (
    AmountField,
    CountryInUseFilter,
    ReadOnlyInlineMixin,
    WriteThroughServiceMixin,
)
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import ActionPermissionsMixin, require_permission

ADDRESS_FIELDS = tuple(f for f in services.PROFILE_FIELDS if f.startswith("address_"))

# Which permission each lifecycle transition needs in the admin.
# Who may post the account's form at all; each field then needs its own (get_readonly_fields).
ACCOUNT_CHANGE_PERMISSIONS = (
    "accounts.change_billingaccount",
    "accounts.change_tax_profile_billingaccount",
    "accounts.set_credit_limit_billingaccount",
)

# Which permission each lifecycle transition needs (the back office's customer page asks the same).
TRANSITION_PERMISSIONS = services.TRANSITION_PERMISSIONS

# What a done transition is called in the message after it.
TRANSITION_DONE = {
    "activate": "activated",
    "suspend": "suspended",
    "reactivate": "reactivated",
    "close": "closed",
    "block": "blocked",
    "unblock": "unblocked",
}


# Who may change the fields that decide an invoice's tax and where it goes (finance).
TAX_PROFILE_PERMISSION = "accounts.change_tax_profile_billingaccount"

# Transitions whose page shows what the account owes.
DEBT_SHOWN = frozenset({"close", "reactivate"})


def _operator(request: HttpRequest) -> Actor:
    return Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]


class PublicIdSearchMixin:
    """Search by the public id (``acc_…``) as well as by the configured text fields."""

    id_prefix = ""

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Any], search_term: str) -> Any:
        decoded = ids.decode(self.id_prefix, search_term.strip())
        if decoded is not None:
            return queryset.filter(id=decoded), False
        return super().get_search_results(request, queryset, search_term)  # type: ignore[misc]


class MembershipInline(ReadOnlyInlineMixin, admin.TabularInline[Membership, BillingAccount]):
    model = Membership
    fields = ("user", "role", "created_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("user", "account")  # each row names both


class TransitionInline(ReadOnlyInlineMixin, admin.TabularInline[BillingAccountTransition, BillingAccount]):
    model = BillingAccountTransition
    verbose_name_plural = "History"
    fields = ("created_at", "transition", "from_state", "to_state", "cause", "actor_kind", "actor_name", "reason")


class ProfileChangeInline(ReadOnlyInlineMixin, admin.TabularInline[BillingAccountProfileChange, BillingAccount]):
    model = BillingAccountProfileChange
    verbose_name_plural = "Profile changes"
    fields = ("created_at", "actor_kind", "actor_name", "changes_shown")
    readonly_fields = fields

    @admin.display(description="Changes")
    def changes_shown(self, obj: BillingAccountProfileChange) -> str:
        return "; ".join(f"{field}: {c['before'] or '—'} → {c['after'] or '—'}" for field, c in obj.changes.items())


class BillingAccountForm(forms.ModelForm[BillingAccount]):
    credit_limit = AmountField(label="Credit limit", allow_zero=True, help_text="In the account's currency")

    class Meta:
        model = BillingAccount
        fields = (*services.PROFILE_FIELDS, "credit_limit")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields.get("credit_limit")
        if isinstance(field, AmountField) and self.instance.currency:
            # The account's currency decides the places: "0.00" EUR, "0" JPY, never "0.0000".
            field.currency = self.instance.currency
            field.help_text = f"{self.instance.currency}, plain decimal notation"
            self.initial["credit_limit"] = money.format_amount(self.instance.credit_limit, self.instance.currency)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        # The country sent, else the stored one (read-only for staff who may not change it).
        country = str(data.get("country") or (self.instance.country if "country" not in self.fields else "") or "")
        for name, normalize in (("tax_id", validation.normalize_tax_id), ("phone", validation.normalize_phone)):
            if data.get(name) and country:
                try:
                    data[name] = normalize(country, data[name])
                except ValueError as exc:
                    self.add_error(name, str(exc))
        return data


def customer_url(account_id: int) -> str:
    """The customer page (the back office's, by the ``acc_…`` id): where every link to an
    account goes."""
    return reverse("backoffice:customer", args=[account_id])


class CustomerLinkChangeList(ChangeList):
    """The account list links each row to the customer page, by its ``acc_…`` id."""

    def url_for_result(self, result: Any) -> str:
        return customer_url(result.pk)


class TransitionForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)
    to_state = forms.ChoiceField(
        choices=[(AccountState.ACTIVE, "active"), (AccountState.PENDING, "pending")], required=False
    )
    override_debt = forms.BooleanField(
        required=False,
        label="Reactivate although the debt remains",
        help_text="The debt stays owed and is still chased; the reason goes into the account's history.",
    )


@admin.register(BillingAccount)
class BillingAccountAdmin(
    AuditHistoryMixin, WriteThroughServiceMixin, PublicIdSearchMixin, admin.ModelAdmin[BillingAccount]
):
    id_prefix = "acc"
    form = BillingAccountForm
    change_form_template = "admin/accounts/billingaccount/change_form.html"
    list_display = ("public_id", "name", "email", "kind", "country", "currency", "state_listed", "created_at")
    list_filter = ("state", "kind", CountryInUseFilter)
    search_fields = ("name", "email", "tax_id", "phone")
    readonly_fields = ("public_id", "state_shown", "currency", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("public_id", "state_shown", "name", "email", "phone", "kind", "currency", "credit_limit")}),
        ("Tax and address", {"fields": ("country", "tax_id", *ADDRESS_FIELDS)}),
        ("Times", {"fields": ("created_at", "updated_at")}),
    )
    inlines = (MembershipInline, TransitionInline, ProfileChangeInline)
    list_per_page = 50
    show_full_result_count = False  # counting a large table on every page is slow

    @admin.display(description="ID")
    def public_id(self, obj: BillingAccount) -> str:
        return obj.public_id

    @admin.display(description="State", ordering="state")
    def state_listed(self, obj: BillingAccount) -> str:
        """With why, from the cause recorded with the last transition: "Suspended (unpaid debt)"."""
        return obj.state_shown()

    @admin.display(description="State")
    def state_shown(self, obj: BillingAccount) -> str:
        """With why, and a staff decision's reason: "Suspended (by staff: leaked credential)"."""
        last = BillingAccountTransition.objects.filter(account=obj).order_by("-created_at", "-id").first()
        return obj.state_shown(reason=last.reason if last is not None and last.cause == obj.state_cause else "")

    @admin.display(description="Credit limit")
    def credit_limit_shown(self, obj: BillingAccount) -> str:
        return f"{money.format_amount(obj.credit_limit, obj.currency)} {obj.currency}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # customers open accounts through the API

    def get_readonly_fields(self, request: HttpRequest, obj: BillingAccount | None = None) -> Any:
        if obj is not None and obj.state == AccountState.CLOSED:
            return (
                "public_id",
                "state_shown",
                "currency",
                "credit_limit",
                "credit_limit_shown",
                *services.PROFILE_FIELDS,
                "created_at",
                "updated_at",
            )
        readonly: tuple[str, ...] = self.readonly_fields
        if not request.user.has_perm("accounts.change_billingaccount"):
            # Fraud sets credit limits only: the rest of the profile is not theirs.
            readonly = (*readonly, *(f for f in services.PROFILE_FIELDS if f not in services.TAX_PROFILE_FIELDS))
        if not request.user.has_perm("accounts.set_credit_limit_billingaccount"):
            readonly = (*readonly, "credit_limit", "credit_limit_shown")
        if not request.user.has_perm(TAX_PROFILE_PERMISSION):
            # Not in the form at all: whatever is posted for them is never read.
            readonly = (*readonly, *services.TAX_PROFILE_FIELDS)
        return readonly

    def get_fieldsets(self, request: HttpRequest, obj: BillingAccount | None = None) -> Any:
        """A read-only credit limit is shown with the currency's places ("0.00 EUR")."""
        fieldsets = super().get_fieldsets(request, obj)
        if "credit_limit" not in self.get_readonly_fields(request, obj):
            return fieldsets
        return [
            (
                name,
                {
                    **options,
                    "fields": tuple("credit_limit_shown" if f == "credit_limit" else f for f in options["fields"]),
                },
            )
            for name, options in fieldsets
        ]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """The profile (change), the tax profile (finance) or the credit limit (fraud): any of them
        opens the form; each field is editable only with its own permission (get_readonly_fields)."""
        return any(request.user.has_perm(p) for p in ACCOUNT_CHANGE_PERMISSIONS)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # accounts are closed, never deleted

    def save_model(self, request: HttpRequest, obj: BillingAccount, form: Any, change: bool) -> None:
        changes = {f: form.cleaned_data[f] for f in form.changed_data if f in services.PROFILE_FIELDS}
        if set(changes) & set(services.TAX_PROFILE_FIELDS) and not request.user.has_perm(TAX_PROFILE_PERMISSION):
            raise PermissionDenied  # never reached through the form (the fields are read-only)
        credit_limit = form.cleaned_data["credit_limit"] if "credit_limit" in form.changed_data else None
        services.billing_account_update(
            account_id=obj.id, changes=changes, credit_limit=credit_limit, actor=_operator(request)
        )

    def available_transitions(self, request: HttpRequest, account: BillingAccount) -> list[str]:
        names = [t.name for t in account.get_available_state_transitions()]  # type: ignore[attr-defined]
        return [n for n in names if request.user.has_perm(TRANSITION_PERMISSIONS[n])]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        account = self.get_object(request, object_id)
        if account is not None and object_id != account.public_id:
            # An internal integer in the address: the same page by the id staff and customers quote.
            url = reverse("admin:accounts_billingaccount_change", args=[account.public_id])
            query = request.META.get("QUERY_STRING", "")
            return HttpResponseRedirect(f"{url}?{query}" if query else url)
        extra = {**(extra_context or {}), "customer_url": customer_url(account.pk) if account else ""}
        if account is not None:
            extra["transitions"] = self.available_transitions(request, account)
        return super().change_view(request, object_id, form_url, extra)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CustomerLinkChangeList

    def response_post_save_change(self, request: HttpRequest, obj: BillingAccount) -> HttpResponseRedirect:
        """After the profile is saved: back to the customer page it was opened from."""
        return HttpResponseRedirect(customer_url(obj.pk))

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Any:
        """By the public id (``acc_…``), as staff and customers quote it; an integer still works."""
        # The admin unquotes the address's id first ("_40" is its escape of "@"): a public id
        # such as acc_40… arrives as acc@…, and quoting it again gives it back.
        decoded = ids.decode(self.id_prefix, object_id)
        if decoded is None:
            decoded = ids.decode(self.id_prefix, quote(object_id))
        return super().get_object(request, str(decoded) if decoded is not None else object_id, from_field)

    def get_urls(self) -> list[URLPattern]:
        custom = [
            path(
                "<acc:object_id>/transition/<str:name>/",
                self.admin_site.admin_view(self.transition_view),
                name="accounts_billingaccount_transition",
            ),
            # Addresses written before the public ids (bookmarks, scripts): the same page.
            path("<int:object_id>/transition/<str:name>/", self.admin_site.admin_view(self.transition_view)),
        ]
        return custom + super().get_urls()

    def transition_view(self, request: HttpRequest, object_id: int, name: str) -> HttpResponse:
        account = get_object_or_404(BillingAccount, pk=object_id)
        if name not in TRANSITION_PERMISSIONS:
            raise PermissionDenied(f"No transition named {name!r}.")
        require_permission(request, TRANSITION_PERMISSIONS[name], action=f"The transition “{name}”")
        form = TransitionForm(request.POST or None)
        # What the account owes, shown before anyone presses the button (the service decides).
        owed = debts.billing_account_debt(account_id=account.id) if name in DEBT_SHOWN else {}
        change_url = customer_url(account.pk)
        if request.method == "POST" and form.is_valid():
            try:
                services.billing_account_transition(
                    account_id=account.id,
                    transition=name,
                    actor=_operator(request),
                    reason=form.cleaned_data["reason"],
                    to_state=form.cleaned_data["to_state"] or None,
                    override_debt=bool(owed) and form.cleaned_data["override_debt"],
                )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                account.refresh_from_db(fields=["state"])
                done = TRANSITION_DONE[name]
                if name == "unblock":
                    done += f", back to {account.get_state_display().lower()}"
                messages.success(request, f"{account.name} ({account.public_id}) {done}.")
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "original": account,
            "title": f"{name.capitalize()} {account.name} ({account.public_id})",
            "transition": name,
            "form": form,
            "change_url": change_url,
            "needs_reason": name in services.REASON_REQUIRED,
            "owed": debts.debt_display(owed),
            # What the customer reads of it in their account's history (staff's reason stays inside).
            "public_reason": selectors.transition_public_reason(transition=name, cause=TransitionCause.STAFF),
        }
        return TemplateResponse(request, "admin/accounts/billingaccount/transition.html", context)


class ServiceKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(choices=Scope.choices, widget=forms.CheckboxSelectMultiple)


@admin.register(ApiKey)
class ApiKeyAdmin(AuditHistoryMixin, ActionPermissionsMixin, PublicIdSearchMixin, admin.ModelAdmin[ApiKey]):
    id_prefix = "key"
    list_display = ("name", "prefix", "user", "scopes", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    list_filter = (("user", admin.EmptyFieldListFilter), ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "prefix", "user__email")
    readonly_fields = ("name", "prefix", "user", "scopes", "created_by", "created_at", "last_used_at", "revoked_at")
    fields = readonly_fields
    actions = ("revoke",)
    action_permissions = {"revoke": "accounts.change_apikey"}

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # revoke, never delete: the audit trail keeps the key's row

    @admin.action(description="Revoke selected API keys", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for key_id in queryset.filter(revoked_at__isnull=True).values_list("id", flat=True):
            services.api_key_revoke(key_id=key_id, user_id=None)
            count += 1
        messages.success(request, f"Revoked {count} key(s) at {timezone.now():%Y-%m-%d %H:%M:%S} UTC.")

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("accounts.change_apikey")

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> HttpResponse:
        """Operators create service keys here; the key is shown once."""
        require_permission(request, "accounts.add_apikey", action="Creating a service key")
        form = ServiceKeyForm(request.POST or None)
        issued = None
        if request.method == "POST" and form.is_valid():
            issued = services.service_key_create(
                name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"], created_by_id=request.user.pk
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Create a service key",
            "form": form,
            "issued": issued,
        }
        return TemplateResponse(request, "admin/accounts/apikey/add_service_key.html", context)


@admin.register(User)
class UserAdmin(admin.ModelAdmin[User]):
    list_display = ("email", "is_staff", "is_active", "date_joined", "last_login")
    list_filter = ("is_staff", "is_active", "groups")
    search_fields = ("email",)
    fields = ("email", "is_active", "is_staff", "is_superuser", "groups", "date_joined", "last_login")
    readonly_fields = ("email", "date_joined", "last_login")
    filter_horizontal = ("groups",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # customers sign up through the API; operators via createsuperuser / create_operator
