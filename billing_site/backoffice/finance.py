"""Finance's money views: receivables ageing per currency (with the accounts behind each
bucket), the dunning funnel of a month, revenue invoiced and collected this month and last;
and the four-eyes requests to approve or reject.

Figures come from the apps' selectors (``invoicing.selectors.receivables_ageing``,
``receivables_bucket_accounts``, ``revenue``; ``payments.selectors.dunning_funnel``), each one
set-based statement; requests are decided through ``payments.services.approval_approve`` /
``approval_reject``. Who may: ``invoicing.view_receivables`` (finance, read-only) sees the
figures; ``invoicing.view_approvalrequest`` sees requests and ``decide_approvalrequest``
(finance) decides them. Support and fraud see none of it: receivables and revenue are
finance's numbers, and nothing on these pages helps answer a customer or judge a risk that the
customer page does not already show."""

from __future__ import annotations

import datetime as dt

from django import forms
from django.contrib import admin, messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import selectors as account_selectors
from billing_site.common import csv_export, ids, money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import require_permission
from invoicing import selectors as invoicing_selectors
from payments import selectors as payments_selectors
from payments import services as payments_services

VIEW_FIGURES = "invoicing.view_receivables"
VIEW_REQUESTS = "invoicing.view_approvalrequest"
DECIDE_REQUESTS = "invoicing.decide_approvalrequest"


def _require(request: HttpRequest, permission: str, who: str) -> None:
    """Refused unless the operator has ``permission`` (``who``: the groups that have it, as the
    docstring of each view says; the refusal page names them from the database)."""
    require_permission(request, permission)


def month_start(moment: dt.datetime) -> dt.date:
    return moment.astimezone(dt.UTC).date().replace(day=1)


def previous_month(month: dt.date) -> dt.date:
    return (month - dt.timedelta(days=1)).replace(day=1)


def _parse_month(text: str | None, default: dt.date) -> dt.date:
    if not text:
        return default
    try:
        return dt.datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        return default


def finance_view(request: HttpRequest) -> HttpResponseBase:
    """The ageing, the month's funnel (``?month=YYYY-MM``, default last month) and revenue."""
    _require(request, VIEW_FIGURES, "finance or read-only")
    now = timezone.now()
    this_month = month_start(now)
    last_month = previous_month(this_month)
    month = _parse_month(request.GET.get("month"), last_month)
    ageing = invoicing_selectors.receivables_ageing(as_of=now)
    buckets = invoicing_selectors.AGEING_BUCKETS
    if request.GET.get("export") == "ageing":
        header = ["currency", "bucket", "amount", "invoices", "accounts"]
        rows = [
            [
                row.currency,
                key,
                money.format_minor(row.buckets[key].amount_minor, row.currency),
                row.buckets[key].invoices,
                row.buckets[key].accounts,
            ]
            for row in ageing
            for key, _label, _low, _high in buckets
        ]
        return csv_export.stream_csv(f"receivables-ageing-{now:%Y%m%d}.csv", header, rows)
    ageing_rows = [
        {
            "currency": row.currency,
            "cells": [
                {
                    "key": key,
                    "amount": money.display(row.buckets[key].amount_minor, row.currency, grouped=True),
                    "invoices": row.buckets[key].invoices,
                    "accounts": row.buckets[key].accounts,
                    "url": reverse("backoffice:receivables_bucket", args=[row.currency, key]),
                }
                for key, _label, _low, _high in buckets
            ],
            "total": money.display(row.total.amount_minor, row.currency, grouped=True),
            "total_invoices": row.total.invoices,
        }
        for row in ageing
    ]
    revenue = []
    for label, start in (("This month", this_month), ("Last month", last_month)):
        for figure in invoicing_selectors.revenue(month=start):
            c = figure.currency
            revenue.append(
                {
                    "month": f"{label} ({start:%Y-%m})",
                    "currency": c,
                    "invoiced": money.display(figure.invoiced_minor, c, grouped=True),
                    "credited": money.display(figure.credited_minor, c, grouped=True),
                    "net_invoiced": money.display(figure.net_invoiced_minor, c, grouped=True),
                    "collected": money.display(figure.collected_minor, c, grouped=True),
                    "refunded": money.display(figure.refunded_minor, c, grouped=True),
                    "net_collected": money.display(figure.net_collected_minor, c, grouped=True),
                }
            )
    funnel = [
        {
            "currency": row.currency,
            "stages": [
                {
                    "key": key,
                    "invoices": row.stages[key].invoices,
                    "amount": money.display(row.stages[key].amount_minor, row.currency, grouped=True),
                }
                for key, _meaning in payments_selectors.FUNNEL_STAGES
            ],
        }
        for row in payments_selectors.dunning_funnel(month=month)
    ]
    months = [this_month]
    while len(months) < 13:
        months.append(previous_month(months[-1]))
    context = {
        **admin.site.each_context(request),
        "title": "Receivables, dunning and revenue",
        "buckets": [(key, label) for key, label, _low, _high in buckets],
        "ageing": ageing_rows,
        "as_of": now,
        "revenue": revenue,
        "funnel": funnel,
        "funnel_stages": payments_selectors.FUNNEL_STAGES,
        "month": month,
        "months": [f"{m:%Y-%m}" for m in months],
        "written_off_url": reverse("admin:invoicing_invoice_changelist") + "?status__exact=uncollectible",
    }
    return TemplateResponse(request, "backoffice/finance.html", context)


