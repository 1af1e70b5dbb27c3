"""Staff notes on customers, and the indexes behind the back office's search (email and name by
their beginning in any case, tax id exactly). The billing account's indexes are built
CONCURRENTLY (the migration is not atomic): writes to accounts go on while they build."""

import django.contrib.postgres.indexes
from django.contrib.postgres.operations import AddIndexConcurrently
import django.db.models.deletion
import django.db.models.functions.text
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ('accounts', '0008_audit_trail_events'),
    ]

    operations = [
        migrations.CreateModel(
            name='AccountNote',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('author_name', models.CharField(help_text="The operator's email when the note was written.", max_length=254)),
                ('text', models.TextField()),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['-created_at', '-id'],
            },
        ),
        AddIndexConcurrently(
            model_name='billingaccount',
            index=models.Index(django.contrib.postgres.indexes.OpClass(django.db.models.functions.text.Lower('email'), name='text_pattern_ops'), name='accounts_ba_email_lower'),
        ),
        AddIndexConcurrently(
            model_name='billingaccount',
            index=models.Index(django.contrib.postgres.indexes.OpClass(django.db.models.functions.text.Lower('name'), name='text_pattern_ops'), name='accounts_ba_name_lower'),
        ),
        AddIndexConcurrently(
            model_name='billingaccount',
            index=models.Index(condition=models.Q(('tax_id', ''), _negated=True), fields=['tax_id'], name='accounts_ba_tax_id'),
        ),
        migrations.AddField(
            model_name='accountnote',
            name='account',
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='notes', to='accounts.billingaccount'),
        ),
        migrations.AddField(
            model_name='accountnote',
            name='author',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddIndex(
            model_name='accountnote',
            index=models.Index(fields=['account', '-created_at'], name='accounts_note_account_time'),
        ),
        migrations.AddConstraint(
            model_name='accountnote',
            constraint=models.CheckConstraint(condition=models.Q(('text', ''), _negated=True), name='accounts_note_text_not_empty'),
        ),
    ]
