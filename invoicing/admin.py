"""Finance's admin: invoices (with their lines, PDF, ledger entries and the allowed actions),
credit notes, credit grants, tax rates, contract discounts, the ledger, and the period close
with its dry-run. Every write goes through ``invoicing.services``."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from accounts import selectors as account_selectors
from billing_site.audit.admin import AuditHistoryMixin
from billing_site.common import csv_export as csv
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.admin import (
    HISTORY_FIELDS,
    AmountField,
    CountryInUseFilter,
    PartInline,
    RecordAdminMixin,
    WriteThroughServiceMixin,
    key_values,
)
from billing_site.common.errors import ApplicationError
from billing_site.common.staff import require_permission
from invoicing import selectors, services
from invoicing.line_display import quantity_text, unit_price_text
from invoicing.models import (
    GRANTABLE_CREDIT_KINDS,
    ApprovalRequest,
    ContractDiscount,
    CreditGrant,
    CreditNote,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    InvoiceTransition,
    LedgerEntry,
    LedgerLine,
    TaxRate,
)
from invoicing.periods import Period


def _operator(request: HttpRequest) -> Actor:
    return Actor.operator(request.user.pk, str(request.user))  # type: ignore[arg-type]


def approval_rows(requests: list[ApprovalRequest]) -> list[tuple[ApprovalRequest, str]]:
    """Four-eyes requests with their amounts as money, for ``backoffice/_approval_requests.html``."""
    return [(r, money.display(r.amount_minor, r.currency)) for r in requests]


def _service_error_on_form(form: forms.BaseForm, exc: ApplicationError) -> None:
    """A service's refusal shown on the form: on the field it names, if the form shows it."""
    field = exc.errors[0]["field"] if exc.errors else None
    form.add_error(field if field in form.fields else None, exc.message)


class AccountIdField(forms.CharField):
    """A billing account named by its public id (``acc_…``); ``profile`` is the account's
    billing profile once cleaned (its currency, name)."""

    profile: account_selectors.BillingProfile | None = None

    def clean(self, value: Any) -> int:
        text = super().clean(value)
        decoded = ids.decode("acc", (text or "").strip())
        if decoded is None:
            raise forms.ValidationError("Enter a billing account id (acc_…).")
        self.profile = account_selectors.billing_profiles(account_ids=[decoded]).get(decoded)
        if self.profile is None:
            raise forms.ValidationError("No such billing account.")
        return decoded


def _with_account_names(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """Rows of this app named by their customer, in the same query (no foreign key across apps)."""
    return queryset.annotate(account_name=account_selectors.billing_account_name_subquery())


def _account_link(row: Any) -> str:
    """The customer's name and public id, linked to the billing account."""
    url = reverse("backoffice:customer", args=[row.account_id])
    name = getattr(row, "account_name", None) or ""
    return format_html('<a href="{}">{}</a> {}', url, name, ids.encode("acc", row.account_id))


# How each kind of ledger source is named to people (its public id's prefix).
SOURCE_PREFIXES = {
    "invoice": "inv",
    "invoice_credit": "inv",
    "write_off": "inv",
    "credit_note": "crn",
    "credit_reversal": "crn",
    "credit_grant": "crg",
    "dispute_opened": "dsp",  # the payments app's dispute
    "dispute_won": "dsp",
    "dispute_lost": "dsp",
}

# A party's snapshot on an invoice, in the order a person reads it.
PARTY_LABELS = {
    "tax_id": "VAT number",
    "vat_id": "VAT number",
    "registration_id": "Registration number",
    "iban": "IBAN",
    "bic": "BIC",
    "bank_name": "Bank",
}
PARTY_ORDER = ("name", "account", "kind", "email", "address", "country", "tax_id", "vat_id", "registration_id")


class PeriodFilter(admin.SimpleListFilter):
    title = "period"
    parameter_name = "period"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        months = Invoice.objects.order_by("-period_start").values_list("period_start", flat=True).distinct()[:24]
        return [(f"{m:%Y-%m}", f"{m:%Y-%m}") for m in months]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Invoice]) -> QuerySet[Invoice]:
        if self.value():
            return queryset.filter(period_start=Period.parse(self.value() or "").start)
        return queryset


class OverdueFilter(admin.SimpleListFilter):
    title = "overdue"
    parameter_name = "overdue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Overdue"), ("no", "Not overdue")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Invoice]) -> QuerySet[Invoice]:
        overdue = {"status": InvoiceStatus.ISSUED, "due_at__lt": timezone.now()}
        if self.value() == "yes":
            return queryset.filter(**overdue)
        if self.value() == "no":
            return queryset.exclude(**overdue)
        return queryset


class InvoicePartInline(PartInline):
    """Part of an invoice: whoever may view the invoice may view it."""

    view_permission = "invoicing.view_invoice"


