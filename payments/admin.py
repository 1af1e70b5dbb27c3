"""Finance's admin for payments: payments with their transitions and gateway calls, refunds
(issued from a payment's page, with a reason), disputes, the dunning policy and cases (with
pause and resume per account), inbound webhook events (with re-run), and each account's
payment profile and cards.

Nothing here changes money or state by writing a row: refunds, re-runs and pauses go through
``payments.refunds``, ``payments.webhooks`` and ``payments.services``, which log each change
with its ids and the operator. The dunning policy is data finance edits (validated here, as
the database's constraints say). Nothing secret is shown: no client secret, no authentication
URL, a webhook payload with its secrets masked, card fingerprints only to the fraud team."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from accounts import selectors as account_selectors
from billing_site.audit.admin import AuditHistoryMixin
from billing_site.common import csv_export as csv
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.admin import AmountField, HistoryInline, PartInline, RecordAdminMixin
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import ActionPermissionsMixin, require_permission
from billing_site.common.transitions import actor_log_fields
from invoicing import services as invoicing_services
from payments import refunds, services, webhooks
from payments.models import (
    BindingAttempt,
    Dispute,
    DisputeTransition,
    DunningAction,
    DunningCase,
    DunningCaseTransition,
    DunningPolicy,
    GatewayCall,
    Payment,
    PaymentMethod,
    PaymentProfile,
    PaymentStatus,
    PaymentTransition,
    Refund,
    RefundStatus,
    RefundTransition,
    WebhookEvent,
)

log = logging.getLogger(__name__)

# The operator group that may see card fingerprints (they tie cards across accounts).
FRAUD_GROUP = "fraud"
# At most this many webhook events are re-run by one click (each may call the gateway).
RERUN_LIMIT = 100
# Keys of a webhook payload whose values are never shown (Stripe puts them in intents).
SECRET_KEYS = frozenset({"client_secret", "secret", "next_action", "fingerprint"})
# The account kinds a dunning policy may be scoped to (the accounts app's kinds).
ACCOUNT_KIND_CHOICES = [("", "Any kind"), ("individual", "Individual"), ("business", "Business")]


def _operator(request: HttpRequest) -> Actor:
    return Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]


def _sees_fingerprints(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_superuser or user.groups.filter(name=FRAUD_GROUP).exists())


def _with_account_names(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """Rows named by their customer, in the same query (no foreign key across apps)."""
    return queryset.annotate(account_name=account_selectors.billing_account_name_subquery())


def _account_link(row: Any) -> str:
    """The customer's name and public id, linked to the billing account."""
    if row.account_id is None:
        return "-"
    url = reverse("backoffice:customer", args=[row.account_id])
    name = getattr(row, "account_name", None) or ""
    return format_html('<a href="{}">{}</a> {}', url, name, ids.encode("acc", row.account_id))


def _invoice_link(invoice_id: int) -> str:
    url = reverse("admin:invoicing_invoice_change", args=[invoice_id])
    return format_html('<a href="{}">{}</a>', url, ids.encode("inv", invoice_id))


def _payment_link(payment_id: int) -> str:
    url = reverse("admin:payments_payment_change", args=[payment_id])
    return format_html('<a href="{}">{}</a>', url, ids.encode("pay", payment_id))


def _masked(value: Any) -> Any:
    """A webhook payload with the values of secret keys replaced, at any depth."""
    if isinstance(value, dict):
        return {k: ("[hidden]" if k in SECRET_KEYS and v else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


class PublicIdSearchMixin:
    """Search by a public id (``pay_…``, ``inv_…``, ``acc_…``) in the column it names, else by
    the configured search fields."""

    public_id_columns: tuple[tuple[str, str], ...] = ()

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Any], search_term: str) -> Any:
        term = search_term.strip()
        for prefix, column in self.public_id_columns:
            decoded = ids.decode(prefix, term)
            if decoded is not None:
                return queryset.filter(**{column: decoded}), False
        return super().get_search_results(request, queryset, search_term)  # type: ignore[misc]


# --- Payments


class PaymentPartInline(PartInline):
    """Part of a payment's story: whoever may view the payment may view it."""

    view_permission = "payments.view_payment"


