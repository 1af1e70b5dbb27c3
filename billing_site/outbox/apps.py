from django.apps import AppConfig


class OutboxConfig(AppConfig):
    name = "billing_site.outbox"
    label = "outbox"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Outbox"
    operator_permissions: dict[str, tuple[str, ...]] = {"finance": ("view_outboxmessage",)}
