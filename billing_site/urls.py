from django.contrib import admin
from django.urls import include, path, register_converter
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from two_factor.urls import urlpatterns as two_factor_urls

from billing_site.backoffice import health, metrics
from billing_site.common import schema as _schema_extensions  # noqa: F401  (registers them)
from billing_site.common.ids import converter
from payments.webhook_views import StripeWebhookView

# <acc:account_id> and friends: public ids in, integers to the views; every app's URLs use them.
for _prefix in ("acc", "key", "usr", "inv", "crn", "pmt", "pay", "ref"):
    register_converter(converter(_prefix), _prefix)

handler404 = "billing_site.common.errors.page_not_found"
handler500 = "billing_site.common.errors.server_error"
# A refusal names the operator group(s) that may do what was refused (billing_site/common/staff.py).
handler403 = "billing_site.common.staff.permission_denied"

urlpatterns = [
    # Staff sign-in with a second factor, enrolment and backup codes (django-two-factor-auth):
    # /admin/account/login/, /admin/account/two_factor/setup/ ... The admin's own /admin/login/
    # sends here (billing_site.common.staff.SecondFactorMiddleware guards all of /admin/).
    path("admin/", include(two_factor_urls)),
    path("admin/", include("billing_site.backoffice.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include("accounts.urls")),
    path("api/v1/", include("metering.urls")),
    path("api/v1/", include("invoicing.urls")),
    path("api/v1/", include("payments.urls")),
    path("webhooks/stripe", StripeWebhookView.as_view(), name="stripe-webhook"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # On call (docs/operations.md): no session, no CSRF; /metrics needs its token or address.
    path("metrics", metrics.metrics_view, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
]
