"""Each invoice and credit-note line stores its revenue family (the ledger posts and checks by
it instead of re-deriving it from the SKU in SQL); existing lines get it from their SKU, as
``planning.family_of`` derives it. One UPDATE per table: invoice lines are written once per
month, so on a large table run it in a quiet hour (or in batches by invoice id)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('invoicing', '0005_billed_amount_minor'),
    ]

    operations = [
        migrations.AddField(
            model_name='creditnoteline',
            name='revenue_family',
            field=models.CharField(default='general', max_length=64),
        ),
        migrations.AddField(
            model_name='invoiceline',
            name='revenue_family',
            field=models.CharField(default='general', max_length=64),
        ),
        migrations.RunSQL(
            "UPDATE invoicing_invoiceline SET revenue_family = coalesce(nullif(split_part(sku, '.', 1), ''), 'general');"
            "UPDATE invoicing_creditnoteline SET revenue_family = coalesce(nullif(split_part(sku, '.', 1), ''), 'general');",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name='ledgerentry',
            name='source_type',
            field=models.CharField(choices=[('invoice', 'Issued invoice'), ('invoice_credit', 'Credit spent on an invoice'), ('credit_grant', 'Credit grant'), ('payment', 'Payment received'), ('credit_note', 'Credit note'), ('credit_reversal', 'Credit given back on a void'), ('write_off', 'Write-off')], max_length=32),
        ),
    ]
