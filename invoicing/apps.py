from django.apps import AppConfig


class InvoicingConfig(AppConfig):
    name = "invoicing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from invoicing import checks  # noqa: F401  (registers the seller's system checks)