class PaymentTransitionInline(HistoryInline, admin.TabularInline[PaymentTransition, Payment]):
    model = PaymentTransition
    view_permission = "payments.view_payment"


class GatewayCallInline(PaymentPartInline, admin.TabularInline[GatewayCall, Payment]):
    model = GatewayCall
    verbose_name_plural = "Gateway calls (the attempts at the gateway)"
    fields = (
        "created_at",
        "operation",
        "refund_id_shown",
        "idempotency_key",
        "outcome",
        "gateway_object_id",
        "detail",
        "duration_ms",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[GatewayCall]:
        return super().get_queryset(request).select_related("payment", "refund")

    @admin.display(description="refund")
    def refund_id_shown(self, call: GatewayCall) -> str:
        return ids.encode("ref", call.refund_id) if call.refund_id else "-"

    @admin.display(description="idempotency key")
    def idempotency_key(self, call: GatewayCall) -> str:
        if call.refund is not None:
            return call.refund.idempotency_key
        return call.payment.idempotency_key if call.payment is not None else "-"


class RefundInline(PaymentPartInline, admin.TabularInline[Refund, Payment]):
    model = Refund
    fields = ("public_id", "amount", "reason", "status", "failure_reason", "requested_by", "created_at")

    @admin.display(description="id")
    def public_id(self, refund: Refund) -> str:
        return refund.public_id

    @admin.display(description="amount")
    def amount(self, refund: Refund) -> str:
        return money.display(refund.amount_minor, refund.currency)


class RefundForm(forms.Form):
    amount = AmountField(label="Amount")
    reason = forms.CharField(
        label="Reason (the customer's)",
        max_length=300,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Printed on the credit note and shown to the customer in the API",
    )
    internal_note = forms.CharField(
        label="Internal note (staff only)",
        max_length=1000,
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Ticket numbers, what was agreed: shown here only, never to the customer",
    )

    def __init__(self, *args: Any, payment: Payment, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["amount"]
        assert isinstance(field, AmountField)
        field.currency = payment.currency  # the currency's places: 21.00 EUR, 2100 JPY
        field.help_text = f"In {payment.currency} (major units, plain decimal notation), VAT included"


@admin.register(Payment)
class PaymentAdmin(
    AuditHistoryMixin, csv.CsvExportMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[Payment]
):
    csv_columns = (
        ("payment_id", csv.attr("public_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("invoice_id", csv.public_id("inv", "invoice_id")),
        ("attempt", csv.attr("attempt")),
        ("trigger", csv.attr("trigger")),
        ("status", csv.attr("status")),
        ("currency", csv.attr("currency")),
        ("amount", csv.amount("amount_minor")),
        ("refunded", csv.amount("amount_refunded_minor")),
        ("disputed", csv.amount("amount_disputed_minor")),
        ("gateway", csv.attr("gateway")),
        ("decline_code", csv.attr("decline_code")),
        ("created_at", csv.attr("created_at")),
        ("completed_at", csv.attr("completed_at")),
    )
    public_id_columns = (("pay", "id"), ("inv", "invoice_id"), ("acc", "account_id"))
    list_display = (
        "public_id",
        "account",
        "invoice",
        "amount",
        "status",
        "gateway",
        "decline_code",
        "attempt",
        "created_at",
        "updated_at",
    )
    list_filter = ("status", "gateway", "currency", "trigger", ("created_at", admin.DateFieldListFilter))
    search_fields = ("=gateway_intent_id", "=gateway_charge_id")
    search_help_text = "A pay_, inv_ or acc_ id, or the gateway's intent or charge id (pi_…, ch_…)"
    ordering = ("-created_at",)
    show_full_result_count = False
    list_per_page = 50
    change_form_template = "admin/payments/payment/change_form.html"
    inlines = (PaymentTransitionInline, GatewayCallInline, RefundInline)
    # Never the client secret or the authentication URL: they let someone act as the customer.
    fields = (
        "public_id",
        "status",
        "account",
        "invoice",
        "attempt",
        "trigger",
        "amount",
        "refunded",
        "disputed",
        "card",
        "gateway",
        "gateway_customer_id",
        "gateway_intent_id",
        "gateway_charge_id",
        "idempotency_key",
        "decline_code",
        "decline_message",
        "retryable",
        "created_at",
        "sent_at",
        "completed_at",
        "updated_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Payment]:
        return _with_account_names(super().get_queryset(request).select_related("payment_method"))

    @admin.display(description="id")
    def public_id(self, payment: Payment) -> str:
        return payment.public_id

    @admin.display(description="customer", ordering="account_name")
    def account(self, payment: Payment) -> str:
        return _account_link(payment)

    @admin.display(description="invoice", ordering="invoice_id")
    def invoice(self, payment: Payment) -> str:
        return _invoice_link(payment.invoice_id)

    @admin.display(description="amount", ordering="amount_minor")
    def amount(self, payment: Payment) -> str:
        return money.display(payment.amount_minor, payment.currency)

    @admin.display(description="refunded")
    def refunded(self, payment: Payment) -> str:
        return money.display(payment.amount_refunded_minor, payment.currency)

    @admin.display(description="disputed")
    def disputed(self, payment: Payment) -> str:
        return money.display(payment.amount_disputed_minor, payment.currency)

    @admin.display(description="card")
    def card(self, payment: Payment) -> str:
        return str(payment.payment_method) if payment.payment_method else "-"

    def may_refund(self, request: HttpRequest, payment: Payment) -> bool:
        return request.user.has_perm("payments.issue_refund") and payment.status == PaymentStatus.SUCCEEDED

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        payment = self.get_object(request, object_id)
        extra = {**(extra_context or {})}
        if payment is not None:
            extra["may_refund"] = self.may_refund(request, payment)
            extra["approval_requests"] = [
                (r, money.display(r.amount_minor, r.currency))
                for r in invoicing_services.approval_requests_for(payment_id=payment.id)
            ]
        return super().change_view(request, object_id, form_url, extra)

    def get_urls(self) -> list[URLPattern]:
        custom = [
            path(
                "<int:object_id>/refund/",
                self.admin_site.admin_view(self.refund_view),
                name="payments_payment_refund",
            )
        ]
        return custom + super().get_urls()

    def refund_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """Refund part or all of a succeeded payment to its card, with a reason: the refund is
        sent at once; its credit note and ledger entry follow when the gateway confirms it."""
        require_permission(request, "payments.issue_refund", action="A refund")
        payment = get_object_or_404(Payment, pk=object_id)
        change_url = reverse("admin:payments_payment_change", args=[payment.pk])
        form = RefundForm(request.POST or None, payment=payment)
        if request.method == "POST" and form.is_valid():
            amount_minor = money.to_minor(form.cleaned_data["amount"], payment.currency)
            try:
                refund = refunds.refund_submit(
                    payment_id=payment.id,
                    amount_minor=amount_minor,
                    reason=form.cleaned_data["reason"],
                    internal_note=form.cleaned_data["internal_note"],
                    actor=_operator(request),
                )
            except ApplicationError as exc:
                messages.error(request, exc.message)
            else:
                if isinstance(refund, Refund):
                    self._report_refund(request, refund)
                else:  # above the four-eyes threshold: a request, nothing refunded yet
                    messages.warning(
                        request,
                        f"A refund of {money.display(amount_minor, payment.currency)} is above the four-eyes "
                        f"threshold: request {refund.public_id} awaits a second finance user's approval.",
                    )
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "original": payment,
            "title": f"Refund {payment.public_id}",
            "form": form,
            "change_url": change_url,
            "amount": money.display(payment.amount_minor, payment.currency),
            "refunded": money.display(payment.amount_refunded_minor, payment.currency),
            "refundable": money.display(max(refunds.refundable_minor(payment), 0), payment.currency),
        }
        return TemplateResponse(request, "admin/payments/payment/refund.html", context)

    @staticmethod
    def _report_refund(request: HttpRequest, refund: Refund) -> None:
        amount = money.display(refund.amount_minor, refund.currency)
        payment = ids.encode("pay", refund.payment_id)
        if refund.status == RefundStatus.SUCCEEDED:
            messages.success(request, f"Refunded {amount} on {payment} ({refund.public_id}); a credit note was issued.")
        elif refund.status == RefundStatus.FAILED:
            messages.error(request, f"The refund of {amount} on {payment} failed: {refund.failure_reason}")
        else:
            messages.warning(
                request,
                f"The refund of {amount} on {payment} ({refund.public_id}) is {refund.status}: the gateway's answer "
                "has not arrived; the reconciler settles it within minutes.",
            )


class RefundTransitionInline(HistoryInline, admin.TabularInline[RefundTransition, Refund]):
    model = RefundTransition
    view_permission = "payments.view_refund"


@admin.register(Refund)
class RefundAdmin(
    AuditHistoryMixin, csv.CsvExportMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[Refund]
):
    csv_columns = (
        ("refund_id", csv.attr("public_id")),
        ("payment_id", csv.public_id("pay", "payment_id")),
        ("invoice_id", csv.public_id("inv", "invoice_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("currency", csv.attr("currency")),
        ("amount", csv.amount("amount_minor")),
        ("reason", csv.attr("reason")),
        ("status", csv.attr("status")),
        ("requested_by", csv.attr("requested_by")),
        ("created_at", csv.attr("created_at")),
        ("completed_at", csv.attr("completed_at")),
    )
    public_id_columns = (
        ("ref", "id"),
        ("pay", "payment_id"),
        ("inv", "invoice_id"),
        ("acc", "account_id"),
    )
    list_display = (
        "public_id",
        "payment_shown",
        "invoice",
        "account",
        "amount",
        "reason",
        "status",
        "requested_by",
        "created_at",
    )
    list_filter = ("status", "currency", ("created_at", admin.DateFieldListFilter))
    search_fields = ("=gateway_refund_id", "reason")
    search_help_text = "A ref_, pay_, inv_ or acc_ id, the gateway's refund id (re_…), or words of the reason"
    ordering = ("-created_at",)
    show_full_result_count = False
    inlines = (RefundTransitionInline,)
    fields = (
        "public_id",
        "status",
        "payment_shown",
        "invoice",
        "account",
        "amount",
        "reason",
        "internal_note",
        "requested_by",
        "gateway_refund_id",
        "idempotency_key",
        "credit_note",
        "failure_reason",
        "created_at",
        "completed_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Refund]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="id")
    def public_id(self, refund: Refund) -> str:
        return refund.public_id

    @admin.display(description="payment", ordering="payment_id")
    def payment_shown(self, refund: Refund) -> str:
        return _payment_link(refund.payment_id)

    @admin.display(description="invoice", ordering="invoice_id")
    def invoice(self, refund: Refund) -> str:
        return _invoice_link(refund.invoice_id)

    @admin.display(description="customer", ordering="account_name")
    def account(self, refund: Refund) -> str:
        return _account_link(refund)

    @admin.display(description="amount", ordering="amount_minor")
    def amount(self, refund: Refund) -> str:
        return money.display(refund.amount_minor, refund.currency)

    @admin.display(description="credit note")
    def credit_note(self, refund: Refund) -> str:
        if not refund.credit_note_id:
            return "-"
        url = reverse("admin:invoicing_creditnote_change", args=[refund.credit_note_id])
        return format_html('<a href="{}">{}</a>', url, ids.encode("crn", refund.credit_note_id))


class DisputeTransitionInline(HistoryInline, admin.TabularInline[DisputeTransition, Dispute]):
    model = DisputeTransition
    view_permission = "payments.view_dispute"


@admin.register(Dispute)
class DisputeAdmin(
    AuditHistoryMixin, csv.CsvExportMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[Dispute]
):
    csv_columns = (
        ("dispute_id", csv.attr("public_id")),
        ("payment_id", csv.public_id("pay", "payment_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        ("currency", csv.attr("currency")),
        ("amount", csv.amount("amount_minor")),
        ("reason", csv.attr("reason")),
        ("status", csv.attr("status")),
        ("opened_at", csv.attr("opened_at")),
        ("closed_at", csv.attr("closed_at")),
    )
    public_id_columns = (("dsp", "id"), ("pay", "payment_id"), ("acc", "account_id"))
    list_display = ("public_id", "payment_shown", "account", "amount", "reason", "status", "opened_at", "closed_at")
    list_filter = ("status", "reason", "gateway", "currency", ("opened_at", admin.DateFieldListFilter))
    search_fields = ("=gateway_dispute_id",)
    search_help_text = "A dsp_, pay_ or acc_ id, or the gateway's dispute id (dp_…)"
    ordering = ("-opened_at",)
    inlines = (DisputeTransitionInline,)
    fields = (
        "public_id",
        "status",
        "payment_shown",
        "account",
        "amount",
        "reason",
        "gateway",
        "gateway_dispute_id",
        "opened_at",
        "closed_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Dispute]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="id")
    def public_id(self, dispute: Dispute) -> str:
        return dispute.public_id

    @admin.display(description="payment", ordering="payment_id")
    def payment_shown(self, dispute: Dispute) -> str:
        return _payment_link(dispute.payment_id)

    @admin.display(description="customer", ordering="account_name")
    def account(self, dispute: Dispute) -> str:
        return _account_link(dispute)

    @admin.display(description="amount", ordering="amount_minor")
    def amount(self, dispute: Dispute) -> str:
        return money.display(dispute.amount_minor, dispute.currency)


# --- Dunning


class DunningPolicyForm(forms.ModelForm[DunningPolicy]):
    account_kind = forms.ChoiceField(choices=ACCOUNT_KIND_CHOICES, required=False, label="Account kind")

    class Meta:
        model = DunningPolicy
        fields = (
            "name",
            "currency",
            "account_kind",
            "retry_days",
            "email_on_failure",
            "warn_days_before_suspension",
            "suspend_after_days",
            "write_off_after_days",
            "is_active",
        )

    def clean_currency(self) -> str:
        currency = str(self.cleaned_data.get("currency") or "").strip().upper()
        if currency:
            try:
                money.exponent(currency)
            except ValueError:
                raise forms.ValidationError(
                    f"{currency} is not an ISO 4217 currency code: enter three letters such as EUR, or leave it blank."
                ) from None
        return currency

    # The ladder's rules are the model's (DunningPolicy.ladder_errors, run by the form's model
    # validation): each error is shown on the field it names.


@admin.register(DunningPolicy)
class DunningPolicyAdmin(AuditHistoryMixin, admin.ModelAdmin[DunningPolicy]):
    """The policy is data finance edits; the daily run reads it. Policies are switched off
    (``is_active``), never deleted: a case's history was made under one."""

    form = DunningPolicyForm
    list_display = (
        "name",
        "currency_shown",
        "kind_shown",
        "retry_days_shown",
        "email_on_failure",
        "warn_days_before_suspension",
        "suspend_after_days",
        "write_off_after_days",
        "is_active",
        "updated_at",
    )
    list_filter = ("is_active", "currency", "account_kind")
    ordering = ("-is_active", "currency", "account_kind", "name")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="currency", ordering="currency")
    def currency_shown(self, policy: DunningPolicy) -> str:
        return policy.currency or "any"

    @admin.display(description="account kind", ordering="account_kind")
    def kind_shown(self, policy: DunningPolicy) -> str:
        return policy.account_kind or "any"

    @admin.display(description="retries (days after the first failure)")
    def retry_days_shown(self, policy: DunningPolicy) -> str:
        return ", ".join(str(d) for d in policy.retry_days) or "none"

    def save_model(self, request: HttpRequest, obj: DunningPolicy, form: Any, change: bool) -> None:
        services.dunning_policy_save(policy=obj, changed=list(form.changed_data), actor=_operator(request))


class DunningPauseForm(forms.Form):
    reason = forms.CharField(max_length=300, required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args: Any, paused: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reason"].required = paused
        self.fields["reason"].help_text = (
            "Why dunning stops for these accounts (kept on each account's payment profile)"
            if paused
            else "Optional: why dunning resumes"
        )


class DunningPauseActionsMixin(ActionPermissionsMixin):
    """ "Pause dunning" / "Resume dunning" for the accounts of the selected rows (cases or
    payment profiles), with a reason asked on an intermediate page; each account through
    ``payments.services.dunning_pause``."""

    action_permissions = {"pause_dunning": "payments.pause_dunning", "resume_dunning": "payments.pause_dunning"}

    def has_pause_dunning_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.pause_dunning")

    @admin.action(description="Pause dunning for these accounts", permissions=["pause_dunning"])
    def pause_dunning(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._dunning_pause(request, queryset, paused=True, action="pause_dunning")

    @admin.action(description="Resume dunning for these accounts", permissions=["pause_dunning"])
    def resume_dunning(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._dunning_pause(request, queryset, paused=False, action="resume_dunning")

    def _dunning_pause(
        self, request: HttpRequest, queryset: QuerySet[Any], *, paused: bool, action: str
    ) -> HttpResponse | None:
        account_ids = sorted(set(queryset.values_list("account_id", flat=True)))
        applying = "apply" in request.POST
        form = DunningPauseForm(request.POST if applying else None, paused=paused)
        if applying and form.is_valid():
            done, refused = [], []
            for account_id in account_ids:
                try:
                    services.dunning_pause(
                        account_id=account_id,
                        paused=paused,
                        reason=form.cleaned_data["reason"],
                        actor=_operator(request),
                    )
                except ApplicationError as exc:
                    refused.append(f"Account {ids.encode('acc', account_id)}: {exc.message}")
                else:
                    done.append(ids.encode("acc", account_id))
            verb = "paused" if paused else "resumed"
            if done:
                messages.success(request, f"Dunning {verb} for {len(done)} account(s): {', '.join(done)}.")
            for line in refused:
                messages.error(request, line)
            return None  # back to the list
        context = {
            **self.admin_site.each_context(request),  # type: ignore[attr-defined]
            "opts": self.model._meta,  # type: ignore[attr-defined]
            "title": ("Pause" if paused else "Resume") + " dunning",
            "paused": paused,
            "accounts": [ids.encode("acc", a) for a in account_ids],
            "form": form,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
        }
        return TemplateResponse(request, "admin/payments/dunning_pause.html", context)


class DunningActionInline(PartInline, admin.TabularInline[DunningAction, DunningCase]):
    model = DunningAction
    view_permission = "payments.view_dunningcase"
    verbose_name_plural = "What dunning did"
    fields = ("created_at", "action", "detail")


class DunningCaseTransitionInline(HistoryInline, admin.TabularInline[DunningCaseTransition, DunningCase]):
    model = DunningCaseTransition
    view_permission = "payments.view_dunningcase"


def _dunning_paused_subquery() -> Subquery:
    return Subquery(PaymentProfile.objects.filter(account_id=OuterRef("account_id")).values("dunning_paused")[:1])


@admin.register(DunningCase)
class DunningCaseAdmin(
    AuditHistoryMixin,
    csv.CsvExportMixin,
    DunningPauseActionsMixin,
    PublicIdSearchMixin,
    RecordAdminMixin,
    admin.ModelAdmin[DunningCase],
):
    csv_columns = (
        ("invoice_id", csv.public_id("inv", "invoice_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("status", csv.attr("status")),
        ("currency", csv.attr("currency")),
        ("first_failure_at", csv.attr("first_failure_at")),
        ("due_at", csv.attr("due_at")),
        ("retries_done", csv.attr("retries_done")),
        ("last_decline_code", csv.attr("last_decline_code")),
        ("suspended_account", csv.attr("suspended_account")),
        ("opened_at", csv.attr("opened_at")),
        ("closed_at", csv.attr("closed_at")),
    )
    public_id_columns = (("inv", "invoice_id"), ("acc", "account_id"))
    list_display = (
        "invoice",
        "account",
        "status",
        "currency",
        "first_failure_at",
        "due_at",
        "retries_done",
        "last_decline_code",
        "retryable",
        "suspended_account",
        "paused",
        "opened_at",
        "closed_at",
    )
    list_filter = ("status", "suspended_account", "retryable", "currency", ("opened_at", admin.DateFieldListFilter))
    search_fields = ("=last_decline_code",)
    search_help_text = "An inv_ or acc_ id, or a decline code"
    ordering = ("-opened_at",)
    show_full_result_count = False
    inlines = (DunningActionInline, DunningCaseTransitionInline)
    actions = ("pause_dunning", "resume_dunning")
    fields = (
        "invoice",
        "account",
        "status",
        "currency",
        "first_failure_at",
        "due_at",
        "retries_done",
        "last_decline_code",
        "retryable",
        "suspended_account",
        "paused",
        "opened_at",
        "closed_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[DunningCase]:
        return _with_account_names(super().get_queryset(request)).annotate(paused=_dunning_paused_subquery())

    @admin.display(description="invoice", ordering="invoice_id")
    def invoice(self, case: DunningCase) -> str:
        return _invoice_link(case.invoice_id)

    @admin.display(description="customer", ordering="account_name")
    def account(self, case: DunningCase) -> str:
        return _account_link(case)

    @admin.display(description="dunning paused", boolean=True)
    def paused(self, case: DunningCase) -> bool:
        return bool(getattr(case, "paused", False))


@admin.register(PaymentProfile)
class PaymentProfileAdmin(
    AuditHistoryMixin, DunningPauseActionsMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[PaymentProfile]
):
    """An account's gateway, its customer there, its dunning switch and its cards."""

    public_id_columns = (("acc", "account_id"),)
    list_display = (
        "account",
        "gateway",
        "gateway_customer_id",
        "dunning_paused",
        "dunning_paused_reason",
        "created_at",
        "updated_at",
    )
    list_filter = ("gateway", "dunning_paused")
    search_fields = ("=gateway_customer_id",)
    search_help_text = "An acc_ id, or the gateway's customer id (cus_…)"
    ordering = ("-created_at",)
    change_form_template = "admin/payments/paymentprofile/change_form.html"
    actions = ("pause_dunning", "resume_dunning")
    fields = (
        "account",
        "gateway",
        "gateway_customer_id",
        "dunning_paused",
        "dunning_paused_reason",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[PaymentProfile]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="customer", ordering="account_name")
    def account(self, profile: PaymentProfile) -> str:
        return _account_link(profile)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        profile = self.get_object(request, object_id)
        extra = {**(extra_context or {})}
        if profile is not None:
            methods = PaymentMethod.objects.filter(account_id=profile.account_id).order_by("-created_at", "-id")
            extra["payment_methods"] = [
                (method, reverse("admin:payments_paymentmethod_change", args=[method.pk])) for method in methods
            ]
            extra["may_view_methods"] = request.user.has_perm("payments.view_paymentmethod")
        return super().change_view(request, object_id, form_url, extra)


# --- Cards


class PaymentMethodStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("detached", "Detached")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[PaymentMethod]) -> QuerySet[PaymentMethod]:
        if self.value() == "active":
            return queryset.filter(detached_at__isnull=True)
        if self.value() == "detached":
            return queryset.filter(detached_at__isnull=False)
        return queryset


@admin.register(PaymentMethod)
class PaymentMethodAdmin(AuditHistoryMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[PaymentMethod]):
    """Cards as the gateway describes them. The fingerprint ties one card across accounts: the
    fraud team's tool, shown to nobody else."""

    public_id_columns = (("pmt", "id"), ("acc", "account_id"))
    list_display = ("public_id", "account", "brand", "last4", "expiry", "is_default", "status", "created_at")
    list_filter = (PaymentMethodStatusFilter, "is_default", "brand", "gateway", "funding")
    search_fields = ("=gateway_payment_method_id", "=last4")
    search_help_text = "A pmt_ or acc_ id, the gateway's payment method id (pm_…), or the last 4 digits"
    ordering = ("-created_at",)
    show_full_result_count = False
    base_fields = (
        "public_id",
        "account",
        "brand",
        "last4",
        "expiry",
        "funding",
        "issuer_country",
        "is_default",
        "status",
        "gateway",
        "gateway_payment_method_id",
        "created_at",
        "detached_at",
    )
    readonly_fields = (*base_fields, "fingerprint")

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (*self.base_fields, "fingerprint") if _sees_fingerprints(request) else self.base_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[PaymentMethod]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="id")
    def public_id(self, method: PaymentMethod) -> str:
        return method.public_id

    @admin.display(description="customer", ordering="account_name")
    def account(self, method: PaymentMethod) -> str:
        return _account_link(method)

    @admin.display(description="expiry")
    def expiry(self, method: PaymentMethod) -> str:
        return f"{method.exp_month:02d}/{method.exp_year}"

    @admin.display(description="status")
    def status(self, method: PaymentMethod) -> str:
        return "active" if method.is_active else "detached"


@admin.register(BindingAttempt)
class BindingAttemptAdmin(PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[BindingAttempt]):
    public_id_columns = (("acc", "account_id"),)
    list_display = ("setup_intent_id", "account", "status", "failure_code", "card", "client_ip", "created_at")
    list_filter = ("status", "gateway", ("created_at", admin.DateFieldListFilter))
    search_fields = ("=setup_intent_id", "=client_ip", "=failure_code")
    search_help_text = "An acc_ id, the gateway's setup intent id (seti_…), a client IP or a failure code"
    ordering = ("-created_at",)
    show_full_result_count = False
    fields = (
        "account",
        "gateway",
        "setup_intent_id",
        "status",
        "failure_code",
        "card",
        "user_id",
        "client_ip",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[BindingAttempt]:
        return _with_account_names(super().get_queryset(request).select_related("payment_method"))

    @admin.display(description="customer", ordering="account_name")
    def account(self, attempt: BindingAttempt) -> str:
        return _account_link(attempt)

    @admin.display(description="card")
    def card(self, attempt: BindingAttempt) -> str:
        return str(attempt.payment_method) if attempt.payment_method else "-"


# --- Webhooks


@admin.register(WebhookEvent)
class WebhookEventAdmin(ActionPermissionsMixin, PublicIdSearchMixin, RecordAdminMixin, admin.ModelAdmin[WebhookEvent]):
    public_id_columns = (("acc", "account_id"),)
    list_display = (
        "event_id",
        "type",
        "gateway",
        "status",
        "attempts",
        "error_shown",
        "account",
        "received_at",
        "processed_at",
    )
    list_filter = ("type", "status", "gateway", ("received_at", admin.DateFieldListFilter))
    search_fields = ("=event_id",)
    search_help_text = "The gateway's event id (evt_…) or an acc_ id"
    ordering = ("-received_at",)
    show_full_result_count = False
    actions = ("rerun",)
    action_permissions = {"rerun": "payments.rerun_webhookevent"}
    fields = (
        "event_id",
        "type",
        "gateway",
        "status",
        "attempts",
        "error",
        "account",
        "received_at",
        "processed_at",
        "payload_shown",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[WebhookEvent]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="customer", ordering="account_name")
    def account(self, event: WebhookEvent) -> str:
        return _account_link(event)

    @admin.display(description="error")
    def error_shown(self, event: WebhookEvent) -> str:
        return event.error if len(event.error) <= 120 else f"{event.error[:119]}…"

    @admin.display(description="payload (secrets hidden)")
    def payload_shown(self, event: WebhookEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(_masked(event.payload), indent=2, sort_keys=True))

    def has_rerun_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.rerun_webhookevent")

    @admin.action(description="Re-run the selected events", permissions=["rerun"])
    def rerun(self, request: HttpRequest, queryset: QuerySet[WebhookEvent]) -> None:
        """Process each selected event again now (idempotent: a processed event re-run changes
        nothing that was already recorded), and say how each ended."""
        pks = list(queryset.order_by("received_at", "id").values_list("id", flat=True)[: RERUN_LIMIT + 1])
        if len(pks) > RERUN_LIMIT:
            messages.warning(
                request, f"Only the first {RERUN_LIMIT} selected events were re-run; select the rest next."
            )
            pks = pks[:RERUN_LIMIT]
        outcomes: Counter[str] = Counter()
        failed = []
        for pk in pks:
            try:
                outcome = webhooks.webhook_event_rerun(pk)
            except ApplicationError as exc:
                outcome = exc.code
            outcomes[outcome] += 1
            if outcome not in ("processed", "ignored"):
                failed.append(pk)
        log.info(
            "webhook.rerun_by_operator",
            extra={"events": len(pks), "outcomes": dict(outcomes), **actor_log_fields(_operator(request))},
        )
        summary = ", ".join(f"{status} {count}" for status, count in sorted(outcomes.items()))
        if failed:
            names = ", ".join(WebhookEvent.objects.filter(id__in=failed[:10]).values_list("event_id", flat=True))
            messages.warning(request, f"Re-ran {len(pks)} event(s): {summary}. Not processed: {names}.")
        else:
            messages.success(request, f"Re-ran {len(pks)} event(s): {summary}.")
