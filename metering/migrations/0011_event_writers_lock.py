"""The event writers' lock, enforced by the database (see ``metering/horizon.py``).

The rollup's horizon is safe only if every transaction that inserts raw events held the
shared advisory lock ``EVENT_WRITERS_LOCK`` from before it was given a txid until it ended.
A statement trigger on the event table (and on each partition, for an insert that names one)
takes the lock when the inserting transaction has no txid yet (a writer that forgot it, say a
script in psql, is then correct anyway), and refuses the insert when the transaction already
has a txid without having taken the lock first: its events could fall below a horizon the
rollup reads while it is still open. ``metering.horizon.writer_lock`` sets the flag that the
trigger checks. Costs one function call per insert statement (a batch), not per row.
"""

from django.db import migrations

# The values of metering.horizon, spelled out: a migration must not change when code does.
EVENT_WRITERS_LOCK = 0x6D65746572696E67
WRITER_FLAG = "metering.event_writer"

FUNCTION = f"""
CREATE OR REPLACE FUNCTION metering_event_writers_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('{WRITER_FLAG}', true), '') <> 'on' THEN
        IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
            RAISE EXCEPTION 'a transaction that inserts into % must take the event writers'' lock before its first write',
                TG_TABLE_NAME
                USING ERRCODE = '55000',
                      HINT = 'call metering.horizon.writer_lock() first, or make the event insert the first write';
        END IF;
        PERFORM pg_advisory_xact_lock_shared({EVENT_WRITERS_LOCK});
        PERFORM set_config('{WRITER_FLAG}', 'on', true);
    END IF;
    RETURN NULL;
END
$$
"""

TRIGGERS = """
DO $$
DECLARE t regclass;
BEGIN
    FOR t IN SELECT 'metering_usageevent'::regclass
             UNION ALL SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'metering_usageevent'::regclass
    LOOP
        EXECUTE format('CREATE TRIGGER metering_event_writers_lock BEFORE INSERT ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION metering_event_writers_lock()', t);
    END LOOP;
END
$$
"""

DROP = """
DO $$
DECLARE t regclass;
BEGIN
    FOR t IN SELECT 'metering_usageevent'::regclass
             UNION ALL SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'metering_usageevent'::regclass
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS metering_event_writers_lock ON %s', t);
    END LOOP;
END
$$;
DROP FUNCTION IF EXISTS metering_event_writers_lock();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("metering", "0010_monthly_spend"),
    ]

    operations = [
        migrations.RunSQL(FUNCTION + ";\n" + TRIGGERS, DROP),
    ]
