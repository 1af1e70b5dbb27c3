"""The raw event table, by hand: Django cannot declare a partitioned table.

Hash partitions by account_id keep the primary key (account_id, event_id) legal on a
partitioned table and spread per-account work; 16 partitions today, re-partitioned (or
distributed by account_id, e.g. with Citus) when one machine is outgrown. ``seq`` comes
from a cached sequence and is BRIN-indexed (no second B-tree on the hot insert path); it is
only roughly arrival order, so the rollup reads by inserting transaction (migration 0004).
Retention is an open design question: see docs/benchmarks.md.
"""

from django.db import migrations

PARTITIONS = 16

CREATE = [
    "CREATE SEQUENCE metering_usageevent_seq AS bigint CACHE 1000",
    """
    CREATE TABLE metering_usageevent (
        account_id  bigint      NOT NULL,
        event_id    text        NOT NULL,
        seq         bigint      NOT NULL DEFAULT nextval('metering_usageevent_seq'),
        occurred_at timestamptz NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        kind        text        NOT NULL,
        sku         text,
        quantity    numeric(25, 12),
        resource_id text,
        action      text,
        spec        jsonb,
        labels      jsonb,
        PRIMARY KEY (account_id, event_id)
    ) PARTITION BY HASH (account_id)
    """,
    "ALTER SEQUENCE metering_usageevent_seq OWNED BY metering_usageevent.seq",
    *[
        f"CREATE TABLE metering_usageevent_p{i:02d} PARTITION OF metering_usageevent "
        f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
        for i in range(PARTITIONS)
    ],
    "CREATE INDEX metering_usageevent_seq_brin ON metering_usageevent USING brin (seq)",
]


class Migration(migrations.Migration):
    dependencies = [("metering", "0001_initial")]

    operations = [
        migrations.RunSQL(sql=CREATE, reverse_sql=["DROP TABLE metering_usageevent"]),
    ]
