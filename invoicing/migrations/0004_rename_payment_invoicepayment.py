"""Payment → InvoicePayment: the payments app will own payments (attempts at the gateway);
this table records money received against an invoice. Empty in every deployment so far."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("invoicing", "0003_billing_lock")]

    operations = [migrations.RenameModel("Payment", "InvoicePayment")]
