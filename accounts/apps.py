from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_operator_groups(sender: AppConfig, **kwargs: Any) -> None:
    from accounts.services import operator_groups_sync

    operator_groups_sync()


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from accounts import authentication  # noqa: F401  (registers the OpenAPI auth scheme)

        # Permissions exist only after migrate, app by app (other apps' after ours): resync
        # the groups after each app's (idempotent, a few queries).
        post_migrate.connect(_sync_operator_groups, dispatch_uid="accounts.operator_groups")
