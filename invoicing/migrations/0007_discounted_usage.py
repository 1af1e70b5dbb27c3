"""What each issued invoice discounted, per discount and usage month (``DiscountedUsage``),
so a later invoice discounts only what is left. Existing discount lines are carried over:
each is matched to its account's discount with the same SKU prefix in force that month (the
lowest id if several), its base recovered from the rated amount and the percentage. One
INSERT … SELECT over the discount lines, a small share of all lines."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('invoicing', '0006_revenue_family_and_ledger_sources'),
    ]

    operations = [
        migrations.CreateModel(
            name='DiscountedUsage',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('account_id', models.BigIntegerField()),
                ('usage_month', models.DateField()),
                ('base_amount', models.DecimalField(decimal_places=12, max_digits=38)),
                ('amount_minor', models.BigIntegerField()),
                ('discount', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+', to='invoicing.contractdiscount')),
                ('invoice', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+', to='invoicing.invoice')),
            ],
            options={
                'verbose_name_plural': 'discounted usage',
                'constraints': [models.UniqueConstraint(fields=('account_id', 'discount', 'usage_month', 'invoice'), name='invoicing_discountedusage_unique')],
            },
        ),
        migrations.RunSQL(
            """
            INSERT INTO invoicing_discountedusage (account_id, discount_id, usage_month, invoice_id, base_amount,
                                                   amount_minor)
            SELECT l.account_id, d.id, coalesce(l.usage_month, i.period_start), l.invoice_id,
                   sum(-l.rated_amount * 100 / d.percent), sum(l.amount_minor)
            FROM invoicing_invoiceline l
            JOIN invoicing_invoice i ON i.id = l.invoice_id AND i.status <> 'draft'
            JOIN LATERAL (
                SELECT d.id, d.percent FROM invoicing_contractdiscount d
                WHERE d.account_id = l.account_id AND d.sku_prefix = l.sku
                  AND d.valid_from < coalesce(l.usage_month, i.period_start) + interval '1 month'
                  AND (d.valid_until IS NULL OR d.valid_until > coalesce(l.usage_month, i.period_start))
                ORDER BY d.id LIMIT 1
            ) d ON true
            WHERE l.kind = 'discount'
            GROUP BY 1, 2, 3, 4
            ON CONFLICT DO NOTHING
            """,
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