class InvoiceLineInline(InvoicePartInline, admin.TabularInline[InvoiceLine, Invoice]):
    model = InvoiceLine

    def get_queryset(self, request: HttpRequest) -> QuerySet[InvoiceLine]:
        return super().get_queryset(request).select_related("invoice")

    fields = ("position", "kind", "description", "shown_quantity", "unit", "shown_unit_price", "pricing", "amount")
    readonly_fields = fields

    @admin.display(description="quantity")
    def shown_quantity(self, line: InvoiceLine) -> str:
        return quantity_text(line.quantity) or self.get_empty_value_display()  # as on the PDF and in the API

    @admin.display(description="unit price")
    def shown_unit_price(self, line: InvoiceLine) -> str:
        return unit_price_text(line.unit_price) or self.get_empty_value_display()

    @admin.display(description="amount")
    def amount(self, line: InvoiceLine) -> str:
        return money.display(line.amount_minor, line.invoice.currency)


class InvoiceTransitionInline(InvoicePartInline, admin.TabularInline[InvoiceTransition, Invoice]):
    model = InvoiceTransition
    fields = HISTORY_FIELDS


class ReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}), max_length=1000)


# How a credit note on a paid invoice gives the money back, from this admin. A refund to the
# card is a gateway call: the payments app's (Payments → Refund), which issues the credit note.
SETTLE_CHOICES = [(services.SETTLE_CREDIT, "As customer credit")]
CARD_REFUNDS_NOTE = "Card refunds are made from Payments → Refund (the credit note is issued with the refund)."


class CreditNoteForm(ReasonForm):
    description = forms.CharField(max_length=300)
    amount = AmountField(label="Amount")
    sku = forms.ChoiceField(help_text="The invoice line whose revenue this reverses")

    def __init__(self, *args: Any, invoice: Invoice, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.invoice = invoice
        if invoice.status == InvoiceStatus.PAID:
            # Paid: what is credited goes back to the customer; here, only as credit.
            self.fields["settle"] = forms.ChoiceField(
                label="Give the money back",
                choices=SETTLE_CHOICES,
                initial=services.SETTLE_CREDIT,
                widget=forms.RadioSelect,
                help_text=CARD_REFUNDS_NOTE,
            )
        skus = sorted({sku for sku in invoice.lines.values_list("sku", flat=True) if sku})
        sku_field = self.fields["sku"]
        assert isinstance(sku_field, forms.ChoiceField)
        sku_field.choices = [(sku, sku) for sku in skus]
        amount_field = self.fields["amount"]
        assert isinstance(amount_field, AmountField)
        amount_field.currency = invoice.currency  # the invoice's places: 10.00 EUR, 1000 JPY
        amount_field.help_text = f"Net of VAT, in {invoice.currency}"


class PeriodCloseForm(forms.Form):
    period = forms.CharField(max_length=7, help_text="YYYY-MM, a month that has ended")

    def clean_period(self) -> Period:
        try:
            period = Period.parse(self.cleaned_data["period"])
            services.check_closable(period)
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message) from exc
        return period


# Which permission each invoice action needs.
ACTIONS = {
    "void": ("invoicing.issue_credit_note", "Void with a credit note"),
    "write_off": ("invoicing.write_off_invoice", "Write off"),
    "credit_note": ("invoicing.issue_credit_note", "Issue a credit note"),
}


