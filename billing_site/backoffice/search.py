"""Search from every admin page (the box in the header): by account id (``acc_…``), email, name,
tax id, invoice or credit-note number (or ``inv_…``/``crn_…``), payment id (``pay_…``, or the
gateway's ``pi_…``/``ch_…``), card (last four digits, or ``pmt_…``). Results grouped by kind;
one exact match of an id or a document number lands on its customer page. Every lookup is an
indexed one (see each selector)."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from accounts import selectors as account_selectors
from billing_site.backoffice.customer import VIEW_PERMISSION, _site_context, customer_url
from billing_site.common import ids, money
from billing_site.common.staff import require_permission
from invoicing import selectors as invoicing_selectors
from payments import selectors as payment_selectors

# What each group of results is called, in the order shown.
KINDS = {
    "account": "Account id",
    "email": "Email",
    "name": "Name",
    "tax_id": "Tax id",
    "invoice": "Invoice number",
    "credit_note": "Credit-note number",
    "payment": "Payment id",
    "card": "Card",
}
# Kinds whose match is exact: a single one of them is the customer's page.
EXACT = frozenset({"account", "tax_id", "invoice", "credit_note", "payment"})


@dataclass(frozen=True, slots=True)
class Hit:
    kind: str
    account_id: int
    matched: str  # what matched, as staff read it
    detail: str = ""
    link: str = ""  # the object's own admin page, if it has one

    @property
    def url(self) -> str:
        return customer_url(self.account_id)

    @property
    def account(self) -> str:
        return ids.encode("acc", self.account_id)


def search(term: str) -> list[Hit]:
    term = term.strip()
    if not term:
        return []
    hits: list[Hit] = []
    account_id = ids.decode("acc", term)
    if account_id is not None:
        account = account_selectors.billing_account_get(account_id=account_id)
        if account is not None:
            hits.append(Hit("account", account.id, account.public_id))
        return hits
    for kind, accounts in account_selectors.billing_account_search(term=term).items():
        for account in accounts:
            hits.append(Hit(kind, account.id, getattr(account, kind)))
    for doc in invoicing_selectors.documents_by_number(term=term):
        name = "invoicing_invoice_change" if doc.kind == "invoice" else "invoicing_creditnote_change"
        hits.append(
            Hit(
                doc.kind,
                doc.account_id,
                doc.number or ids.encode("inv", doc.document_id),
                f"{doc.status}, {money.display(doc.total_minor, doc.currency)}",
                reverse(f"admin:{name}", args=[doc.document_id]),
            )
        )
    for payment in payment_selectors.payment_search(term=term):
        hits.append(
            Hit(
                "payment",
                payment.account_id,
                payment.public_id,
                f"{payment.status}, {money.display(payment.amount_minor, payment.currency)}",
                reverse("admin:payments_payment_change", args=[payment.id]),
            )
        )
    for card in payment_selectors.cards_search(term=term):
        state = "removed" if card.detached_at else ("default" if card.is_default else "bound")
        hits.append(
            Hit(
                "card",
                card.account_id,
                f"{card.brand} •••• {card.last4}",
                f"expires {card.exp_month:02d}/{card.exp_year}, {state}",
                reverse("admin:payments_paymentmethod_change", args=[card.id]),
            )
        )
    return hits


def search_view(request: HttpRequest) -> HttpResponse:
    require_permission(request, VIEW_PERMISSION, action="Search")
    term = request.GET.get("q", "").strip()[:200]
    hits = search(term)
    if len({h.account_id for h in hits}) == 1 and all(h.kind in EXACT for h in hits) and len(hits) == 1:
        return HttpResponseRedirect(hits[0].url)
    names = {
        account_id: profile.name
        for account_id, profile in account_selectors.billing_profiles(
            account_ids=sorted({h.account_id for h in hits})
        ).items()
    }
    groups = [
        {"kind": kind, "label": label, "hits": [(h, names.get(h.account_id, "")) for h in hits if h.kind == kind]}
        for kind, label in KINDS.items()
    ]
    context = {
        **_site_context(request),
        "title": f"Search: {term}" if term else "Search",
        "term": term,
        "groups": [g for g in groups if g["hits"]],
        "count": len(hits),
    }
    return TemplateResponse(request, "backoffice/search.html", context)
