"""Why an account moved: ``cause`` on each transition and ``state_cause`` on the account.

Existing rows get the cause their actor always meant (customers' are theirs, staff's are
staff's; payments suspended for debt and reactivated when it was settled, antifraud blocked
for fraud), then each account the cause of its last transition. Both columns are added with a
database default (no table rewrite on PostgreSQL 11+); the backfill is one UPDATE per table,
which on a large transition table should run in batches outside the migration instead.
"""

import django_fsm
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0005_billing_account_phone_db_default'),
    ]

    operations = [
        migrations.AddField(
            model_name='billingaccount',
            name='state_cause',
            field=models.CharField(blank=True, choices=[('debt', 'unpaid debt'), ('debt_settled', 'debt settled'), ('fraud', 'fraud review'), ('staff', 'by staff'), ('customer', 'by the customer'), ('system', 'automatic')], db_default='', default='', max_length=16),
        ),
        migrations.AddField(
            model_name='billingaccounttransition',
            name='cause',
            field=models.CharField(blank=True, choices=[('debt', 'unpaid debt'), ('debt_settled', 'debt settled'), ('fraud', 'fraud review'), ('staff', 'by staff'), ('customer', 'by the customer'), ('system', 'automatic')], db_default='', default='', max_length=16),
        ),
        migrations.AlterField(
            model_name='billingaccount',
            name='state',
            field=django_fsm.FSMField(choices=[('pending', 'Pending'), ('active', 'Active'), ('suspended', 'Suspended'), ('blocked', 'Blocked'), ('closed', 'Closed')], db_index=True, default='pending', max_length=50, protected=True),
        ),
        migrations.AlterField(
            model_name='billingaccounttransition',
            name='from_state',
            field=models.CharField(choices=[('pending', 'Pending'), ('active', 'Active'), ('suspended', 'Suspended'), ('blocked', 'Blocked'), ('closed', 'Closed')], max_length=16),
        ),
        migrations.AlterField(
            model_name='billingaccounttransition',
            name='to_state',
            field=models.CharField(choices=[('pending', 'Pending'), ('active', 'Active'), ('suspended', 'Suspended'), ('blocked', 'Blocked'), ('closed', 'Closed')], max_length=16),
        ),
        migrations.RunSQL(
            """
            UPDATE accounts_billingaccounttransition SET cause = CASE
                WHEN actor_kind = 'user' THEN 'customer'
                WHEN actor_kind = 'operator' THEN 'staff'
                WHEN transition = 'suspend' THEN 'debt'
                WHEN transition = 'reactivate' THEN 'debt_settled'
                WHEN transition IN ('block', 'unblock') THEN 'fraud'
                ELSE 'system' END
            WHERE cause = '';
            UPDATE accounts_billingaccount a SET state_cause = t.cause
            FROM (SELECT DISTINCT ON (account_id) account_id, cause FROM accounts_billingaccounttransition
                  ORDER BY account_id, created_at DESC, id DESC) t
            WHERE t.account_id = a.id AND a.state_cause = '';
            """,
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