@admin.register(Invoice)
class InvoiceAdmin(AuditHistoryMixin, csv.CsvExportMixin, RecordAdminMixin, admin.ModelAdmin[Invoice]):
    change_list_template = "admin/invoicing/invoice/change_list.html"  # with the CSV export's link
    csv_columns = (
        ("number", csv.attr("number")),
        ("invoice_id", csv.attr("public_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("period_start", csv.attr("period_start")),
        ("kind", csv.attr("kind")),
        ("status", csv.attr("status")),
        ("currency", csv.attr("currency")),
        ("subtotal", csv.amount("subtotal_minor")),
        ("tax", csv.amount("tax_minor")),
        ("total", csv.amount("total_minor")),
        ("credits_applied", csv.amount("credits_applied_minor")),
        ("paid", csv.amount("amount_paid_minor")),
        ("credited", csv.amount("amount_credited_minor")),
        ("refunded", csv.amount("amount_refunded_minor")),
        ("written_off", csv.amount("written_off_minor")),
        ("outstanding", csv.amount("amount_outstanding_minor")),
        ("issued_at", csv.attr("issued_at")),
        ("due_at", csv.attr("due_at")),
        ("paid_at", csv.attr("paid_at")),
    )
    list_display = (
        "number",
        "public_id",
        "account",
        "period_start",
        "kind",
        "status",
        "total",
        "outstanding",
        "due_at",
    )
    list_display_links = ("number", "public_id")
    list_filter = ("status", "kind", PeriodFilter, "currency", OverdueFilter, "tax_treatment")
    search_fields = ("number",)
    ordering = ("-created_at",)
    inlines = (InvoiceLineInline, InvoiceTransitionInline)
    change_form_template = "admin/invoicing/invoice/change_form.html"
    show_full_result_count = False
    fields = (
        "number",
        "status",
        "account",
        "kind",
        "period_start",
        "period_end",
        "currency",
        "subtotal",
        "tax_line",
        "tax_note",
        "total",
        "credits",
        "paid",
        "credited",
        "refunded",
        "written_off",
        "outstanding",
        "issued_at",
        "due_at",
        "paid_at",
        "buyer_details",
        "seller_details",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Invoice]:
        return _with_account_names(super().get_queryset(request))

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Invoice], search_term: str) -> Any:
        term = search_term.strip()
        for prefix, column in (("inv", "id"), ("acc", "account_id")):
            decoded = ids.decode(prefix, term)
            if decoded is not None:
                return queryset.filter(**{column: decoded}), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="id")
    def public_id(self, invoice: Invoice) -> str:
        return invoice.public_id

    @admin.display(description="customer", ordering="account_name")
    def account(self, invoice: Invoice) -> str:
        return _account_link(invoice)

    @admin.display(description="buyer (as issued)")
    def buyer_details(self, invoice: Invoice) -> str:
        return key_values(invoice.buyer, labels=PARTY_LABELS, order=PARTY_ORDER)

    @admin.display(description="seller (as issued)")
    def seller_details(self, invoice: Invoice) -> str:
        return key_values(invoice.seller, labels=PARTY_LABELS, order=PARTY_ORDER)

    @admin.display(description="subtotal")
    def subtotal(self, invoice: Invoice) -> str:
        return money.display(invoice.subtotal_minor, invoice.currency)

    @admin.display(description="VAT")
    def tax_line(self, invoice: Invoice) -> str:
        where = f" ({invoice.tax_country})" if invoice.tax_country else ""
        treatment = invoice.get_tax_treatment_display()
        return f"{money.display(invoice.tax_minor, invoice.currency)} at {invoice.tax_rate}%{where}, {treatment}"

    @admin.display(description="total", ordering="total_minor")
    def total(self, invoice: Invoice) -> str:
        return money.display(invoice.total_minor, invoice.currency)

    @admin.display(description="credits applied")
    def credits(self, invoice: Invoice) -> str:
        return money.display(invoice.credits_applied_minor, invoice.currency)

    @admin.display(description="paid")
    def paid(self, invoice: Invoice) -> str:
        return money.display(invoice.amount_paid_minor, invoice.currency)

    @admin.display(description="credit notes")
    def credited(self, invoice: Invoice) -> str:
        return money.display(invoice.amount_credited_minor, invoice.currency)

    @admin.display(description="refunded (to the card or as credit)")
    def refunded(self, invoice: Invoice) -> str:
        return money.display(invoice.amount_refunded_minor, invoice.currency)

    @admin.display(description="written off")
    def written_off(self, invoice: Invoice) -> str:
        return money.display(invoice.written_off_minor, invoice.currency)

    @admin.display(description="outstanding")
    def outstanding(self, invoice: Invoice) -> str:
        return money.display(invoice.amount_outstanding_minor, invoice.currency)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        invoice = self.get_object(request, object_id)
        extra = {**(extra_context or {})}
        if invoice is not None:
            extra["actions_allowed"] = [
                (name, label)
                for name, (perm, label) in ACTIONS.items()
                if request.user.has_perm(perm) and self._allowed(invoice, name)
            ]
            extra["ledger_entries"] = [
                (
                    entry,
                    [
                        (line.ledger_account, money.display(line.amount_minor, line.currency))
                        for line in entry.lines.all()
                    ],
                )
                for entry in selectors.ledger_entries_for_invoice(invoice_id=invoice.id)
            ]
            extra["credit_notes"] = [
                (note, money.display(note.total_minor, note.currency)) for note in invoice.credit_notes.all()
            ]
            extra["refunds"] = [
                (
                    refund,
                    money.display(refund.amount_minor, refund.currency),
                    refund.grant.public_id if refund.grant else "",
                )
                for refund in invoice.refunds.select_related("credit_note", "grant").order_by("created_at", "id")
            ]
            extra["has_pdf"] = invoice.status != InvoiceStatus.DRAFT
            extra["approval_requests"] = approval_rows(services.approval_requests_for(invoice_id=invoice.id))
        return super().change_view(request, object_id, form_url, extra)

    @staticmethod
    def _allowed(invoice: Invoice, name: str) -> bool:
        """What the invoice allows (its rules, which the services enforce)."""
        return {"void": invoice.can_void, "write_off": invoice.can_write_off, "credit_note": invoice.can_credit}[name]()

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("period-close/", view(self.period_close_view), name="invoicing_invoice_period_close"),
            path("<int:object_id>/pdf/", view(self.pdf_view), name="invoicing_invoice_pdf"),
            path("<int:object_id>/action/<str:name>/", view(self.action_view), name="invoicing_invoice_action"),
            path("credit-note/<int:note_id>/pdf/", view(self.credit_note_pdf_view), name="invoicing_creditnote_pdf"),
            *super().get_urls(),
        ]

    def pdf_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        from invoicing import pdf

        require_permission(request, "invoicing.view_invoice", action="An invoice's PDF")
        invoice = get_object_or_404(Invoice, pk=object_id)
        content = pdf.document_ensure(kind="invoice", source_id=invoice.id)
        if content is None:
            raise PermissionDenied("Drafts have no PDF.")
        return HttpResponse(content, content_type="application/pdf")

    def credit_note_pdf_view(self, request: HttpRequest, note_id: int) -> HttpResponse:
        from invoicing import pdf

        require_permission(request, "invoicing.view_creditnote", action="A credit note's PDF")
        note = get_object_or_404(CreditNote, pk=note_id)
        return HttpResponse(pdf.document_ensure(kind="credit_note", source_id=note.id), content_type="application/pdf")

    def action_view(self, request: HttpRequest, object_id: int, name: str) -> HttpResponse:
        invoice = get_object_or_404(Invoice, pk=object_id)
        if name not in ACTIONS:
            raise PermissionDenied(f"No invoice action named {name!r}.")
        require_permission(request, ACTIONS[name][0], action=f"“{ACTIONS[name][1]}”")
        form: forms.Form = (
            CreditNoteForm(request.POST or None, invoice=invoice)
            if name == "credit_note"
            else ReasonForm(request.POST or None)
        )
        change_url = reverse("admin:invoicing_invoice_change", args=[invoice.pk])
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                if name == "void":
                    note = services.invoice_void(invoice_id=invoice.id, reason=data["reason"], actor=_operator(request))
                    done = f"{invoice.number} voided with credit note {note.number}."
                elif name == "write_off":
                    written = services.invoice_write_off_submit(
                        invoice_id=invoice.id, reason=data["reason"], actor=_operator(request)
                    )
                    done = (
                        f"{invoice.number} written off."
                        if isinstance(written, Invoice)
                        else f"The write-off of {invoice.number} is above the four-eyes threshold: request "
                        f"{written.public_id} awaits a second finance user's approval."
                    )
                else:
                    amount_minor = money.to_minor(data["amount"], invoice.currency)
                    note = services.credit_note_issue(
                        invoice_id=invoice.id,
                        lines=[
                            services.CreditNoteLineIn(
                                description=data["description"], amount_minor=amount_minor, sku=data["sku"]
                            )
                        ],
                        reason=data["reason"],
                        actor=_operator(request),
                        settle=data.get("settle") or None,
                    )
                    settled = note.refunds.filter(method="credit").first()
                    done = f"Credit note {note.number} issued." + (
                        f" {money.display(settled.amount_minor, settled.currency)} kept as customer credit."
                        if settled
                        else ""
                    )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, done)
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "original": invoice,
            "title": f"{ACTIONS[name][1]}: {invoice}",
            "form": form,
            "change_url": change_url,
            "outstanding": money.display(invoice.amount_outstanding_minor, invoice.currency),
            "total": money.display(invoice.total_minor, invoice.currency),
            "settlement_note": self._settlement_note(invoice) if name == "credit_note" else "",
        }
        return TemplateResponse(request, "admin/invoicing/invoice/action.html", context)

    @staticmethod
    def _settlement_note(invoice: Invoice) -> str:
        """What happens to money a credit note gives back, said before it is issued."""
        if invoice.status == InvoiceStatus.PAID:
            return f"The invoice is paid: the credit note's amount is kept as customer credit. {CARD_REFUNDS_NOTE}"
        if invoice.amount_paid_minor:
            return (
                "Payments were received on this invoice: what the credit note credits beyond the outstanding "
                f"amount is kept as customer credit. {CARD_REFUNDS_NOTE}"
            )
        return ""

    def period_close_view(self, request: HttpRequest) -> HttpResponse:
        require_permission(request, "invoicing.close_period", action="The period close")
        form = PeriodCloseForm(request.POST or None)
        preview = None
        if request.method == "POST" and form.is_valid():
            period: Period = form.cleaned_data["period"]
            if "start" in request.POST:
                from invoicing import tasks

                result = tasks.close_period.delay(
                    period=period.label, operator_id=request.user.pk, operator_email=str(request.user)
                )
                summary = result.result if result.ready() else "started in a worker"
                messages.success(request, f"Billing run for {period}: {summary}")
                return HttpResponseRedirect(reverse("admin:invoicing_invoice_changelist") + f"?period={period}")
            report = services.period_close(period=period, actor=_operator(request), dry_run=True)
            preview = {
                "period": period.label,
                "report": report,
                "totals": [(c, money.from_minor(a, c)) for c, a in sorted(report.totals_minor.items())],
            }
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Period close",
            "form": form,
            "preview": preview,
            "last_month": Period.containing(timezone.now()).previous.label,
        }
        return TemplateResponse(request, "admin/invoicing/invoice/period_close.html", context)


