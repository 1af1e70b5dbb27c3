from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"
    default_auto_field = "django.db.models.BigAutoField"
    # What each operator group (declared by accounts) may do here.
    operator_permissions: dict[str, tuple[str, ...]] = {
        # Support sees a customer's payments, cards and dunning, and pauses dunning.
        "support": (
            "view_payment",
            "view_paymentmethod",
            "view_refund",
            "view_dunningcase",
            "view_dispute",
            "view_paymentprofile",
            "view_bindingattempt",
            "pause_dunning",
        ),
        "finance": (
            "view_payment",
            "view_paymentmethod",
            "view_refund",
            "issue_refund",
            "view_dispute",
            "view_dunningpolicy",
            "add_dunningpolicy",
            "change_dunningpolicy",
            "view_dunningcase",
            "pause_dunning",
            "view_webhookevent",
            "rerun_webhookevent",
            "view_paymentprofile",
        ),
        "fraud": ("view_payment", "view_paymentmethod", "view_dispute", "view_bindingattempt"),
    }

    def ready(self) -> None:
        # ledger_check asks for the per-payment invariant through invoicing's signal (invoicing
        # knows nothing of payments).
        from payments import receivers  # noqa: F401
