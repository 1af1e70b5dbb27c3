from django.urls import path

from accounts import api

urlpatterns = [
    path("users", api.SignupView.as_view(), name="users"),
    path("api-keys", api.ApiKeyListCreateView.as_view(), name="api-keys"),
    path("api-keys/<key:key_id>", api.ApiKeyDetailView.as_view(), name="api-key"),
    path("billing-accounts", api.BillingAccountListCreateView.as_view(), name="billing-accounts"),
    path("billing-accounts/<acc:account_id>", api.BillingAccountDetailView.as_view(), name="billing-account"),
    path(
        "billing-accounts/<acc:account_id>/close", api.BillingAccountCloseView.as_view(), name="billing-account-close"
    ),
    path(
        "billing-accounts/<acc:account_id>/history",
        api.BillingAccountHistoryView.as_view(),
        name="billing-account-history",
    ),
    path(
        "billing-accounts/<acc:account_id>/members", api.MemberListCreateView.as_view(), name="billing-account-members"
    ),
    path(
        "billing-accounts/<acc:account_id>/members/<usr:user_id>",
        api.MemberDetailView.as_view(),
        name="billing-account-member",
    ),
]
