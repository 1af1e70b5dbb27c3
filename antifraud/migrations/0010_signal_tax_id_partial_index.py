"""The tax id look-up's index holds only the accounts that have one (most have none): with the
look-up repeating its predicate, a generic plan probes it instead of scanning every signal.
Built and dropped concurrently: the signals table has a row per billing account."""

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("antifraud", "0009_signal_phone"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="accountsignal",
            index=models.Index(
                condition=models.Q(("tax_id", ""), _negated=True), fields=["tax_id"], name="antifraud_signal_tax_id_set"
            ),
        ),
        RemoveIndexConcurrently(
            model_name="accountsignal",
            name="antifraud_signal_tax_id",
        ),
    ]
