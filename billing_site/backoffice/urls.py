"""The back office's pages, mounted under /admin/ before the admin site's own URLs (see
billing_site/urls.py). Every view here is wrapped in ``admin.site.admin_view``: staff only, with
the admin's login, second factor and permission checks."""

from django.contrib import admin
from django.urls import URLPattern, path

from billing_site.backoffice import dashboard, finance

app_name = "backoffice"

view = admin.site.admin_view

urlpatterns: list[URLPattern] = [
    # The staff home page: answers /admin/ in place of the admin's own index (same app list below).
    path("", view(dashboard.index), name="index"),
    path("finance/", view(finance.finance_view), name="finance"),
    path(
        "finance/receivables/<str:currency>/<str:bucket>/",
        view(finance.receivables_bucket_view),
        name="receivables_bucket",
    ),
    path("finance/approvals/", view(finance.approval_list_view), name="approval_list"),
    path("finance/approvals/<int:request_id>/decide/", view(finance.approval_decide_view), name="approval_decide"),
]
