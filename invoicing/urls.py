from django.urls import path

from invoicing import api

urlpatterns = [
    path("billing-accounts/<acc:account_id>/invoices", api.InvoiceListView.as_view(), name="invoice-list"),
    path(
        "billing-accounts/<acc:account_id>/invoices/<inv:invoice_id>",
        api.InvoiceDetailView.as_view(),
        name="invoice-detail",
    ),
    path(
        "billing-accounts/<acc:account_id>/invoices/<inv:invoice_id>/pdf",
        api.InvoicePdfView.as_view(),
        name="invoice-pdf",
    ),
    path("billing-accounts/<acc:account_id>/credit-notes", api.CreditNoteListView.as_view(), name="credit-note-list"),
    path(
        "billing-accounts/<acc:account_id>/credit-notes/<crn:credit_note_id>/pdf",
        api.CreditNotePdfView.as_view(),
        name="credit-note-pdf",
    ),
    path("billing-accounts/<acc:account_id>/balance", api.BalanceView.as_view(), name="billing-account-balance"),
]