@admin.register(CreditNote)
class CreditNoteAdmin(AuditHistoryMixin, csv.CsvExportMixin, admin.ModelAdmin[CreditNote]):
    csv_columns = (
        ("number", csv.attr("number")),
        ("credit_note_id", csv.attr("public_id")),
        ("invoice", lambda n: n.invoice.number),
        ("account_id", csv.public_id("acc", "account_id")),
        ("currency", csv.attr("currency")),
        ("subtotal", csv.amount("subtotal_minor")),
        ("tax", csv.amount("tax_minor")),
        ("total", csv.amount("total_minor")),
        ("reason", csv.attr("reason")),
        ("issued_by", csv.attr("issued_by")),
        ("issued_at", csv.attr("issued_at")),
    )
    list_display = ("number", "invoice", "currency", "total", "issued_at", "issued_by", "pdf")
    search_fields = ("number", "invoice__number")
    list_select_related = ("invoice",)
    readonly_fields = ("number", "invoice", "currency", "reason", "total", "issued_by", "issued_at", "pdf")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="total (incl. VAT)")
    def total(self, note: CreditNote) -> str:
        return money.display(note.total_minor, note.currency)

    @admin.display(description="PDF")
    def pdf(self, note: CreditNote) -> str:
        return format_html('<a href="{}">PDF</a>', reverse("admin:invoicing_creditnote_pdf", args=[note.pk]))


