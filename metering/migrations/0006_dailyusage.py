"""Daily rollup of the rated hourly usage, kept by the rollup for the days it touches: the
costs API answers day and month breakdowns from 24x fewer rows."""

from django.db import migrations

PARTITIONS = 16

CREATE = [
    """
    CREATE TABLE metering_dailyusage (
        account_id  bigint          NOT NULL,
        day         timestamptz     NOT NULL,
        sku         text            NOT NULL,
        resource_id text            NOT NULL DEFAULT '',
        labels      jsonb           NOT NULL DEFAULT '{}',
        quantity    numeric(38, 12) NOT NULL,
        amount      numeric(38, 12),
        PRIMARY KEY (account_id, day, sku, resource_id, labels)
    ) PARTITION BY HASH (account_id)
    """,
    *[
        f"CREATE TABLE metering_dailyusage_p{i:02d} PARTITION OF metering_dailyusage "
        f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
        for i in range(PARTITIONS)
    ],
    # Days already rolled up before this table existed.
    """
    INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount)
    SELECT account_id, date_trunc('day', hour, 'UTC'), sku, resource_id, labels, sum(quantity), sum(amount)
    FROM metering_hourlyusage GROUP BY 1, 2, 3, 4, 5
    """,
]


class Migration(migrations.Migration):
    dependencies = [("metering", "0005_rollup_shard")]

    operations = [migrations.RunSQL(sql=CREATE, reverse_sql=["DROP TABLE metering_dailyusage"])]
