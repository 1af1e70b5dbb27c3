from django.urls import path

from metering import api

urlpatterns = [
    path("usage/events", api.UsageEventsView.as_view(), name="usage-events"),
]
