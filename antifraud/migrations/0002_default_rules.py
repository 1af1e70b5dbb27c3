"""The rules' default weights and thresholds, the score bands, and rules version 1."""

from typing import Any

from django.db import migrations

DEFAULTS: dict[str, tuple[int, dict[str, Any]]] = {
    "card_reuse": (50, {"max_accounts": 2}),
    "card_testing": (40, {"window_minutes": 60, "max_failures": 5}),
    "country_mismatch": (20, {}),
    "disposable_email": (40, {}),
    "linked_accounts": (35, {}),
    "payment_trouble": (30, {"window_days": 30, "max_declines": 3, "max_disputes": 1}),
    "prepaid_card": (15, {"new_account_days": 30}),
    "signup_velocity": (30, {"window_hours": 24, "max_per_ip": 3, "max_per_prefix": 10}),
}


def seed(apps: Any, schema_editor: Any) -> None:
    RiskRule = apps.get_model("antifraud", "RiskRule")
    RiskSettings = apps.get_model("antifraud", "RiskSettings")
    RulesVersion = apps.get_model("antifraud", "RulesVersion")
    for code, (weight, params) in DEFAULTS.items():
        RiskRule.objects.get_or_create(code=code, defaults={"weight": weight, "params": params})
    settings, _ = RiskSettings.objects.get_or_create(id=1, defaults={"review_score": 50, "block_score": 90})
    snapshot = {
        "review_score": settings.review_score,
        "block_score": settings.block_score,
        "rules": {
            r.code: {"enabled": r.enabled, "weight": r.weight, "params": r.params}
            for r in RiskRule.objects.order_by("code")
        },
    }
    RulesVersion.objects.get_or_create(version=settings.version, defaults={"snapshot": snapshot, "created_by": "migration"})


class Migration(migrations.Migration):
    dependencies = [("antifraud", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
