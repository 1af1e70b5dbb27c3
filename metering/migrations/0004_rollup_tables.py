"""Rollup tables, by hand: all hash-partitioned by account_id with the same 16 partitions as
the event table, so one shard of work (one remainder) touches one partition of each.

- ``usageevent.txid``: the inserting transaction's id. A rollup shard consumes events with
  ``horizon_old <= txid < pg_snapshot_xmin(now)``: every transaction below the snapshot's xmin
  has finished, so nothing still in flight can be skipped (a sequence cannot promise that:
  values are handed out before commit, out of order). BRIN-indexed, like ``seq``.
- ``resourceevent``: each resource's lifecycle timeline, ordered by event time.
- ``resourcestate``: where each resource's timeline leaves it (running since …, with what
  spec and labels) and its data-quality counters, recomputed from the whole timeline.
- ``hourlyusage``: quantity and amount per (account, hour, SKU, resource, labels); for
  graduated prices ``cum_quantity`` is the month's running total in rating order.
- ``rollupshard``: per remainder, the txid horizon and the hour watermark.
"""

from django.db import migrations

PARTITIONS = 16


def partitions(table: str) -> list[str]:
    return [
        f"CREATE TABLE {table}_p{i:02d} PARTITION OF {table} FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
        for i in range(PARTITIONS)
    ]


CREATE = [
    "ALTER TABLE metering_usageevent ADD COLUMN txid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)",
    "CREATE INDEX metering_usageevent_txid_brin ON metering_usageevent USING brin (txid)",
    """
    CREATE TABLE metering_resourceevent (
        account_id  bigint      NOT NULL,
        resource_id text        NOT NULL,
        occurred_at timestamptz NOT NULL,
        event_id    text        NOT NULL,
        action      text        NOT NULL,
        spec        jsonb,
        labels      jsonb       NOT NULL DEFAULT '{}',
        PRIMARY KEY (account_id, resource_id, occurred_at, event_id)
    ) PARTITION BY HASH (account_id)
    """,
    *partitions("metering_resourceevent"),
    """
    CREATE TABLE metering_resourcestate (
        account_id           bigint      NOT NULL,
        resource_id          text        NOT NULL,
        running              boolean     NOT NULL,
        since                timestamptz,
        spec                 jsonb,
        labels               jsonb       NOT NULL DEFAULT '{}',
        last_event_at        timestamptz NOT NULL,
        events               integer     NOT NULL,
        start_while_running  integer     NOT NULL DEFAULT 0,
        stop_while_stopped   integer     NOT NULL DEFAULT 0,
        update_while_stopped integer     NOT NULL DEFAULT 0,
        updated_at           timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (account_id, resource_id)
    ) PARTITION BY HASH (account_id)
    """,
    *partitions("metering_resourcestate"),
    "CREATE INDEX metering_resourcestate_running ON metering_resourcestate (account_id) WHERE running",
    """
    CREATE TABLE metering_hourlyusage (
        account_id   bigint          NOT NULL,
        hour         timestamptz     NOT NULL,
        sku          text            NOT NULL,
        resource_id  text            NOT NULL DEFAULT '',
        labels       jsonb           NOT NULL DEFAULT '{}',
        quantity     numeric(38, 12) NOT NULL,
        amount       numeric(38, 12),
        cum_quantity numeric(38, 12),
        PRIMARY KEY (account_id, hour, sku, resource_id, labels)
    ) PARTITION BY HASH (account_id)
    """,
    *partitions("metering_hourlyusage"),
    "CREATE INDEX metering_hourlyusage_resource ON metering_hourlyusage (account_id, resource_id, hour)",
]


class Migration(migrations.Migration):
    dependencies = [("metering", "0003_ingest_batch")]

    operations = [
        migrations.RunSQL(
            sql=CREATE,
            reverse_sql=[
                "DROP TABLE metering_hourlyusage",
                "DROP TABLE metering_resourcestate",
                "DROP TABLE metering_resourceevent",
                "ALTER TABLE metering_usageevent DROP COLUMN txid",
            ],
        ),
    ]
