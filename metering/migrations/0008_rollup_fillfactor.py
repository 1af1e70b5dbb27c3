"""Room on every page of the hourly and daily rollups for the next version of their rows.

The rollup rewrites the current hour's and the current day's rows on every pass (a new
quantity and amount; never a key column). With free space on the page the new version
stays there and is heap-only (HOT): no new entries in the primary key or the resource
index, and the old version is pruned in place. Without it every update is a new row in
every index.

Online: ``SET (fillfactor)`` is a catalog change under SHARE UPDATE EXCLUSIVE (reads and
writes go on); it applies to pages written from now on, which is where the rows the rollup
keeps rewriting live. Existing full pages keep their layout until rewritten.
"""

from django.db import migrations

PARTITIONS = 16
TABLES = ("metering_hourlyusage", "metering_dailyusage")


class Migration(migrations.Migration):
    dependencies = [("metering", "0007_brin_autosummarize")]

    operations = [
        migrations.RunSQL(
            sql=[f"ALTER TABLE {t}_p{i:02d} SET (fillfactor = 70)" for t in TABLES for i in range(PARTITIONS)],
            reverse_sql=[f"ALTER TABLE {t}_p{i:02d} RESET (fillfactor)" for t in TABLES for i in range(PARTITIONS)],
        ),
    ]
