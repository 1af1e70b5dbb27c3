"""An index for the last period close's progress (``selectors.period_close_progress``: the staff
home page and /metrics): monthly invoices by (period_start, status, issued_at), so the newest
month's counts by status and its last issue come from the index alone (an index-only scan of
one month instead of reading a million invoices from the heap).

Built CONCURRENTLY (no lock on writers; this migration is not atomic): on a large table it
takes about as long as a scan of it; if it is interrupted, drop the INVALID index left behind
and run the migration again."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("invoicing", "0011_finance_report_indexes_and_four_eyes_requests"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="invoice",
            index=models.Index(
                condition=models.Q(("kind", "period")),
                fields=["period_start", "status", "issued_at"],
                name="invoicing_invoice_closed",
            ),
        ),
    ]
