"""BilledUsage.amount_minor, backfilled from the lines that charged it (small table)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("invoicing", "0004_rename_payment_invoicepayment")]

    operations = [
        migrations.AddField(
            model_name="billedusage",
            name="amount_minor",
            field=models.BigIntegerField(default=0),
        ),
        migrations.RunSQL(
            """
            UPDATE invoicing_billedusage b SET amount_minor = l.amount_minor
            FROM invoicing_invoiceline l
            WHERE l.invoice_id = b.invoice_id AND l.sku = b.sku AND l.usage_month = b.usage_month
              AND l.kind IN ('usage', 'adjustment')
            """,
            migrations.RunSQL.noop,
        ),
    ]