class CreditGrantForm(forms.ModelForm[CreditGrant]):
    account = AccountIdField(help_text="acc_…")
    amount = AmountField(label="Amount", help_text="In the account's currency, plain decimal notation, e.g. 25.00")
    currency = forms.CharField(
        max_length=3, required=False, help_text="ISO 4217 code, e.g. EUR; blank: the account's currency"
    )

    class Meta:
        model = CreditGrant
        fields = ("kind", "currency", "expires_at", "reason")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        kind = self.fields["kind"]
        assert isinstance(kind, forms.ChoiceField)
        # Overpayment credit is written by the services that receive the money, never by hand.
        kind.choices = [(k.value, k.label) for k in GRANTABLE_CREDIT_KINDS]

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

    def clean(self) -> dict[str, Any]:
        """The service's rules, checked here so that a mistake comes back on the form."""
        data = super().clean() or {}
        account_field = self.fields["account"]
        amount_field = self.fields["amount"]
        assert isinstance(account_field, AccountIdField) and isinstance(amount_field, AmountField)
        profile = account_field.profile if data.get("account") is not None else None
        if profile is not None and "currency" not in self.errors:
            currency = data.get("currency") or profile.currency
            data["currency"] = currency
            amount = data.get("amount")
            if currency != profile.currency:
                self.add_error(
                    "currency",
                    f"The account is billed in {profile.currency}. Credit is granted in the account's currency.",
                )
            elif amount is not None:
                try:
                    amount_field.check_places(amount, currency)
                except forms.ValidationError as exc:
                    self.add_error("amount", exc)
        expires_at = data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            self.add_error("expires_at", "The expiry must be in the future.")
        if not self.errors:
            try:
                services.credit_grant_check(
                    account_id=data["account"],
                    kind=data["kind"],
                    amount=data["amount"],
                    currency=data["currency"],
                    expires_at=expires_at,
                )
            except ApplicationError as exc:
                _service_error_on_form(self, exc)
        return data


