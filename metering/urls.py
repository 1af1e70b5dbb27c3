from django.urls import path

from metering import api

urlpatterns = [
    path("usage/events", api.UsageEventsView.as_view(), name="usage-events"),
    path("billing-accounts/<acc:account_id>/costs", api.CostBreakdownView.as_view(), name="billing-account-costs"),
]
