"""Durations kept exact: ``unit_seconds`` on the hourly and daily rollups.

A duration SKU's hourly quantity is units x seconds / 3600, rounded to 12 places per hourly
piece; a month summed from ~744 such pieces showed 10^-12 artefacts in the costs API
(``102076.199999999999``). ``unit_seconds`` keeps units x seconds exactly (a spec's units
have at most 12 places and times microseconds, so the product is an exact ``numeric``), and
readers divide a sum once (``metering.selectors``). ``quantity`` and ``amount`` are kept as
they were, so rated amounts do not change by a digit. NULL on quantity SKUs.

Rows rolled up before this migration get ``quantity x 3600``: their sums divide back to
exactly the sums of their quantities (what invoices already billed), so no month changes and
no adjustment appears; rows the rollup writes from now on are exact. Adding a nullable column
is a catalog change; the backfill rewrites the duration rows once, in this migration's
transaction. On a large installation run the two UPDATEs per partition and in batches before
deploying (they are idempotent: ``WHERE unit_seconds IS NULL``); the rollup writes the column
for new rows either way.
"""

from django.db import migrations

BACKFILL = """
UPDATE {table} t SET unit_seconds = t.quantity * 3600
FROM metering_sku k
WHERE k.code = t.sku AND k.kind = 'duration' AND t.unit_seconds IS NULL
"""


class Migration(migrations.Migration):
    dependencies = [
        ("metering", "0011_event_writers_lock"),
    ]

    operations = [
        migrations.RunSQL(
            [
                "ALTER TABLE metering_hourlyusage ADD COLUMN unit_seconds numeric",
                "ALTER TABLE metering_dailyusage ADD COLUMN unit_seconds numeric",
                BACKFILL.format(table="metering_hourlyusage"),
                BACKFILL.format(table="metering_dailyusage"),
            ],
            [
                "ALTER TABLE metering_hourlyusage DROP COLUMN unit_seconds",
                "ALTER TABLE metering_dailyusage DROP COLUMN unit_seconds",
            ],
        ),
    ]
