"""The fraud team's admin: the review queue (riskiest and newest first; one page per account
with everything needed to decide, and the decisions: approve, block, request information),
the dashboard, the rules and score bands (every change a new rules version), analysts' email
domain verdicts, and the assessments. Every write goes through ``antifraud.services``."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from accounts import selectors as account_selectors
from antifraud import credit_limits, display, rule_params, selectors, services
from antifraud.models import (
    AccountRisk,
    CreditLimitPolicy,
    EmailDomain,
    ReviewAction,
    ReviewDecision,
    RiskAssessment,
    RiskRule,
    RiskSettings,
    RiskStatus,
    RulesVersion,
)
from billing_site.audit.admin import AuditHistoryMixin
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.admin import RecordAdminMixin
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import require_permission


def _operator(request: HttpRequest) -> Actor:
    return Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]


def _rules_fired(assessment: RiskAssessment | None) -> str:
    if assessment is None:
        return ""
    return ", ".join(f"{f['rule']} (+{f['weight']})" for f in assessment.fired) or "none"


def _action_label(action: ReviewAction, case: selectors.ReviewCase | None) -> str:
    """What the button says: it does what it says (approving a blocked account unblocks it)."""
    if action == ReviewAction.APPROVE and case is not None and case.state == "blocked":
        return "Approve and unblock"
    return str(action.label)


class DecisionForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Kept in the audit; for 'request information' it is the text emailed to the customer.",
    )


@admin.register(AccountRisk)
class ReviewQueueAdmin(AuditHistoryMixin, admin.ModelAdmin[AccountRisk]):
    """The review queue: accounts in review by default (the status filter shows the others)."""

    list_display = ("account", "name", "status", "score", "flagged_at", "in_queue_for", "rules")
    list_filter = ("status",)
    ordering = ("-score", "-flagged_at", "-account_id")
    search_fields = ("account_id",)
    list_select_related = ("last_assessment",)
    change_form_template = "admin/antifraud/accountrisk/review.html"
    change_list_template = "admin/antifraud/accountrisk/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # decisions go through the review actions, never by editing the row

    def get_queryset(self, request: HttpRequest) -> QuerySet[AccountRisk]:
        return super().get_queryset(request).annotate(name=account_selectors.billing_account_name_subquery())

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[AccountRisk], search_term: str) -> Any:
        term = search_term.strip()
        if term.startswith("acc_"):
            try:
                account_id = ids.decode("acc", term)
            except ValueError:
                account_id = None
            return (queryset.filter(account_id=account_id) if account_id else queryset.none()), False
        return super().get_search_results(request, queryset, search_term)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        if not request.GET:  # the queue itself unless the analyst filters otherwise
            return HttpResponseRedirect(f"{request.path}?status__exact={RiskStatus.REVIEW}")
        extra = {**(extra_context or {}), "dashboard_url": reverse("admin:antifraud_accountrisk_dashboard")}
        return super().changelist_view(request, extra)

    @admin.display(description="account", ordering="account_id")
    def account(self, obj: AccountRisk) -> str:
        return ids.encode("acc", obj.account_id)

    @admin.display(description="name")
    def name(self, obj: AccountRisk) -> str:
        return getattr(obj, "name", "") or ""

    @admin.display(description="in queue for")
    def in_queue_for(self, obj: AccountRisk) -> str:
        if obj.status != RiskStatus.REVIEW or obj.flagged_at is None:
            return ""
        return display.wait(timezone.now() - obj.flagged_at)

    @admin.display(description="rules fired (last assessment)")
    def rules(self, obj: AccountRisk) -> str:
        return _rules_fired(obj.last_assessment)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        risk = self.get_object(request, object_id)
        extra = {**(extra_context or {})}
        if risk is not None:
            case = extra["case"] = selectors.review_case(account_id=risk.account_id)
            if case is not None and case.spending_cap is not None:
                policy = credit_limits.credit_policy_for(currency=case.currency, kind=case.kind, country=case.country)
                extra["cap_held_at_spend"] = policy is not None and case.spending_cap > policy.initial_limit
                extra["cap_policy_limit"] = policy.initial_limit if policy is not None else None
            if case is not None:  # the page is the account's: its public id and name, not our key
                extra["title"] = f"Review: {case.name} ({case.account})"
                extra["subtitle"] = None
            extra["may_decide"] = request.user.has_perm("antifraud.review_account")
            extra["actions"] = [(a.value, _action_label(a, extra["case"])) for a in ReviewAction]
            extra["form"] = DecisionForm()
        return super().change_view(request, object_id, form_url, extra)

    def get_urls(self) -> list[URLPattern]:
        custom = [
            path(
                "<int:object_id>/decide/<str:action>/",
                self.admin_site.admin_view(self.decide_view),
                name="antifraud_accountrisk_decide",
            ),
            path("dashboard/", self.admin_site.admin_view(self.dashboard_view), name="antifraud_accountrisk_dashboard"),
        ]
        return custom + super().get_urls()

    def decide_view(self, request: HttpRequest, object_id: int, action: str) -> HttpResponse:
        require_permission(request, "antifraud.review_account", action="A review decision")
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])  # posted from the review page
        risk = get_object_or_404(AccountRisk, pk=object_id)
        change_url = reverse("admin:antifraud_accountrisk_change", args=[risk.pk])
        form = DecisionForm(request.POST)
        if not form.is_valid():
            messages.error(request, "A reason is required.")
            return HttpResponseRedirect(change_url)
        reason = form.cleaned_data["reason"]
        actor = _operator(request)
        account = ids.encode("acc", risk.account_id)
        try:
            if action == ReviewAction.APPROVE:
                unblocking = services.unblock_target(account_id=risk.account_id) is not None
                services.review_approve(account_id=risk.account_id, actor=actor, reason=reason)
                messages.success(request, f"Account {account} approved{' and unblocked' if unblocking else ''}.")
            elif action == ReviewAction.BLOCK:
                services.review_block(account_id=risk.account_id, actor=actor, reason=reason)
                messages.success(request, f"Account {account} blocked.")
            elif action == ReviewAction.REQUEST_INFO:
                services.review_request_info(account_id=risk.account_id, actor=actor, message=reason)
                messages.success(request, f"Account {account}: the customer was asked for more information.")
            else:
                raise PermissionDenied
        except ApplicationError as exc:
            messages.error(request, exc.message)
        return HttpResponseRedirect(change_url)

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        require_permission(request, "antifraud.view_accountrisk", action="The fraud dashboard")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Fraud review: dashboard",
            "board": selectors.dashboard(),
            "queue_url": reverse("admin:antifraud_accountrisk_changelist"),
        }
        return TemplateResponse(request, "admin/antifraud/accountrisk/dashboard.html", context)


class RiskRuleForm(forms.ModelForm[RiskRule]):
    """A rule's switch, weight and parameters; the parameters checked against the rule's schema
    (the error names each bad parameter) before anything is saved."""

    class Meta:
        model = RiskRule
        fields = ("enabled", "weight", "params")

    def clean_params(self) -> Any:
        params = self.cleaned_data.get("params")
        try:
            services.rule_params_check(code=self.instance.code, params=params)
        except ApplicationError as exc:
            raise forms.ValidationError(
                [
                    e["message"] if e["field"] == "params" else f"{e['field'].removeprefix('params.')}: {e['message']}"
                    for e in exc.errors
                ]
            ) from exc
        return params


@admin.register(RiskRule)
class RiskRuleAdmin(AuditHistoryMixin, admin.ModelAdmin[RiskRule]):
    """Rules are code; their switches, weights and thresholds are data, written through
    ``services.risk_rule_update`` (schema-checked, a new rules version as the audit row)."""

    form = RiskRuleForm
    list_display = ("code", "enabled", "weight", "params", "updated_at")
    list_filter = ("enabled",)
    readonly_fields = ("code", "parameters")
    fields = ("code", "enabled", "weight", "params", "parameters")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the rules are code; their switches and thresholds are data

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="parameters it reads")
    def parameters(self, obj: RiskRule) -> str:
        schema = rule_params.RULE_PARAMS.get(obj.code, {})
        if not schema:
            return "none"
        return format_html_join(
            "", "<div><code>{}</code> ({}): {}</div>", ((n, p.kind.value, p.help) for n, p in schema.items())
        )

    def save_model(self, request: HttpRequest, obj: RiskRule, form: Any, change: bool) -> None:
        version = services.risk_rule_update(
            code=obj.code,
            actor=_operator(request),
            enabled=form.cleaned_data["enabled"],
            weight=form.cleaned_data["weight"],
            params=form.cleaned_data["params"],
        )
        obj.refresh_from_db()
        messages.info(request, f"Rules version {version} is in force.")


@admin.register(RiskSettings)
class RiskSettingsAdmin(AuditHistoryMixin, admin.ModelAdmin[RiskSettings]):
    list_display = ("__str__", "review_score", "block_score", "version", "updated_at")
    fields = ("review_score", "block_score", "version")
    readonly_fields = ("version",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: RiskSettings, form: Any, change: bool) -> None:
        version = services.risk_settings_update(
            actor=_operator(request),
            review_score=form.cleaned_data["review_score"],
            block_score=form.cleaned_data["block_score"],
        )
        obj.refresh_from_db()
        messages.info(request, f"Rules version {version} is in force.")


@admin.register(RulesVersion)
class RulesVersionAdmin(RecordAdminMixin, admin.ModelAdmin[RulesVersion]):
    list_display = ("version", "created_by", "created_at")
    readonly_fields = ("version", "snapshot", "created_by", "created_at")


@admin.register(EmailDomain)
class EmailDomainAdmin(AuditHistoryMixin, admin.ModelAdmin[EmailDomain]):
    list_display = ("domain", "verdict", "reason", "created_by", "created_at")
    list_filter = ("verdict",)
    search_fields = ("domain",)
    fields = ("domain", "verdict", "reason")

    def save_model(self, request: HttpRequest, obj: EmailDomain, form: Any, change: bool) -> None:
        obj.domain = obj.domain.strip().lower()
        if not change:
            obj.created_by = str(request.user)
        super().save_model(request, obj, form, change)


@admin.register(RiskAssessment)
class RiskAssessmentAdmin(RecordAdminMixin, admin.ModelAdmin[RiskAssessment]):
    list_display = ("id", "account", "checkpoint", "decision", "score", "rules", "rules_version", "created_at")
    list_filter = ("checkpoint", "decision", "rules_version")
    date_hierarchy = "created_at"
    readonly_fields = ("account_id", "checkpoint", "score", "decision", "evidence", "rules_version", "created_at")
    exclude = ("fired",)

    @admin.display(description="account", ordering="account_id")
    def account(self, obj: RiskAssessment) -> str:
        return ids.encode("acc", obj.account_id)

    @admin.display(description="rules fired")
    def rules(self, obj: RiskAssessment) -> str:
        return _rules_fired(obj)

    @admin.display(description="evidence")
    def evidence(self, obj: RiskAssessment) -> str:
        fired = format_html_join(
            "",
            "<li><b>{}</b> (+{}){}<ul>{}</ul></li>",
            (
                (
                    f["rule"],
                    f["weight"],
                    f", insists on {f['insists']}" if f.get("insists") else "",
                    format_html_join("", "<li>{}: {}</li>", display.evidence_rows(f["evidence"])),
                )
                for f in obj.fired
            ),
        )
        skipped = format_html_join(
            "", "<li><b>{}</b> skipped (not evaluated): {}</li>", ((s["rule"], s["error"]) for s in obj.skipped)
        )
        return format_html("<ul>{}{}</ul>", fired, skipped) if obj.fired or obj.skipped else "none"


@admin.register(ReviewDecision)
class ReviewDecisionAdmin(RecordAdminMixin, admin.ModelAdmin[ReviewDecision]):
    list_display = ("created_at", "account", "action", "analyst_name", "reason")
    list_filter = ("action",)
    date_hierarchy = "created_at"

    @admin.display(description="account", ordering="account_id")
    def account(self, obj: ReviewDecision) -> str:
        return ids.encode("acc", obj.account_id)


@admin.register(CreditLimitPolicy)
class CreditLimitPolicyAdmin(AuditHistoryMixin, admin.ModelAdmin[CreditLimitPolicy]):
    """New accounts' credit limits and how they grow (amounts in the policy's currency)."""

    list_display = (
        "name",
        "currency",
        "account_kind",
        "country",
        "initial_limit_shown",
        "raise_after_on_time_payments",
        "raise_percent",
        "max_limit_shown",
        "is_active",
    )
    list_filter = ("currency", "is_active")

    # Limits are kept with 4 places: shown as money, with the currency's places.
    @admin.display(description="initial limit", ordering="initial_limit")
    def initial_limit_shown(self, policy: CreditLimitPolicy) -> str:
        return f"{money.format_amount(policy.initial_limit, policy.currency)} {policy.currency}"

    @admin.display(description="max limit", ordering="max_limit")
    def max_limit_shown(self, policy: CreditLimitPolicy) -> str:
        return f"{money.format_amount(policy.max_limit, policy.currency)} {policy.currency}"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # switched off, never deleted: accounts' limits came from it
