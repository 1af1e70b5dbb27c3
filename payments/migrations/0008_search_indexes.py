"""Indexes behind the back office's search: a card by its last four digits, a payment by the
gateway's charge id. Built CONCURRENTLY (not atomic): charges go on while they build."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ('payments', '0007_audit_trail_events'),
    ]

    operations = [
        AddIndexConcurrently(
            model_name='payment',
            index=models.Index(condition=models.Q(('gateway_charge_id', ''), _negated=True), fields=['gateway_charge_id'], name='payments_payment_charge'),
        ),
        AddIndexConcurrently(
            model_name='paymentmethod',
            index=models.Index(fields=['last4', 'created_at'], name='payments_pm_last4'),
        ),
    ]
