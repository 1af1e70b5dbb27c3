"""Hourly usage in monthly partitions: created ahead, dropped whole after the retention.

``metering_hourlyusage`` is hash-partitioned by account into the 16 shards the rollup works on
(``metering_hourlyusage_p00`` … ``_p15``, migration 0004), and each shard is range-partitioned
by ``hour`` into calendar months (UTC) since migration 0014:

    metering_hourlyusage_p03              FOR VALUES WITH (MODULUS 16, REMAINDER 3)  -- by hour
      metering_hourlyusage_p03_y2026m11   FOR VALUES FROM ('2026-11-01 00:00+00') TO ('2026-12-01 00:00+00')
      metering_hourlyusage_p03_default    DEFAULT

The rollup keeps writing a shard by name (``metering_hourlyusage_p03``); PostgreSQL routes each
row to its month. The DEFAULT partition exists so that an insert never fails: a row for a month
without a partition lands there, and ``maintain`` says so (a warning) and moves it into the
month's partition when it creates it.

``maintain`` (the daily task ``metering.hourly_partitions_maintain``, ``manage.py
hourly_partitions``):

1. creates, in every shard, the partitions of the months hourly rows can be written to now
   (from the oldest hour still accepted, ``METERING_MAX_EVENT_AGE_DAYS``, to ``MONTHS_AHEAD``
   months after the current one), and of every month that has rows in DEFAULT;
2. drops the month partitions older than ``METERING_HOURLY_RETENTION_MONTHS`` months before
   the current one: DETACH, then DROP (no row-by-row DELETE, no dead tuples, no vacuum), once
   each of the month's days has its daily rows equal to the sums of its hours (what costs by
   day and month, invoices and the monthly spend read after the hours are gone). A month whose
   daily rows disagree is kept, with an error log.

Each partition created or dropped is one transaction and one log line. DDL waits at most
``LOCK_TIMEOUT`` for the shard's rollup (which holds the shard's partitions while it runs);
a partition that could not get its lock is logged and left for the next run.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from metering.sharding import SHARDS

log = logging.getLogger(__name__)

TABLE = "metering_hourlyusage"
MONTHS_AHEAD = 2  # partitions of the next two months exist before their first hour
FILLFACTOR = 70  # as migration 0008 set on the shards: room for the rollup's HOT updates
LOCK_TIMEOUT = "10s"
_MONTH_NAME = re.compile(r"_y(\d{4})m(\d{2})$")


def month_of(moment: dt.datetime | dt.date) -> dt.date:
    """The first day of ``moment``'s calendar month (UTC)."""
    if isinstance(moment, dt.datetime):
        moment = moment.astimezone(dt.UTC).date()
    return moment.replace(day=1)


def add_months(month: dt.date, months: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, 1)


def month_start(month: dt.date) -> dt.datetime:
    return dt.datetime.combine(month, dt.time(), tzinfo=dt.UTC)


def shard_table(shard: int) -> str:
    return f"{TABLE}_p{shard:02d}"


def month_table(shard: int, month: dt.date) -> str:
    return f"{TABLE}_p{shard:02d}_y{month.year:04d}m{month.month:02d}"


def default_table(shard: int) -> str:
    return f"{TABLE}_p{shard:02d}_default"


def hourly_kept_from(now: dt.datetime) -> dt.datetime:
    """The first hour whose hourly rows are kept at ``now``: the first of the month
    ``METERING_HOURLY_RETENTION_MONTHS`` months before the current one. Months before it are
    dropped (by the next ``maintain``); their days and months stay in the daily rollup."""
    return month_start(add_months(month_of(now), -settings.METERING_HOURLY_RETENTION_MONTHS))


def replay_floor(now: dt.datetime) -> dt.datetime:
    """The earliest hour a rollup run may rewrite at ``now``: a month after ``hourly_kept_from``,
    a month of margin between the clock of the run and that of the maintenance (a month that
    is being dropped, or just was, is never written again: its rows would come back as new and
    be added to its days a second time)."""
    return add_months_dt(hourly_kept_from(now), 1)


