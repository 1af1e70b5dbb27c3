"""The back office's pages, mounted under /admin/ before the admin site's own URLs (see
billing_site/urls.py). Every view here is wrapped in ``admin.site.admin_view``: staff only, with
the admin's login, second factor and permission checks."""

from django.contrib import admin
from django.urls import URLPattern, path

from billing_site.backoffice import dashboard

app_name = "backoffice"

urlpatterns: list[URLPattern] = [
    # The staff home page: answers /admin/ in place of the admin's own index (same app list below).
    path("", admin.site.admin_view(dashboard.index), name="index"),
]