@admin.register(CreditGrant)
class CreditGrantAdmin(AuditHistoryMixin, csv.CsvExportMixin, WriteThroughServiceMixin, admin.ModelAdmin[CreditGrant]):
    csv_columns = (
        ("grant_id", csv.attr("public_id")),
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("kind", csv.attr("kind")),
        ("currency", csv.attr("currency")),
        ("amount", csv.amount("amount_minor")),
        ("remaining", csv.amount("remaining_minor")),
        ("expires_at", csv.attr("expires_at")),
        ("reason", csv.attr("reason")),
        ("granted_by", csv.attr("granted_by")),
        ("created_at", csv.attr("created_at")),
    )
    list_display = ("public_id", "account", "kind", "amount", "remaining", "expires_at", "granted_by", "created_at")
    list_filter = ("kind", "currency")
    form = CreditGrantForm

    def get_queryset(self, request: HttpRequest) -> QuerySet[CreditGrant]:
        return _with_account_names(super().get_queryset(request))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("account", "kind", "amount", "currency", "expires_at", "reason")
        return ("account", "kind", "amount", "remaining", "currency", "expires_at", "reason", "granted_by")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.get_fields(request, obj) if obj is not None else ()

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        # A grant once written is only shown: every field read-only, nothing for the add form's rules.
        kwargs["form"] = forms.ModelForm if obj is not None else CreditGrantForm
        return super().get_form(request, obj, change=change, **kwargs)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="id")
    def public_id(self, grant: CreditGrant) -> str:
        return grant.public_id

    @admin.display(description="customer", ordering="account_name")
    def account(self, grant: CreditGrant) -> str:
        if grant.pk is None:
            return "-"
        return _account_link(grant)

    @admin.display(description="amount")
    def amount(self, grant: CreditGrant) -> str:
        return money.display(grant.amount_minor, grant.currency)

    @admin.display(description="remaining")
    def remaining(self, grant: CreditGrant) -> str:
        return money.display(grant.remaining_minor, grant.currency)

    def save_model(self, request: HttpRequest, obj: CreditGrant, form: Any, change: bool) -> None:
        data = form.cleaned_data
        try:
            grant = services.credit_grant_submit(
                account_id=data["account"],
                kind=data["kind"],
                amount=data["amount"],
                currency=data["currency"],
                reason=data["reason"],
                actor=_operator(request),
                expires_at=data["expires_at"],
            )
        except ApplicationError as exc:
            raise PermissionDenied(exc.message) from exc
        if isinstance(grant, ApprovalRequest):  # above the four-eyes threshold: nothing granted yet
            request._four_eyes_request = grant  # type: ignore[attr-defined]  # for response_add
            return
        # The admin's "… was added" message names ``obj``: give it what the service wrote.
        for field in CreditGrant._meta.concrete_fields:
            setattr(obj, field.attname, getattr(grant, field.attname))

    def response_add(self, request: HttpRequest, obj: CreditGrant, post_url_continue: str | None = None) -> Any:
        pending = getattr(request, "_four_eyes_request", None)
        if pending is None:
            return super().response_add(request, obj, post_url_continue)
        messages.warning(
            request,
            f"A grant of {money.display(pending.amount_minor, pending.currency)} is above the four-eyes threshold: "
            f"request {pending.public_id} awaits a second finance user's approval.",
        )
        return HttpResponseRedirect(reverse("admin:invoicing_creditgrant_changelist"))


class TaxRateForm(forms.ModelForm[TaxRate]):
    close_previous = forms.BooleanField(
        required=False,
        label="Close the rate in force",
        help_text="End the open-ended rate of this country on this rate's first day (it is replaced).",
    )

    class Meta:
        model = TaxRate
        fields = ("country", "rate", "valid_from", "valid_until", "note")

    def clean(self) -> dict[str, Any]:
        """The service's rules, so that a refusal (naming the rate in the way) comes back on the form."""
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            if self.instance.pk is None:
                services.tax_rate_check(
                    country=str(data["country"]),
                    rate=data["rate"],
                    valid_from=data["valid_from"],
                    valid_until=data.get("valid_until"),
                    close_previous=bool(data.get("close_previous")),
                )
            else:
                services.tax_rate_update_check(rate_id=self.instance.pk, valid_until=data.get("valid_until"))
        except ApplicationError as exc:
            _service_error_on_form(self, exc)
        return data