def add_months_dt(moment: dt.datetime, months: int) -> dt.datetime:
    return month_start(add_months(month_of(moment), months))


@dataclass
class MaintainReport:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    moved_rows: int = 0
    kept: list[str] = field(default_factory=list)  # old months not dropped (daily rows disagree, lock busy)
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would create" if self.dry_run else "created"
        return (
            f"{verb} {len(self.created)} partitions, {'would drop' if self.dry_run else 'dropped'} "
            f"{len(self.dropped)}, {self.moved_rows} rows moved out of DEFAULT, {len(self.kept)} old kept"
        )


def month_partitions(cur: object, shard: int) -> dict[dt.date, str]:
    """The month partitions of one shard, by month (from their names, which only this module
    and migration 0014 give)."""
    cur.execute(  # type: ignore[attr-defined]
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        [shard_table(shard)],
    )
    months: dict[dt.date, str] = {}
    for (name,) in cur.fetchall():  # type: ignore[attr-defined]
        found = _MONTH_NAME.search(name)
        if found:
            months[dt.date(int(found[1]), int(found[2]), 1)] = name
    return months


def default_months(cur: object, shard: int) -> dict[dt.date, int]:
    """Months with rows in the shard's DEFAULT partition, and how many."""
    cur.execute(  # type: ignore[attr-defined]
        f"SELECT (date_trunc('month', hour, 'UTC') AT TIME ZONE 'UTC')::date, count(*) "  # noqa: S608 (our table)
        f"FROM {default_table(shard)} GROUP BY 1 ORDER BY 1"
    )
    return dict(cur.fetchall())  # type: ignore[attr-defined]


