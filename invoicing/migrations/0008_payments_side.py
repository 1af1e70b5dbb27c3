"""The invoicing side of payments: refunds and settlements (``InvoiceRefund``,
``Invoice.amount_refunded_minor``), payments that keep an excess as customer credit
(``InvoicePayment.received_minor``, ``credit_grant``, ``invoice_paid``; ``amount_minor`` may
now be 0), the ``overpayment`` credit kind and the refund and dispute ledger sources.

Online: ``amount_refunded_minor`` is added with a database default (PostgreSQL 11+ adds such a
column without rewriting the table). Existing payments are backfilled by one UPDATE of
``invoicing_invoicepayment`` (received = applied; ``invoice_paid`` where the invoice's move to
``paid`` names the payment); the re-created check constraints scan their tables once under a
short exclusive lock. On a large installation, run the UPDATE in batches by id first and add
the constraints ``NOT VALID`` followed by ``VALIDATE CONSTRAINT`` (a lighter lock).
"""

import billing_site.common.ids
import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('invoicing', '0007_discounted_usage'),
    ]

    operations = [
        migrations.CreateModel(
            name='InvoiceRefund',
            fields=[
                ('id', models.BigIntegerField(default=billing_site.common.ids.new_id, editable=False, primary_key=True, serialize=False)),
                ('account_id', models.BigIntegerField()),
                ('amount_minor', models.BigIntegerField()),
                ('currency', models.CharField(max_length=3)),
                ('method', models.CharField(choices=[('card', 'Refunded to the card'), ('credit', 'Kept as customer credit')], max_length=8)),
                ('reference', models.CharField(max_length=128, unique=True)),
                ('reason', models.TextField(blank=True, default='')),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
        ),
        migrations.RemoveConstraint(
            model_name='invoice',
            name='invoicing_invoice_amounts_not_negative',
        ),
        migrations.RemoveConstraint(
            model_name='invoicepayment',
            name='invoicing_payment_positive',
        ),
        migrations.AddField(
            model_name='invoice',
            name='amount_refunded_minor',
            field=models.BigIntegerField(db_default=0, default=0, help_text='Given back: to the card or as credit'),
        ),
        migrations.AddField(
            model_name='invoicepayment',
            name='credit_grant',
            field=models.ForeignKey(blank=True, help_text='The excess', null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='invoicing.creditgrant'),
        ),
        migrations.AddField(
            model_name='invoicepayment',
            name='invoice_paid',
            field=models.BooleanField(default=False, help_text='The invoice was paid once this was recorded'),
        ),
        migrations.AddField(
            model_name='invoicepayment',
            name='received_minor',
            field=models.BigIntegerField(default=0, help_text='Received in all'),
        ),
        migrations.RunSQL(
            """
            UPDATE invoicing_invoicepayment p SET received_minor = p.amount_minor,
                invoice_paid = EXISTS (
                    SELECT FROM invoicing_invoicetransition t
                    WHERE t.invoice_id = p.invoice_id AND t.to_state = 'paid' AND t.reason = 'payment ' || p.reference)
            """,
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name='creditgrant',
            name='kind',
            field=models.CharField(choices=[('promotional', 'Promotional'), ('prepaid', 'Prepaid'), ('overpayment', 'Overpayment kept as credit')], max_length=16),
        ),
        migrations.AlterField(
            model_name='invoicepayment',
            name='amount_minor',
            field=models.BigIntegerField(help_text='Applied to the invoice'),
        ),
        migrations.AlterField(
            model_name='ledgerentry',
            name='source_type',
            field=models.CharField(choices=[('invoice', 'Issued invoice'), ('invoice_credit', 'Credit spent on an invoice'), ('credit_grant', 'Credit grant'), ('payment', 'Payment received'), ('credit_note', 'Credit note'), ('credit_reversal', 'Credit given back on a void'), ('write_off', 'Write-off'), ('refund', 'Refund to the card'), ('dispute_opened', 'Dispute opened (funds withdrawn)'), ('dispute_won', 'Dispute won (funds returned)'), ('dispute_lost', 'Dispute lost (chargeback)')], max_length=32),
        ),
        migrations.AddConstraint(
            model_name='invoice',
            constraint=models.CheckConstraint(condition=models.Q(('amount_credited_minor__gte', 0), ('amount_paid_minor__gte', 0), ('amount_refunded_minor__gte', 0), ('credits_applied_minor__gte', 0)), name='invoicing_invoice_amounts_not_negative'),
        ),
        migrations.AddConstraint(
            model_name='invoicepayment',
            constraint=models.CheckConstraint(condition=models.Q(('amount_minor__gte', 0), ('amount_minor__lte', models.F('received_minor')), ('received_minor__gt', 0)), name='invoicing_payment_amounts'),
        ),
        migrations.AddConstraint(
            model_name='invoicepayment',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('amount_minor', models.F('received_minor')), ('credit_grant__isnull', True)), models.Q(('amount_minor__lt', models.F('received_minor')), ('credit_grant__isnull', False)), _connector='OR'), name='invoicing_payment_excess_granted'),
        ),
        migrations.AddField(
            model_name='invoicerefund',
            name='credit_note',
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='refunds', to='invoicing.creditnote'),
        ),
        migrations.AddField(
            model_name='invoicerefund',
            name='grant',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='invoicing.creditgrant'),
        ),
        migrations.AddField(
            model_name='invoicerefund',
            name='invoice',
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='refunds', to='invoicing.invoice'),
        ),
        migrations.AddIndex(
            model_name='invoicerefund',
            index=models.Index(fields=['account_id', 'created_at'], name='invoicing_refund_account'),
        ),
        migrations.AddConstraint(
            model_name='invoicerefund',
            constraint=models.CheckConstraint(condition=models.Q(('amount_minor__gt', 0)), name='invoicing_refund_positive'),
        ),
        migrations.AddConstraint(
            model_name='invoicerefund',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('grant__isnull', True), ('method', 'card')), models.Q(('grant__isnull', False), ('method', 'credit')), _connector='OR'), name='invoicing_refund_method_grant'),
        ),
    ]
