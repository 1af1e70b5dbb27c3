"""Per payment, refunded plus withdrawn by open and lost disputes never exceeds what was
captured (issue 19: two disputes of one charge, or a dispute after a refund, were accepted).

The check is added ``NOT VALID``: every write from now on is checked, while a database holding
payments over-disputed before the rule still migrates; ``manage.py ledger_check`` lists those
(the payments app's part of the check, and the ledger's gateway clearing per account)."""

import django.db.models.expressions
from django.db import migrations, models

CHECK = "amount_disputed_minor >= 0 AND amount_minor >= amount_refunded_minor + amount_disputed_minor"


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0002_default_dunning_policy"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddConstraint(
                    model_name="payment",
                    constraint=models.CheckConstraint(
                        condition=models.Q(
                            ("amount_disputed_minor__gte", 0),
                            (
                                "amount_minor__gte",
                                django.db.models.expressions.CombinedExpression(
                                    models.F("amount_refunded_minor"), "+", models.F("amount_disputed_minor")
                                ),
                            ),
                        ),
                        name="payments_payment_within_captured",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f"ALTER TABLE payments_payment ADD CONSTRAINT payments_payment_within_captured CHECK ({CHECK}) "
                    "NOT VALID",
                    "ALTER TABLE payments_payment DROP CONSTRAINT payments_payment_within_captured",
                ),
            ],
        ),
    ]
