"""Rated amount per account and month, moved by the rollup; filled from the daily rollup."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('metering', '0009_inactive_account_usage'),
    ]

    operations = [
        migrations.CreateModel(
            name='MonthlySpend',
            fields=[
                ('pk', models.CompositePrimaryKey('account_id', 'month', blank=True, editable=False, primary_key=True, serialize=False)),
                ('account_id', models.BigIntegerField()),
                ('month', models.DateField()),
                ('amount', models.DecimalField(decimal_places=12, max_digits=38)),
            ],
            options={
                'verbose_name_plural': 'monthly spend',
            },
        ),
        migrations.RunSQL(
            """
            INSERT INTO metering_monthlyspend (account_id, month, amount)
            SELECT account_id, (date_trunc('month', day, 'UTC') AT TIME ZONE 'UTC')::date, sum(amount)
            FROM metering_dailyusage WHERE amount IS NOT NULL
            GROUP BY 1, 2
            """,
            migrations.RunSQL.noop,
        ),
    ]
