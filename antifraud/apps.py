from django.apps import AppConfig


class AntifraudConfig(AppConfig):
    name = "antifraud"
    verbose_name = "Antifraud"
    default_auto_field = "django.db.models.BigAutoField"
    # What each operator group (declared by accounts) may do here: the fraud team works the
    # review queue, tunes the rules and sets credit limits' policies; support sees the standing.
    operator_permissions: dict[str, tuple[str, ...]] = {
        "support": ("view_accountrisk", "view_riskassessment"),
        "fraud": (
            "view_accountrisk",
            "review_account",
            "view_riskassessment",
            "view_reviewdecision",
            "view_riskrule",
            "change_riskrule",
            "view_risksettings",
            "change_risksettings",
            "view_rulesversion",
            "view_emaildomain",
            "add_emaildomain",
            "change_emaildomain",
            "delete_emaildomain",
            "view_creditlimitpolicy",
            "add_creditlimitpolicy",
            "change_creditlimitpolicy",
        ),
        # Credit limits are fraud's; finance sees the policies.
        "finance": ("view_creditlimitpolicy",),
    }

    def ready(self) -> None:
        # The signup checkpoint listens to the accounts app's signals (accounts knows nothing
        # of antifraud).
        from antifraud import receivers  # noqa: F401