@admin.register(TaxRate)
class TaxRateAdmin(AuditHistoryMixin, csv.CsvExportMixin, WriteThroughServiceMixin, admin.ModelAdmin[TaxRate]):
    csv_columns = (
        ("country", lambda r: str(r.country)),
        ("rate_percent", csv.attr("rate")),
        ("valid_from", csv.attr("valid_from")),
        ("valid_until", csv.attr("valid_until")),
        ("note", csv.attr("note")),
    )
    """Rates are written by ``services.tax_rate_create`` / ``tax_rate_update`` (audited); once
    written, only a rate's end and note change, and a rate no issued invoice used may be
    withdrawn (``tax_rate_withdraw``: "Withdraw this rate", the admin's delete URL)."""

    list_display = ("country", "rate", "valid_from", "valid_until", "note")
    list_filter = (CountryInUseFilter,)
    ordering = ("country", "-valid_from")
    form = TaxRateForm

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("country", "rate", "valid_from", "valid_until", "close_previous", "note")
        return ("country", "rate", "valid_from", "valid_until", "note")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("country", "rate", "valid_from") if obj is not None else ()

    def get_actions(self, request: HttpRequest) -> Any:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # one rate at a time, with a reason, through the service
        return actions

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> HttpResponse:
        """The delete URL ("Withdraw this rate") withdraws the rate through
        ``services.tax_rate_withdraw``, with a reason: only a rate no issued invoice was taxed
        with (the page says why not), giving its days back to the rate it closed."""
        require_permission(request, "invoicing.delete_taxrate", action="Withdrawing a tax rate")
        rate = get_object_or_404(TaxRate, pk=object_id)
        change_url = reverse("admin:invoicing_taxrate_change", args=[rate.pk])
        form = ReasonForm(request.POST or None)
        try:
            _, reopens = services.tax_rate_withdraw_check(rate_id=rate.pk)
            refusal = ""
        except ApplicationError as exc:
            reopens, refusal = None, exc.message
        if request.method == "POST" and not refusal and form.is_valid():
            try:
                reopened = services.tax_rate_withdraw(
                    rate_id=rate.pk, reason=form.cleaned_data["reason"], actor=_operator(request)
                )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(
                    request, f"{rate} withdrawn." + (f" {reopened} runs again over its days." if reopened else "")
                )
                return HttpResponseRedirect(reverse("admin:invoicing_taxrate_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "original": rate,
            "title": f"Withdraw {rate}",
            "form": form,
            "change_url": change_url,
            "refusal": refusal,
            "reopens": reopens,
        }
        return TemplateResponse(request, "admin/invoicing/taxrate/withdraw.html", context)

    def delete_model(self, request: HttpRequest, obj: TaxRate) -> None:
        raise PermissionDenied('Tax rates are withdrawn from their page ("Withdraw this rate"), with a reason.')

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[TaxRate]) -> None:
        raise PermissionDenied("Tax rates are withdrawn one at a time, with a reason.")

    def save_model(self, request: HttpRequest, obj: TaxRate, form: Any, change: bool) -> None:
        data = form.cleaned_data
        try:
            if change:
                saved = services.tax_rate_update(
                    rate_id=obj.pk,
                    valid_until=data.get("valid_until"),
                    note=data.get("note") or "",
                    actor=_operator(request),
                )
            else:
                saved = services.tax_rate_create(
                    country=str(data["country"]),
                    rate=data["rate"],
                    valid_from=data["valid_from"],
                    valid_until=data.get("valid_until"),
                    note=data.get("note") or "",
                    close_previous=bool(data.get("close_previous")),
                    actor=_operator(request),
                )
        except ApplicationError as exc:  # a rate or an invoice written since the form was checked
            raise PermissionDenied(exc.message) from exc
        for field in TaxRate._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))


class ContractDiscountForm(forms.ModelForm[ContractDiscount]):
    """A new discount: checked by the service's rules, so that a refusal comes back on the form."""

    account = AccountIdField(help_text="acc_…")

    class Meta:
        model = ContractDiscount
        fields = ("sku_prefix", "percent", "valid_from", "valid_until", "reason")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            services.contract_discount_check(
                account_id=data["account"],
                sku_prefix=(data.get("sku_prefix") or "").strip(),
                percent=data["percent"],
                valid_from=data["valid_from"],
                valid_until=data.get("valid_until"),
            )
        except ApplicationError as exc:
            _service_error_on_form(self, exc)
        return data


class ContractDiscountChangeForm(forms.ModelForm[ContractDiscount]):
    """A discount written: only its end and reason move."""

    class Meta:
        model = ContractDiscount
        fields = ("valid_until", "reason")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        d = self.instance
        try:
            services.contract_discount_check(
                account_id=d.account_id,
                sku_prefix=d.sku_prefix,
                percent=d.percent,
                valid_from=d.valid_from,
                valid_until=data.get("valid_until"),
                discount_id=d.pk,
            )
        except ApplicationError as exc:
            _service_error_on_form(self, exc)
        return data


@admin.register(ContractDiscount)
class ContractDiscountAdmin(
    AuditHistoryMixin, csv.CsvExportMixin, WriteThroughServiceMixin, admin.ModelAdmin[ContractDiscount]
):
    csv_columns = (
        ("account_id", csv.public_id("acc", "account_id")),
        csv.CUSTOMER,
        ("sku_prefix", csv.attr("sku_prefix")),
        ("percent", csv.attr("percent")),
        ("valid_from", csv.attr("valid_from")),
        ("valid_until", csv.attr("valid_until")),
        ("reason", csv.attr("reason")),
        ("created_by", csv.attr("created_by")),
    )
    """Written by ``services.contract_discount_create`` / ``_update`` (checked under the
    account's billing lock, audited as ``TermsChange``), never by a plain save."""

    list_display = ("account", "sku_prefix", "percent", "valid_from", "valid_until", "reason", "created_by")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ContractDiscount]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="customer", ordering="account_name")
    def account(self, discount: ContractDiscount) -> str:
        return _account_link(discount) if discount.pk else "-"

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("account", "sku_prefix", "percent", "valid_from", "valid_until", "reason")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("account", "sku_prefix", "percent", "valid_from") if obj is not None else ()

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs["form"] = ContractDiscountChangeForm if obj is not None else ContractDiscountForm
        return super().get_form(request, obj, change=change, **kwargs)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: ContractDiscount, form: Any, change: bool) -> None:
        data = form.cleaned_data
        try:
            if change:
                saved = services.contract_discount_update(
                    discount_id=obj.pk,
                    valid_until=data.get("valid_until"),
                    reason=data["reason"],
                    actor=_operator(request),
                )
            else:
                saved = services.contract_discount_create(
                    account_id=data["account"],
                    sku_prefix=data.get("sku_prefix") or "",
                    percent=data["percent"],
                    valid_from=data["valid_from"],
                    valid_until=data.get("valid_until"),
                    reason=data["reason"],
                    actor=_operator(request),
                )
        except ApplicationError as exc:  # a discount or an invoice written since the form was checked
            raise PermissionDenied(exc.message) from exc
        for field in ContractDiscount._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))


