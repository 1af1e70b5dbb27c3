"""The customer page: one page per billing account, by its public id
(``/admin/accounts/billingaccount/acc_…/``), composed from every app's selectors; its actions
(a note, pausing dunning; the lifecycle transitions through the account admin's confirmation
page) call the same services as the API.

Seen by anyone with ``accounts.view_billingaccount``; each action asks its own permission."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import selectors as account_selectors
from accounts import services as account_services
from antifraud import selectors as antifraud_selectors
from billing_site.audit import selectors as audit_selectors
from billing_site.backoffice import chart, timeline
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import require_permission
from invoicing import selectors as invoicing_selectors
from metering import selectors as metering_selectors
from payments import selectors as payment_selectors
from payments import services as payment_services

VIEW_PERMISSION = "accounts.view_billingaccount"
NOTE_PERMISSION = "accounts.add_accountnote"
AUDIT_PERMISSION = "audit.view_auditevent"
CHANGES_SHOWN = 50  # the newest changes on the page; the trail page has them all
DUNNING_PERMISSION = "payments.pause_dunning"
CHART_MONTHS = 6
ROWS = 100  # per section; each section links to its full list


class NoteForm(forms.Form):
    text = forms.CharField(label="Note", widget=forms.Textarea(attrs={"rows": 3, "cols": 80}), max_length=5000)


class DunningPauseForm(forms.Form):
    reason = forms.CharField(label="Reason", max_length=300)


def _require(request: HttpRequest, permission: str) -> None:
    require_permission(request, permission)  # refused: the page names the groups that have it


def _operator(request: HttpRequest) -> Actor:
    return Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]


def customer_url(account_id: int) -> str:
    return reverse("backoffice:customer", args=[account_id])


def _account_or_404(account_id: int) -> Any:
    account = account_selectors.billing_account_get(account_id=account_id)
    if account is None:
        raise Http404("No such billing account.")
    return account


def _admin_url(name: str, *args: Any) -> str:
    return reverse(f"admin:{name}", args=args)


def _shown(amount_minor: int, currency: str) -> str:
    return money.display(amount_minor, currency)


def _changelist(name: str, account_id: int) -> str:
    return f"{reverse(f'admin:{name}_changelist')}?q={ids.encode('acc', account_id)}"


def customer_view(request: HttpRequest, account_id: int) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    account = _account_or_404(account_id)
    return _render(request, account)


def customer_redirect(request: HttpRequest, account_id: int) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    return HttpResponseRedirect(customer_url(_account_or_404(account_id).id))


def _render(
    request: HttpRequest, account: Any, *, note_form: NoteForm | None = None, status: int = 200
) -> HttpResponse:
    user = request.user
    account_id = account.id
    loaded = timeline.Loaded(
        account=account,
        transitions=list(account_selectors.billing_account_history(account_id=account_id)[:ROWS]),
        profile_changes=list(account_selectors.billing_account_profile_changes(account_id=account_id)[:ROWS]),
        notes=list(account_selectors.account_notes(account_id=account_id)[:ROWS]),
        invoices=invoicing_selectors.invoices_for_account(account_id=account_id, limit=ROWS),
        credit_notes=invoicing_selectors.credit_notes_for_account(account_id=account_id, limit=ROWS),
        grants=invoicing_selectors.credit_grants_for_account(account_id=account_id, limit=ROWS),
        payments=payment_selectors.payments_for_account(account_id=account_id, limit=ROWS),
        refunds=payment_selectors.refunds_for_account(account_id=account_id, limit=ROWS),
        disputes=payment_selectors.disputes_for_account(account_id=account_id, limit=ROWS),
        dunning_steps=payment_selectors.dunning_steps_for_account(account_id=account_id, limit=ROWS),
    )
    risk = antifraud_selectors.review_case(account_id=account_id)
    if risk is not None:
        loaded.assessments = risk.assessments
        loaded.decisions = risk.decisions

    last = loaded.transitions[0] if loaded.transitions else None
    state = account.state_shown(reason=last.reason if last is not None and last.cause == account.state_cause else "")
    transitions = [
        t.name
        for t in account.get_available_state_transitions()
        if user.has_perm(account_services.TRANSITION_PERMISSIONS[t.name])
    ]

    invoices = [
        {
            "invoice": invoice,
            "link": _admin_url("invoicing_invoice_change", invoice.id),
            "total": _shown(invoice.total_minor, invoice.currency),
            "due": _shown(invoice.amount_outstanding_minor if invoice.status == "issued" else 0, invoice.currency),
            "overdue": invoice.status == "issued" and invoice.due_at is not None and invoice.due_at < timezone.now(),
            "pdf": _admin_url("invoicing_invoice_pdf", invoice.id) if invoice.status != "draft" else "",
        }
        for invoice in loaded.invoices
    ]
    credit_notes = [
        {
            "note": note,
            "total": _shown(note.total_minor, note.currency),
            "link": _admin_url("invoicing_creditnote_change", note.id),
            "pdf": _admin_url("invoicing_creditnote_pdf", note.id),
        }
        for note in loaded.credit_notes
    ]
    grants = [
        {
            "grant": grant,
            "amount": _shown(grant.amount_minor, grant.currency),
            "remaining": _shown(grant.remaining_minor, grant.currency),
            "link": _admin_url("invoicing_creditgrant_change", grant.id),
        }
        for grant in loaded.grants
    ]
    balances = [
        {
            "currency": currency,
            "credits": _shown(figures["credits_available"], currency),
            "outstanding": _shown(figures["outstanding"], currency),
        }
        for currency, figures in sorted(invoicing_selectors.balance(account_id=account_id).items())
    ]
    payments = [
        {
            "payment": p,
            "amount": _shown(p.amount_minor, p.currency),
            "refunded": _shown(p.amount_refunded_minor, p.currency) if p.amount_refunded_minor else "",
            "invoice": ids.encode("inv", p.invoice_id),
            "card": f"{p.payment_method.brand} •••• {p.payment_method.last4}" if p.payment_method else "",
            "link": _admin_url("payments_payment_change", p.id),
        }
        for p in loaded.payments
    ]
    refunds = [
        {"refund": r, "amount": _shown(r.amount_minor, r.currency), "link": _admin_url("payments_refund_change", r.id)}
        for r in loaded.refunds
    ]
    disputes = [
        {
            "dispute": d,
            "amount": _shown(d.amount_minor, d.currency),
            "link": _admin_url("payments_dispute_change", d.id),
        }
        for d in loaded.disputes
    ]
    months = chart.months_back(timezone.now().date(), CHART_MONTHS)
    costs = metering_selectors.monthly_cost_by_family(account_id=account_id, since=months[0])
    cost_chart = chart.cost_chart(
        [chart.CostMonth(r.month, r.family, r.amount) for r in costs], months=months, currency=account.currency
    )
    dunning = payment_selectors.dunning_state(account_id=account_id)

    context = {
        **_site_context(request),
        "title": f"{account.name} ({account.public_id})",
        "account": account,
        "state": state,
        "credit_limit": f"{money.format_amount(account.credit_limit, account.currency)} {account.currency}",
        "transitions": transitions,
        "edit_url": _admin_url("accounts_billingaccount_change", account.public_id),
        "members": list(account_selectors.member_list(account_id=account_id)),
        "api_keys": list(account_selectors.api_keys_for_account(account_id=account_id)[:ROWS]),
        "cards": payment_selectors.cards_for_account(account_id=account_id),
        "invoices": invoices,
        "credit_notes": credit_notes,
        "grants": grants,
        "balances": balances,
        "payments": payments,
        "refunds": refunds,
        "disputes": disputes,
        "dunning": dunning,
        "dunning_form": DunningPauseForm() if user.has_perm(DUNNING_PERMISSION) else None,
        "risk": risk,
        "linked": [
            (link, customer_url(ids.decode("acc", link.account) or 0)) for link in (risk.linked if risk else [])
        ],
        "cost_chart": cost_chart,
        "has_costs": bool(costs),
        "notes": loaded.notes,
        "note_form": note_form or (NoteForm() if user.has_perm(NOTE_PERMISSION) else None),
        "timeline": timeline.build(loaded),
        # The audit trail of the account's records (who changed what, before → after, why):
        # the same trail as each record's History and the trail page, newest first.
        "changes": (
            audit_selectors.account_trail(account_id=account_id, limit=CHANGES_SHOWN)
            if user.has_perm(AUDIT_PERMISSION)
            else None
        ),
        "trail_url": reverse("admin:audit_auditevent_changelist") + f"?object={account.public_id}",
        "lists": {
            "invoices": _changelist("invoicing_invoice", account_id),
            "payments": _changelist("payments_payment", account_id),
            "refunds": _changelist("payments_refund", account_id),
            "disputes": _changelist("payments_dispute", account_id),
            "grants": _changelist("invoicing_creditgrant", account_id),
        },
        "now": timezone.now(),
    }
    return TemplateResponse(request, "backoffice/customer.html", context, status=status)


def _site_context(request: HttpRequest) -> dict[str, Any]:
    from django.contrib import admin

    return {**admin.site.each_context(request)}


@require_POST
def note_add_view(request: HttpRequest, account_id: int) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    _require(request, NOTE_PERMISSION)
    account = _account_or_404(account_id)
    form = NoteForm(request.POST)
    if form.is_valid():
        try:
            account_services.account_note_add(
                account_id=account.id, text=form.cleaned_data["text"], actor=_operator(request)
            )
        except ApplicationError as exc:
            form.add_error("text", exc.message)
        else:
            messages.success(request, "Note added.")
            return HttpResponseRedirect(customer_url(account.id) + "#notes")
    return _render(request, account, note_form=form, status=400)


@require_POST
def dunning_pause_view(request: HttpRequest, account_id: int) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    _require(request, DUNNING_PERMISSION)
    account = _account_or_404(account_id)
    paused = request.POST.get("paused") == "1"
    form = DunningPauseForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A reason is required to pause or resume dunning.")
    else:
        try:
            payment_services.dunning_pause(
                account_id=account.id, paused=paused, reason=form.cleaned_data["reason"], actor=_operator(request)
            )
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Dunning {'paused' if paused else 'resumed'} for {account.name}.")
    return HttpResponseRedirect(customer_url(account.id) + "#dunning")
