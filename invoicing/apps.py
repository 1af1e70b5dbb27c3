from django.apps import AppConfig


class InvoicingConfig(AppConfig):
    name = "invoicing"
    default_auto_field = "django.db.models.BigAutoField"
    # What each operator group (declared by accounts) may do here.
    operator_permissions: dict[str, tuple[str, ...]] = {
        "support": ("view_invoice", "view_creditnote", "view_creditgrant", "view_contractdiscount"),
        "finance": (
            "view_invoice",
            "close_period",
            "write_off_invoice",
            "issue_credit_note",
            "view_creditnote",
            "view_creditgrant",
            "add_creditgrant",
            "view_taxrate",
            "add_taxrate",
            "change_taxrate",
            "delete_taxrate",
            "view_contractdiscount",
            "add_contractdiscount",
            "change_contractdiscount",
            "view_ledgerentry",
            "view_receivables",
            "view_approvalrequest",
            "decide_approvalrequest",
        ),
        # For the read-only group (declared with the groups of the back-office issue).
        "read-only": ("view_receivables", "view_approvalrequest"),
    }

    def ready(self) -> None:
        from invoicing import checks  # noqa: F401  (registers the seller's system checks)
