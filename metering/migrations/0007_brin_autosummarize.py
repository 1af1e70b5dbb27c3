"""Summarise BRIN ranges as soon as they fill (not at the next vacuum): the rollup selects new
events by ``txid`` and would otherwise scan every not-yet-summarised range of a busy table."""

from django.db import migrations

SQL = """
DO $$
DECLARE idx regclass;
BEGIN
    FOR idx IN
        SELECT i.inhrelid::regclass FROM pg_inherits i
        WHERE i.inhparent IN ('metering_usageevent_txid_brin'::regclass, 'metering_usageevent_seq_brin'::regclass)
    LOOP
        EXECUTE format('ALTER INDEX %s SET (autosummarize = on)', idx);
    END LOOP;
END $$;
"""


class Migration(migrations.Migration):
    dependencies = [("metering", "0006_dailyusage")]

    operations = [migrations.RunSQL(sql=SQL, reverse_sql=migrations.RunSQL.noop)]
