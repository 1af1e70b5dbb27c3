"""Hourly usage in monthly partitions, so that old months are dropped whole, not deleted row by row.

Each of the 16 hash partitions of ``metering_hourlyusage`` (the rollup's shards, migration 0004)
becomes itself partitioned by RANGE (``hour``): one partition per calendar month (UTC), named
``metering_hourlyusage_pNN_yYYYYmMM``, and a DEFAULT partition ``metering_hourlyusage_pNN_default``
so that an insert never fails. ``metering/partitions.py`` keeps them from then on (creates the
coming months, drops those beyond ``METERING_HOURLY_RETENTION_MONTHS``).

Per shard, in this migration's transaction: the old partition is detached and renamed (its
indexes too), the new one created under the old name with the partitions of every month that
has rows and of every month rows can be written to now, the rows copied over, the old table
dropped. The primary key (account_id, hour, sku, resource_id, labels) already holds ``hour``, so
it and the resource index (account_id, resource_id, hour) are inherited unchanged by every
partition; the fillfactor 70 of migration 0008 is set on each leaf (a partitioned table has no
storage of its own). The shards keep their names, so the rollup, which writes a shard by name,
is unchanged, and so is every query on ``metering_hourlyusage``.

This rewrites the table under an ACCESS EXCLUSIVE lock: seconds for a few million rows. On a
large installation stop the rollup first (nothing else writes the table) and expect about the
time of a copy of the table.
"""

import datetime as dt

from django.conf import settings
from django.db import migrations
from django.utils import timezone

SHARDS = 16
TABLE = "metering_hourlyusage"
COLUMNS = "account_id, hour, sku, resource_id, labels, quantity, amount, cum_quantity, unit_seconds"
MONTHS_AHEAD = 2
FILLFACTOR = 70


def add_months(month: dt.date, months: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, 1)


def utc(month: dt.date) -> str:
    return dt.datetime.combine(month, dt.time(), tzinfo=dt.UTC).isoformat()


def months_to_have(now: dt.datetime) -> set[dt.date]:
    month = (now - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)).astimezone(dt.UTC).date().replace(day=1)
    last = add_months(now.astimezone(dt.UTC).date().replace(day=1), MONTHS_AHEAD)
    months = set()
    while month <= last:
        months.add(month)
        month = add_months(month, 1)
    return months


def to_months(apps, schema_editor):  # type: ignore[no-untyped-def]
    wanted = months_to_have(timezone.now())
    with schema_editor.connection.cursor() as cur:
        for shard in range(SHARDS):
            part, old = f"{TABLE}_p{shard:02d}", f"{TABLE}_p{shard:02d}_hash_old"
            cur.execute(
                f"SELECT DISTINCT (date_trunc('month', hour, 'UTC') AT TIME ZONE 'UTC')::date FROM {part}"  # noqa: S608
            )
            months = wanted | {row[0] for row in cur.fetchall()}
            cur.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {part}")
            cur.execute(f"ALTER TABLE {part} RENAME TO {old}")
            cur.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass", [old])
            for i, (index,) in enumerate(cur.fetchall()):
                cur.execute(f"ALTER INDEX {index} RENAME TO {old}_{i}")
            cur.execute(
                f"CREATE TABLE {part} PARTITION OF {TABLE} FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {shard}) "
                "PARTITION BY RANGE (hour)"
            )
            cur.execute(f"CREATE TABLE {part}_default PARTITION OF {part} DEFAULT WITH (fillfactor = {FILLFACTOR})")
            for month in sorted(months):
                cur.execute(
                    f"CREATE TABLE {part}_y{month.year:04d}m{month.month:02d} PARTITION OF {part} "
                    f"FOR VALUES FROM ('{utc(month)}') TO ('{utc(add_months(month, 1))}') "
                    f"WITH (fillfactor = {FILLFACTOR})"
                )
            cur.execute(f"INSERT INTO {part} ({COLUMNS}) SELECT {COLUMNS} FROM {old}")  # noqa: S608
            cur.execute(f"DROP TABLE {old}")
            cur.execute(f"ANALYZE {part}")


def to_hash_only(apps, schema_editor):  # type: ignore[no-untyped-def]
    with schema_editor.connection.cursor() as cur:
        for shard in range(SHARDS):
            part, old = f"{TABLE}_p{shard:02d}", f"{TABLE}_p{shard:02d}_by_month"
            cur.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {part}")
            cur.execute(f"ALTER TABLE {part} RENAME TO {old}")
            cur.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass", [old])
            for i, (index,) in enumerate(cur.fetchall()):
                cur.execute(f"ALTER INDEX {index} RENAME TO {old}_{i}")
            cur.execute(
                f"CREATE TABLE {part} PARTITION OF {TABLE} FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {shard}) "
                f"WITH (fillfactor = {FILLFACTOR})"
            )
            cur.execute(f"INSERT INTO {part} ({COLUMNS}) SELECT {COLUMNS} FROM {old}")  # noqa: S608
            cur.execute(f"DROP TABLE {old}")


class Migration(migrations.Migration):
    dependencies = [("metering", "0013_scale_path_hours")]

    operations = [migrations.RunPython(to_months, to_hash_only)]
