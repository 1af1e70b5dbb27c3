"""The back office's pages, mounted under /admin/ before the admin site's own URLs (see
billing_site/urls.py). Every view here is wrapped in ``admin.site.admin_view``: staff only, with
the admin's login, second factor and permission checks.

The customer page takes the billing account admin's own address by the public id
(``/admin/accounts/billingaccount/acc_…/``); the account's edit form stays at ``…/acc_…/change/``
(the account admin; an integer there redirects to the ``acc_…`` one)."""

from django.contrib import admin
from django.urls import URLPattern, path

from billing_site.backoffice import customer, dashboard, finance, search

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
    path("search/", view(search.search_view), name="search"),
    path("accounts/billingaccount/<acc:account_id>/", view(customer.customer_view), name="customer"),
    # An internal integer (an old bookmark): the same customer's page, by its public id.
    path("accounts/billingaccount/<int:account_id>/", view(customer.customer_redirect)),
    path("accounts/billingaccount/<acc:account_id>/notes/", view(customer.note_add_view), name="customer_note_add"),
    path(
        "accounts/billingaccount/<acc:account_id>/dunning/",
        view(customer.dunning_pause_view),
        name="customer_dunning_pause",
    ),
]
