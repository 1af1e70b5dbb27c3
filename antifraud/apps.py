from django.apps import AppConfig


class AntifraudConfig(AppConfig):
    name = "antifraud"
    verbose_name = "Antifraud"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The signup checkpoint listens to the accounts app's signals (accounts knows nothing
        # of antifraud).
        from antifraud import receivers  # noqa: F401
