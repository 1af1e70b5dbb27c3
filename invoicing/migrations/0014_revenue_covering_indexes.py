"""Revenue of a month (``selectors.revenue``, on the finance page and the staff home page) from
the indexes alone: a month of invoices by ``issued_at`` and of payments by ``received_at``, each
index carrying the currency and the amount (and the invoice's status), so summing a million of
them reads no heap. They replace the plain ``issued_at`` and ``received_at`` indexes, which
served nothing else.

Built CONCURRENTLY (no lock on writers; this migration is not atomic), the new ones before the
old ones are dropped; on a large table each takes about as long as a scan of it. If it is
interrupted, drop the INVALID index left behind and run the migration again."""

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("invoicing", "0013_audit_trail_events"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="invoice",
            index=models.Index(
                fields=["issued_at"], include=["currency", "status", "total_minor"], name="invoicing_invoice_revenue"
            ),
        ),
        AddIndexConcurrently(
            model_name="invoicepayment",
            index=models.Index(
                fields=["received_at"], include=["currency", "received_minor"], name="invoicing_payment_revenue"
            ),
        ),
        RemoveIndexConcurrently(model_name="invoice", name="invoicing_invoice_issued"),
        RemoveIndexConcurrently(model_name="invoicepayment", name="invoicing_payment_received"),
    ]