def receivables_bucket_view(request: HttpRequest, currency: str, bucket: str) -> HttpResponseBase:
    """The accounts behind one bucket of one currency, largest first; ``?format=csv``: all of them."""
    _require(request, VIEW_FIGURES, "finance or read-only")
    if bucket not in invoicing_selectors.AGEING_BUCKET_KEYS:
        raise Http404("No such ageing bucket.")
    now = timezone.now()
    label = {key: text for key, text, _l, _h in invoicing_selectors.AGEING_BUCKETS}[bucket]
    if request.GET.get("format") == "csv":
        everyone = invoicing_selectors.receivables_bucket_accounts(
            currency=currency, bucket=bucket, as_of=now, limit=None
        )
        csv_rows = (
            [
                ids.encode("acc", r.account_id),
                r.currency,
                money.format_minor(r.amount_minor, r.currency),
                r.invoices,
                r.oldest_due_at,
            ]
            for r in everyone
        )
        header = ["account_id", "currency", "amount", "invoices", "oldest_due_at"]
        return csv_export.stream_csv(f"receivables-{currency}-{bucket}-{now:%Y%m%d}.csv", header, csv_rows)
    limit = 500
    found = invoicing_selectors.receivables_bucket_accounts(currency=currency, bucket=bucket, as_of=now, limit=limit)
    profiles = account_selectors.billing_profiles(account_ids=[r.account_id for r in found])
    rows = [
        {
            "account": ids.encode("acc", r.account_id),
            "name": profiles[r.account_id].name if r.account_id in profiles else "",
            "url": reverse("admin:accounts_billingaccount_change", args=[r.account_id]),
            "invoices_url": reverse("admin:invoicing_invoice_changelist")
            + f"?q={ids.encode('acc', r.account_id)}&status__exact=issued",
            "amount": money.display(r.amount_minor, r.currency, grouped=True),
            "invoices": r.invoices,
            "oldest_due_at": r.oldest_due_at,
        }
        for r in found
    ]
    context = {
        **admin.site.each_context(request),
        "title": f"Receivables {currency}, {label}",
        "rows": rows,
        "limit": limit,
        "truncated": len(found) >= limit,
        "csv_url": reverse("backoffice:receivables_bucket", args=[currency, bucket]) + "?format=csv",
        "back_url": reverse("backoffice:finance"),
    }
    return TemplateResponse(request, "backoffice/receivables_bucket.html", context)


# --- Four-eyes requests


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    reason = forms.CharField(max_length=1000, strip=True)


def approval_list_view(request: HttpRequest) -> HttpResponse:
    """The requests (``?status=pending`` by default; ``all``), newest first, with the forms to decide."""
    _require(request, VIEW_REQUESTS, "finance or read-only")
    status = request.GET.get("status") or "pending"
    found = invoicing_selectors.approval_requests(status=None if status == "all" else status, limit=500)
    me = request.user.pk
    context = {
        **admin.site.each_context(request),
        "title": "Four-eyes requests",
        "status": status,
        "statuses": ["pending", "approved", "executed", "failed", "rejected", "all"],
        "rows": [
            {
                "request": r,
                "amount": money.display(r.amount_minor, r.currency, grouped=True),
                "account": ids.encode("acc", r.account_id),
                "account_url": reverse("admin:accounts_billingaccount_change", args=[r.account_id]),
                "subject_url": (
                    reverse("admin:payments_payment_change", args=[r.payment_id])
                    if r.payment_id
                    else reverse("admin:invoicing_invoice_change", args=[r.invoice_id])
                    if r.invoice_id
                    else ""
                ),
                "own": r.requested_by_id == me,
            }
            for r in found
        ],
        "may_decide": request.user.has_perm(DECIDE_REQUESTS),
    }
    return TemplateResponse(request, "backoffice/approval_list.html", context)


@require_POST
def approval_decide_view(request: HttpRequest, request_id: int) -> HttpResponse:
    """Approve (carried out at once) or reject one request, with a reason."""
    _require(request, DECIDE_REQUESTS, "finance")
    back = reverse("backoffice:approval_list")
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Approving or rejecting needs a reason.")
        return HttpResponseRedirect(back)
    actor = Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]
    reason = form.cleaned_data["reason"]
    try:
        if form.cleaned_data["decision"] == "approve":
            decided = payments_services.approval_approve(request_id=request_id, actor=actor, reason=reason)
        else:
            decided = payments_services.approval_reject(request_id=request_id, actor=actor, reason=reason)
    except ApplicationError as exc:
        messages.error(request, exc.message)
        return HttpResponseRedirect(back)
    amount = money.display(decided.amount_minor, decided.currency)
    shown = f"Request {decided.public_id} ({decided.get_kind_display()} of {amount})"
    if decided.status == "rejected":
        messages.success(request, f"{shown} rejected.")
    elif decided.status == "failed":
        messages.error(request, f"{shown} approved, but carrying it out failed: {decided.result}")
    else:
        messages.success(request, f"{shown} approved and carried out: {decided.result}.")
    return HttpResponseRedirect(back)
