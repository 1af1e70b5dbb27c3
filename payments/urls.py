from django.urls import path

from payments import api

ACCOUNT = "billing-accounts/<acc:account_id>"

urlpatterns = [
    path(f"{ACCOUNT}/payment-methods/setup", api.PaymentMethodSetupView.as_view(), name="payment-method-setup"),
    path(f"{ACCOUNT}/payment-methods", api.PaymentMethodListCreateView.as_view(), name="payment-methods"),
    path(
        f"{ACCOUNT}/payment-methods/<pmt:payment_method_id>/default",
        api.PaymentMethodDefaultView.as_view(),
        name="payment-method-default",
    ),
    path(
        f"{ACCOUNT}/payment-methods/<pmt:payment_method_id>",
        api.PaymentMethodDetailView.as_view(),
        name="payment-method",
    ),
    path(f"{ACCOUNT}/invoices/<inv:invoice_id>/pay", api.InvoicePayView.as_view(), name="invoice-pay"),
    path(f"{ACCOUNT}/payments", api.PaymentListView.as_view(), name="payments"),
    path(f"{ACCOUNT}/payments/<pay:payment_id>", api.PaymentDetailView.as_view(), name="payment"),
    path(f"{ACCOUNT}/refunds", api.RefundListView.as_view(), name="refunds"),
    path(f"{ACCOUNT}/dunning", api.DunningStateView.as_view(), name="dunning-state"),
]
