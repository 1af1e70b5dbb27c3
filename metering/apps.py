from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    verbose_name = "Metering"
    default_auto_field = "django.db.models.BigAutoField"
    # What each operator group (declared by accounts) may do here: read-only views.
    operator_permissions: dict[str, tuple[str, ...]] = {
        "support": ("view_rollupshard", "view_sku", "view_price"),
        "finance": ("view_rollupshard", "view_sku", "view_price"),
        "fraud": ("view_rollupshard",),
    }
