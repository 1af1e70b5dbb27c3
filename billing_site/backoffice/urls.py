"""The back office's pages, mounted under /admin/ before the admin site's own URLs (see
billing_site/urls.py). Every view here is wrapped in ``admin.site.admin_view``: staff only, with
the admin's login, second factor and permission checks."""

from django.urls import URLPattern

app_name = "backoffice"

urlpatterns: list[URLPattern] = []
