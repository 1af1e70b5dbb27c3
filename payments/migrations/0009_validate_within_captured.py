"""Validate ``payments_payment_within_captured`` where no payment breaks it (0003 added it
``NOT VALID`` so that a database with payments over-disputed before the rule still migrates).

A database with no such payment (every new install) gets the check validated: the rule then
holds for every row, not only for rows written since. One with such payments keeps it
``NOT VALID`` and says so; ``manage.py ledger_check`` lists them, and running ``migrate
payments 0008`` then ``migrate`` again once they are corrected validates it."""

import logging

from django.db import migrations

log = logging.getLogger("payments.migrations")

CHECK = "amount_disputed_minor >= 0 AND amount_minor >= amount_refunded_minor + amount_disputed_minor"


def validate(apps, schema_editor):  # type: ignore[no-untyped-def]
    with schema_editor.connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM payments_payment WHERE NOT ({CHECK})")
        (breaking,) = cur.fetchone()
        if breaking:
            log.warning("payments.within_captured_not_validated", extra={"payments": breaking})
            return
        cur.execute("ALTER TABLE payments_payment VALIDATE CONSTRAINT payments_payment_within_captured")


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0008_search_indexes"),
    ]

    # Validating takes only a SHARE UPDATE EXCLUSIVE lock: writes go on while the rows are read.
    operations = [migrations.RunPython(validate, migrations.RunPython.noop)]
