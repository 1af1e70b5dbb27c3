"""The spend-velocity rule (checkpoint 4, usage) with its default thresholds: a new rules version."""

from typing import Any

from django.db import migrations, models

PARAMS = {
    "new_account_days": 7,
    "first_day_max": {"EUR": "500", "USD": "500", "GBP": "450", "JPY": "75000"},
    "first_day_gpu_hours_max": 48,
    "gpu_sku_prefix": "compute.gpu.",
    "limit_multiple": 2,
    "typical_multiple": 10,
}


def seed(apps: Any, schema_editor: Any) -> None:
    RiskRule = apps.get_model("antifraud", "RiskRule")
    RiskSettings = apps.get_model("antifraud", "RiskSettings")
    RulesVersion = apps.get_model("antifraud", "RulesVersion")
    _, created = RiskRule.objects.get_or_create(code="spend_velocity", defaults={"weight": 50, "params": PARAMS})
    if not created:
        return
    settings, _ = RiskSettings.objects.get_or_create(id=1)
    settings.version += 1
    settings.save(update_fields=["version"])
    snapshot = {
        "review_score": settings.review_score,
        "block_score": settings.block_score,
        "rules": {
            r.code: {"enabled": r.enabled, "weight": r.weight, "params": r.params}
            for r in RiskRule.objects.order_by("code")
        },
    }
    RulesVersion.objects.create(version=settings.version, snapshot=snapshot, created_by="migration")


class Migration(migrations.Migration):
    dependencies = [("antifraud", "0003_review_decisions")]

    operations = [
        migrations.AlterField(
            model_name="riskrule",
            name="code",
            field=models.CharField(
                choices=[
                    ("disposable_email", "Disposable email domain"),
                    ("signup_velocity", "Signup velocity (IP, /24, /64)"),
                    ("card_reuse", "Card fingerprint reuse"),
                    ("card_testing", "Card testing (failed bindings)"),
                    ("country_mismatch", "Card, billing and IP country disagree"),
                    ("prepaid_card", "Prepaid card on a new account"),
                    ("linked_accounts", "Linked to a blocked account"),
                    ("payment_trouble", "Repeated declines and disputes"),
                    ("spend_velocity", "Spend velocity of a new account"),
                ],
                max_length=32,
                unique=True,
            ),
        ),
        migrations.AddIndex(
            model_name="accountsignal",
            index=models.Index(fields=["created_at"], name="antifraud_signal_created"),
        ),
        migrations.RunPython(seed, migrations.RunPython.noop),
    ]