def _create(cur: object, shard: int, month: dt.date) -> int:
    """The month's partition, with the DEFAULT partition's rows of that month moved into it
    (a partition cannot be attached while DEFAULT holds rows of its range); rows moved."""
    name, parent, lo, hi = (
        month_table(shard, month),
        shard_table(shard),
        month_start(month),
        month_start(add_months(month, 1)),
    )
    bound = f"FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
    check = f"CHECK (hour >= '{lo.isoformat()}' AND hour < '{hi.isoformat()}')"
    cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")  # type: ignore[attr-defined]
    cur.execute(  # type: ignore[attr-defined]
        f"CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS, CONSTRAINT {name}_bound {check}) "
        f"WITH (fillfactor = {FILLFACTOR})"
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        WITH moved AS (DELETE FROM {default_table(shard)} WHERE hour >= %(lo)s AND hour < %(hi)s RETURNING *)
        INSERT INTO {name} SELECT * FROM moved
        """,  # noqa: S608 (our tables)
        {"lo": lo, "hi": hi},
    )
    moved: int = cur.rowcount  # type: ignore[attr-defined]
    # The CHECK, which implies the bound, spares ATTACH a scan of the new table; then it goes.
    cur.execute(f"ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES {bound}")  # type: ignore[attr-defined]
    cur.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bound")  # type: ignore[attr-defined]
    return moved


def daily_mismatches(cur: object, shard: int, month: dt.date) -> int:
    """Days of the month (in one shard) whose hourly rows do not add up to the daily rows:
    (account, day, SKU, resource, labels) groups whose summed quantity, amount or unit seconds
    is not exactly a daily row. Zero means the daily rollup holds everything the hours say."""
    cur.execute(  # type: ignore[attr-defined]
        f"""
        SELECT count(*) FROM (
            SELECT account_id, date_trunc('day', hour, 'UTC'), sku, resource_id, labels,
                   sum(quantity), sum(amount), sum(unit_seconds)
            FROM {month_table(shard, month)}
            GROUP BY 1, 2, 3, 4, 5
            EXCEPT
            SELECT account_id, day, sku, resource_id, labels, quantity, amount, unit_seconds
            FROM {TABLE.replace("hourly", "daily")}_p{shard:02d}
            WHERE day >= %(lo)s AND day < %(hi)s
        ) missing
        """,  # noqa: S608 (our tables)
        {"lo": month_start(month), "hi": month_start(add_months(month, 1))},
    )
    return int(cur.fetchone()[0])  # type: ignore[attr-defined]


def _drop(cur: object, shard: int, month: dt.date) -> None:
    name = month_table(shard, month)
    cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")  # type: ignore[attr-defined]
    cur.execute(f"ALTER TABLE {shard_table(shard)} DETACH PARTITION {name}")  # type: ignore[attr-defined]
    cur.execute(f"DROP TABLE {name}")  # type: ignore[attr-defined]


def months_to_have(now: dt.datetime) -> list[dt.date]:
    """The months whose partitions must exist at ``now``: from that of the oldest hour still
    accepted to ``MONTHS_AHEAD`` after the current one."""
    first = month_of(now - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS))
    last = add_months(month_of(now), MONTHS_AHEAD)
    months, month = [], first
    while month <= last:
        months.append(month)
        month = add_months(month, 1)
    return months


def maintain(*, now: dt.datetime | None = None, dry_run: bool = False) -> MaintainReport:
    """See the module docstring. Each partition is its own transaction: one that fails (its
    lock busy) is logged and retried by the next run; the others go on."""
    now = now or timezone.now()
    report = MaintainReport(dry_run=dry_run)
    kept_from = month_of(hourly_kept_from(now))
    wanted = months_to_have(now)
    for shard in range(SHARDS):
        with connection.cursor() as cur:
            existing = month_partitions(cur, shard)
            stray = default_months(cur, shard)
        for month, rows in stray.items():
            log.warning(
                "metering.hourly_partition_default_rows",
                extra={"shard": shard, "month": month.isoformat(), "rows": rows, "moved": not dry_run},
            )
        for month in sorted((set(wanted) | set(stray)) - set(existing)):
            name = month_table(shard, month)
            if dry_run:
                report.created.append(name)
                report.moved_rows += stray.get(month, 0)
                continue
            try:
                with transaction.atomic(durable=True), connection.cursor() as cur:
                    moved = _create(cur, shard, month)
            except OperationalError as error:  # lock_timeout: the rollup holds the shard
                log.warning(
                    "metering.hourly_partition_create_failed",
                    extra={"shard": shard, "partition": name, "error": str(error).strip()},
                )
                continue
            existing[month] = name
            report.created.append(name)
            report.moved_rows += moved
            log.info(
                "metering.hourly_partition_created",
                extra={"shard": shard, "partition": name, "month": month.isoformat(), "moved_rows": moved},
            )
        for month in sorted(m for m in existing if m < kept_from):
            name = month_table(shard, month)
            with connection.cursor() as cur:
                mismatches = daily_mismatches(cur, shard, month)
            if mismatches:
                report.kept.append(name)
                log.error(
                    "metering.hourly_partition_drop_refused",
                    extra={"shard": shard, "partition": name, "month": month.isoformat(), "mismatches": mismatches},
                )
                continue
            if dry_run:
                report.dropped.append(name)
                continue
            try:
                with transaction.atomic(durable=True), connection.cursor() as cur:
                    _drop(cur, shard, month)
            except OperationalError as error:
                report.kept.append(name)
                log.warning(
                    "metering.hourly_partition_drop_failed",
                    extra={"shard": shard, "partition": name, "error": str(error).strip()},
                )
                continue
            report.dropped.append(name)
            log.info(
                "metering.hourly_partition_dropped",
                extra={"shard": shard, "partition": name, "month": month.isoformat()},
            )
    log.info(
        "metering.hourly_partitions_maintain",
        extra={
            "partitions_created": len(report.created),
            "partitions_dropped": len(report.dropped),
            "moved_rows": report.moved_rows,
            "kept": len(report.kept),
            "kept_from": kept_from.isoformat(),
            "dry_run": dry_run,
        },
    )
    return report
