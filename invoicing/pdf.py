"""Invoice and credit note PDFs: an HTML template rendered by WeasyPrint, stored once.

What a PDF prints is formatted here: money grouped by thousands with the currency
(``1,234.50 EUR``), quantities as ``line_display`` rounds them (grouped the same way), and one
minus sign for every negative figure, U+2212 MINUS SIGN (discounts, negative adjustments,
credits applied), which the templates never write themselves. The API keeps ASCII ``-`` in
its decimal strings, for machines.

A document's PDF is rendered after its issuing transaction commits (a task) and kept in
``RenderedDocument``; the first request for a PDF not yet rendered renders and stores it.
``INSERT … ON CONFLICT DO NOTHING`` keeps the first copy: a document's PDF never changes.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from django.db import connection
from django.template.loader import render_to_string
from django_countries import countries
from stdnum import iban

from billing_site.common import money
from invoicing.line_display import detail_view, quantity_text, unit_price_text
from invoicing.models import CreditNote, Invoice, RenderedDocument

MINUS = "\N{MINUS SIGN}"  # the one minus sign on documents


def _signed(text: str) -> str:
    """A formatted number with the documents' minus sign in place of ASCII '-'."""
    return MINUS + text[1:] if text.startswith("-") else text


def _money(amount_minor: int, currency: str) -> str:
    """'1,234.50 EUR'; negative with U+2212."""
    return _signed(money.display(amount_minor, currency, grouped=True))


def _amount(amount_minor: int, currency: str) -> str:
    """A part of a line's amount, without the currency the line already shows: '1,234.50'."""
    return _signed(f"{money.from_minor(amount_minor, currency):,}")


def _quantity(quantity: Any) -> str:
    return _signed(quantity_text(quantity, grouped=True) or "")


def _country(code: str) -> str:
    return str(countries.name(code)) if code else ""


def _seller(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The seller as printed: the IBAN in groups of four. Documents issued before the seller
    carried a registration number and bank details print without them."""
    printed = dict(snapshot)
    if printed.get("iban"):
        printed["iban"] = iban.format(printed["iban"])
    return printed


def invoice_html(invoice: Invoice) -> str:
    currency = invoice.currency
    lines = []
    for line in invoice.lines.all():
        lines.append(
            {
                "description": line.description,
                "quantity": _quantity(line.quantity),
                "unit": line.unit,
                "unit_price": unit_price_text(line.unit_price) or line.pricing or "",
                "amount": _money(line.amount_minor, currency),
                # Printed as "key: amount" (the template shows no per-row quantity).
                "detail": detail_view(line.detail, line.amount_minor, currency, amount_text=_amount),
            }
        )
    context: dict[str, Any] = {
        "invoice": invoice,
        "seller": _seller(invoice.seller),
        "buyer": invoice.buyer,
        "buyer_country": _country(invoice.buyer.get("country", "")),
        "seller_country": _country(invoice.seller.get("country", "")),
        "lines": lines,
        "subtotal": _money(invoice.subtotal_minor, currency),
        "tax": _money(invoice.tax_minor, currency),
        "total": _money(invoice.total_minor, currency),
        "credits_applied": _money(-invoice.credits_applied_minor, currency),  # subtracted: printed negative
        "amount_due": _money(invoice.amount_due_minor, currency),
        "tax_rate": f"{invoice.tax_rate.normalize():f}",
        "tax_country": _country(invoice.tax_country),
        "period_last_day": invoice.period_end - timedelta(days=1),
    }
    return render_to_string("invoicing/invoice.html", context)


def credit_note_html(note: CreditNote) -> str:
    invoice = note.invoice
    currency = note.currency
    context = {
        "note": note,
        "invoice": invoice,
        "seller": _seller(invoice.seller),
        "buyer": invoice.buyer,
        "buyer_country": _country(invoice.buyer.get("country", "")),
        "lines": [
            {"description": line.description, "amount": _money(line.amount_minor, currency)}
            for line in note.lines.all()
        ],
        "subtotal": _money(note.subtotal_minor, currency),
        "tax": _money(note.tax_minor, currency),
        "total": _money(note.total_minor, currency),
        "tax_rate": f"{invoice.tax_rate.normalize():f}",
    }
    return render_to_string("invoicing/credit_note.html", context)


def render(html: str) -> bytes:
    import weasyprint  # type: ignore[import-untyped]  # late: it loads Pango, which only PDFs need

    pdf: bytes = weasyprint.HTML(string=html).write_pdf()
    return pdf


def document_ensure(*, kind: str, source_id: int) -> bytes | None:
    """The stored PDF of an issued document, rendering and storing it the first time.
    None if there is no such issued document."""
    stored = RenderedDocument.objects.filter(kind=kind, source_id=source_id).values_list("pdf", flat=True).first()
    if stored is not None:
        return bytes(stored)
    if kind == "invoice":
        invoice = Invoice.objects.filter(id=source_id).exclude(status="draft").first()
        if invoice is None:
            return None
        account_id, pdf = invoice.account_id, render(invoice_html(invoice))
    elif kind == "credit_note":
        note = CreditNote.objects.select_related("invoice").filter(id=source_id).first()
        if note is None:
            return None
        account_id, pdf = note.account_id, render(credit_note_html(note))
    else:
        raise ValueError(kind)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO invoicing_rendereddocument (kind, source_id, account_id, pdf, sha256, created_at)
            VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (kind, source_id) DO NOTHING
            """,
            [kind, source_id, account_id, pdf, hashlib.sha256(pdf).hexdigest()],
        )
    stored = RenderedDocument.objects.filter(kind=kind, source_id=source_id).values_list("pdf", flat=True).first()
    return bytes(stored) if stored is not None else pdf