class LedgerLineInline(PartInline, admin.TabularInline[LedgerLine, LedgerEntry]):
    model = LedgerLine
    view_permission = "invoicing.view_ledgerentry"
    fields = ("ledger_account", "billing_account", "amount")

    @admin.display(description="billing account")
    def billing_account(self, line: LedgerLine) -> str:
        return ids.encode("acc", line.account_id) if line.account_id else "-"

    @admin.display(description="amount (debit +, credit -)")
    def amount(self, line: LedgerLine) -> str:
        return money.display(line.amount_minor, line.currency)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(RecordAdminMixin, admin.ModelAdmin[LedgerEntry]):
    list_display = ("posted_at", "source_type", "source", "customer", "currency", "memo")
    list_filter = ("source_type", "currency")
    search_fields = ("memo",)
    inlines = (LedgerLineInline,)
    readonly_fields = ("posted_at", "source_type", "source", "customer", "currency", "memo")
    fields = readonly_fields
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[LedgerEntry]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="source")
    def source(self, entry: LedgerEntry) -> str:
        prefix = SOURCE_PREFIXES.get(entry.source_type)
        return ids.encode(prefix, entry.source_id) if prefix else f"{entry.source_type} #{entry.source_id}"

    @admin.display(description="customer", ordering="account_name")
    def customer(self, entry: LedgerEntry) -> str:
        return _account_link(entry) if entry.account_id else "-"


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(csv.CsvExportMixin, RecordAdminMixin, admin.ModelAdmin[ApprovalRequest]):
    """Four-eyes requests, as records: approved or rejected from the back office's page
    (``backoffice:approval_list``), which carries the approved ones out; never edited here."""

    list_display = (
        "public_id",
        "kind",
        "account",
        "amount",
        "status",
        "requested_by",
        "reason",
        "decided_by",
        "decision_reason",
        "result",
        "requested_at",
    )
    list_filter = ("status", "kind", "currency")
    search_fields = ("requested_by", "decided_by", "reason")
    ordering = ("-requested_at",)
    fields = (
        "public_id",
        "kind",
        "status",
        "account",
        "invoice",
        "amount",
        "reason",
        "requested_by",
        "requested_at",
        "decided_by",
        "decision_reason",
        "decided_at",
        "result",
        "executed_at",
    )
    readonly_fields = fields
    csv_columns = (
        ("request_id", csv.attr("public_id")),
        ("kind", csv.attr("kind")),
        ("status", csv.attr("status")),
        ("account_id", csv.public_id("acc", "account_id")),
        ("invoice_id", csv.public_id("inv", "invoice_id")),
        ("payment_id", csv.public_id("pay", "payment_id")),
        ("currency", csv.attr("currency")),
        ("amount", csv.amount("amount_minor")),
        ("reason", csv.attr("reason")),
        ("requested_by", csv.attr("requested_by")),
        ("requested_at", csv.attr("requested_at")),
        ("decided_by", csv.attr("decided_by")),
        ("decision_reason", csv.attr("decision_reason")),
        ("decided_at", csv.attr("decided_at")),
        ("result", csv.attr("result")),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApprovalRequest]:
        return _with_account_names(super().get_queryset(request))

    @admin.display(description="id")
    def public_id(self, req: ApprovalRequest) -> str:
        return req.public_id

    @admin.display(description="customer", ordering="account_name")
    def account(self, req: ApprovalRequest) -> str:
        return _account_link(req)

    @admin.display(description="invoice")
    def invoice(self, req: ApprovalRequest) -> str:
        if not req.invoice_id:
            return "-"
        url = reverse("admin:invoicing_invoice_change", args=[req.invoice_id])
        return format_html('<a href="{}">{}</a>', url, ids.encode("inv", req.invoice_id))

    @admin.display(description="amount", ordering="amount_minor")
    def amount(self, req: ApprovalRequest) -> str:
        return money.display(req.amount_minor, req.currency)
