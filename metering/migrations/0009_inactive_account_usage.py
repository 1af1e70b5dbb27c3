"""Usage accepted for accounts that were not active (pending, suspended, blocked), appended
per batch and account by ingestion, summed for the data-quality view."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('metering', '0008_rollup_fillfactor'),
    ]

    operations = [
        migrations.CreateModel(
            name='InactiveAccountUsage',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('account_id', models.BigIntegerField()),
                ('account_state', models.CharField(max_length=16)),
                ('events', models.IntegerField()),
                ('received_at', models.DateTimeField()),
            ],
            options={
                'verbose_name_plural': 'inactive account usage',
                'indexes': [models.Index(fields=['account_id', 'account_state'], name='metering_inactive_account')],
            },
        ),
    ]
