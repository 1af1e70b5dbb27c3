"""Reads of the metering app."""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection

from billing_site.common import quantities
from metering import partitions, sharding
from metering.models import Sku

_SKU_CACHE_SECONDS = 30.0
_sku_lock = threading.Lock()
_sku_kinds: dict[str, str] = {}
_sku_loaded_at = -1e9


def sku_kinds(*, refresh: bool = False) -> dict[str, str]:
    """SKU code → kind, cached per process for 30 s (the hot path asks per batch).

    ``refresh`` re-reads at once: a code missing from the cache may have just been loaded.
    It is rate-limited to one read a second so a stream of unknown codes cannot hammer the
    database."""
    global _sku_kinds, _sku_loaded_at
    age = time.monotonic() - _sku_loaded_at
    if age > _SKU_CACHE_SECONDS or (refresh and age > 1.0):
        with _sku_lock:
            _sku_kinds = dict(Sku.objects.values_list("code", "kind"))
            _sku_loaded_at = time.monotonic()
    return _sku_kinds


def sku_cache_clear() -> None:
    global _sku_loaded_at
    _sku_loaded_at = -1e9


def usage_event_count(*, account_id: int) -> int:
    from metering.models import UsageEvent

    return UsageEvent.objects.filter(account_id=account_id).count()


def quantity_sum(alias: str = "") -> str:
    """SQL for the sum of a group's quantities, exact: a duration SKU's rows keep units x
    seconds (``unit_seconds``), summed and divided by 3,600 once here, rounded half-up to the
    12 places every stored quantity has; rows without it (quantity SKUs, rows written by
    hand) add their quantities. Summing the rows' own quantities instead would add up
    hundreds of per-hour pieces each rounded to 12 places (``102076.199999999999``)."""
    p = f"{alias}." if alias else ""
    return (
        f"round(coalesce(sum({p}unit_seconds), 0) / 3600 "
        f"+ coalesce(sum({p}quantity) FILTER (WHERE {p}unit_seconds IS NULL), 0), 12)"
    )


# A quantity as shown: the one rule of invoice lines too, so the costs API shows what the
# invoice shows.
quantity_text = quantities.quantity_text


GRANULARITIES = ("hour", "day", "month")
# The first hour whose hourly rows are kept (older months are dropped, their days kept):
# hour breakdowns start there; day and month ones, invoices and spend read the daily rollup.
hourly_kept_from = partitions.hourly_kept_from
MAX_RANGE_DAYS = {"hour": 62, "day": 732, "month": 3660}


@dataclass(frozen=True)
class CostQuery:
    account_id: int
    start: dt.datetime  # inclusive, UTC midnight
    end: dt.datetime  # exclusive, UTC midnight
    granularity: str = "day"
    by_sku: bool = False
    by_resource: bool = False
    label_keys: tuple[str, ...] = ()


def cost_breakdown(query: CostQuery) -> tuple[list[dict[str, Any]], Decimal]:
    """Rated hourly usage summed by period and the asked dimensions; reads the rollups only.

    Quantities are summed only within a SKU (adding GB to vCPU-hours means nothing), exactly
    (``quantity_sum``)."""
    # Day and month breakdowns read the daily rollup (24x fewer rows); hours read the hourly one.
    table, time_column = (
        ("metering_hourlyusage", "hour") if query.granularity == "hour" else ("metering_dailyusage", "day")
    )
    columns = [f"date_trunc('{query.granularity}', {time_column}, 'UTC') AS period"]
    names = ["period"]
    params: dict[str, Any] = {"account_id": query.account_id, "start": query.start, "end": query.end}
    if query.by_sku:
        columns.append("sku")
        names.append("sku")
    if query.by_resource:
        columns.append("resource_id")
        names.append("resource")
    for i, key in enumerate(query.label_keys):
        params[f"label_{i}"] = key
        columns.append(f"labels ->> %(label_{i})s")
        names.append(f"label:{key}")
    group = ", ".join(str(i + 1) for i in range(len(columns)))
    sql = f"""
        SELECT {", ".join(columns)}, {quantity_sum() if query.by_sku else "NULL"}, coalesce(sum(amount), 0)
        FROM {table}
        WHERE account_id = %(account_id)s AND {time_column} >= %(start)s AND {time_column} < %(end)s
        GROUP BY {group} ORDER BY {group}
    """  # noqa: S608 (column expressions are fixed; values are parameters)
    rows: list[dict[str, Any]] = []
    total = Decimal(0)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for record in cursor.fetchall():
            row: dict[str, Any] = {}
            labels: dict[str, str | None] = {}
            for name, value in zip(names, record, strict=False):
                if name.startswith("label:"):
                    labels[name.removeprefix("label:")] = value
                else:
                    row[name] = value
            if query.label_keys:
                row["labels"] = labels
            if query.by_sku:
                row["quantity"] = record[len(names)]
            row["amount"] = record[len(names) + 1]
            total += row["amount"]
            rows.append(row)
    return rows, total


def resource_states(*, account_id: int, limit: int = 500) -> list[Any]:
    from metering.models import ResourceState

    return list(ResourceState.objects.filter(account_id=account_id).order_by("-last_event_at")[:limit])


def data_quality(*, account_id: int | None = None) -> dict[str, int]:
    """Lifecycle anomalies the rollup tolerated: a start for a running resource (taken as an
    update), a stop for a stopped one (ignored), an update for a stopped one (spec noted,
    no accrual). Counted from whole timelines, so replays never double count."""
    from django.db.models import Count, Q, Sum

    from metering.models import InactiveAccountUsage, ResourceState

    rows = ResourceState.objects.all()
    if account_id is not None:
        rows = rows.filter(account_id=account_id)
    totals = rows.aggregate(
        resources=Count("resource_id"),
        running=Count("resource_id", filter=Q(running=True)),
        start_while_running=Sum("start_while_running"),
        stop_while_stopped=Sum("stop_while_stopped"),
        update_while_stopped=Sum("update_while_stopped"),
    )
    # Usage accepted while the account was not active: it happened and is billed, but
    # someone should know why a pending, suspended or blocked account still consumes.
    inactive = InactiveAccountUsage.objects.all()
    if account_id is not None:
        inactive = inactive.filter(account_id=account_id)
    by_state = dict(inactive.values("account_state").annotate(n=Sum("events")).values_list("account_state", "n"))
    for state in ("pending", "suspended", "blocked"):
        totals[f"events_while_{state}"] = by_state.get(state, 0)
    return {key: value or 0 for key, value in totals.items()}


# --- For invoicing: rated usage of whole months, read from the daily rollup.


@dataclass(frozen=True, slots=True)
class MonthlyUsage:
    account_id: int
    month: dt.date  # first day of the month
    sku: str
    quantity: Decimal
    amount: Decimal  # full precision, the account's currency


@dataclass(slots=True)
class BillingUsage:
    """What invoicing needs from the rollups for a set of accounts, read in one pass."""

    # (account, month, SKU) → quantity and amount
    monthly: list[MonthlyUsage]
    # (account, SKU) → [(resource id, quantity, amount)] for ``detail_month``
    by_resource: dict[tuple[int, str], list[tuple[str, Decimal, Decimal]]]
    # (account, SKU) → [(project label or None, quantity, amount)] for ``detail_month``
    by_project: dict[tuple[int, str], list[tuple[str | None, Decimal, Decimal]]]


def accounts_with_usage(
    *, start: dt.datetime, end: dt.datetime, account_ids: list[int] | None = None, shard: int | None = None
) -> list[int]:
    """Accounts with rated usage rows on days in [start, end), ascending; only those of one
    shard (hash partition, see ``metering.rollup.shard_of``) if ``shard`` is given, so that
    work over all accounts splits into independent per-shard scans."""
    from metering.rollup import SHARDS

    table = "metering_dailyusage"
    if shard is not None:
        if not 0 <= shard < SHARDS:
            raise ValueError(f"shard {shard} is not in 0..{SHARDS - 1}")
        table = f"metering_dailyusage_p{shard:02d}"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT account_id FROM {table} WHERE day >= %s AND day < %s "  # noqa: S608 (our table)
            "AND (%s::bigint[] IS NULL OR account_id = ANY(%s::bigint[])) ORDER BY 1",
            [start, end, account_ids, account_ids],
        )
        return [row[0] for row in cursor.fetchall()]


def accounts_in_shard(account_ids: list[int], shard: int) -> list[int]:
    """Those of ``account_ids`` whose rows live in ``shard``, in one query."""
    from metering.rollup import SHARDS

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a FROM unnest(%s::bigint[]) a "
            "WHERE satisfies_hash_partition('metering_usageevent'::regclass, %s, %s, a) ORDER BY a",
            [account_ids, SHARDS, shard],
        )
        return [row[0] for row in cursor.fetchall()]


def shard_count() -> int:
    from metering.rollup import SHARDS

    return SHARDS


def billing_usage(
    *, account_ids: list[int], start: dt.datetime, end: dt.datetime, detail_month: dt.date
) -> BillingUsage:
    """Each account's rated usage per (calendar month, SKU) for days in [start, end), and for
    ``detail_month`` (the last month of the range) the split by resource and by ``project``
    label: one statement, one pass over each month's daily rows (GROUPING SETS for the
    detailed month, a plain grouping for the months before it)."""
    result = BillingUsage(monthly=[], by_resource={}, by_project={})
    detail_start = dt.datetime.combine(detail_month, dt.time(), tzinfo=dt.UTC)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT account_id, %(detail_month)s::date, sku, resource_id, project, GROUPING(resource_id, project),
                   {QUANTITY}, coalesce(sum(amount), 0)
            FROM (
                SELECT account_id, sku, resource_id, labels ->> 'project' AS project, quantity, unit_seconds, amount
                FROM metering_dailyusage
                WHERE account_id = ANY(%(accounts)s) AND day >= %(detail_start)s AND day < %(end)s
            ) d
            GROUP BY GROUPING SETS ((account_id, sku), (account_id, sku, resource_id), (account_id, sku, project))
            UNION ALL
            SELECT account_id, (date_trunc('month', day, 'UTC') AT TIME ZONE 'UTC')::date, sku, NULL, NULL, 3,
                   {QUANTITY}, coalesce(sum(amount), 0)
            FROM metering_dailyusage
            WHERE account_id = ANY(%(accounts)s) AND day >= %(start)s AND day < %(detail_start)s
            GROUP BY 1, 2, 3
            """.replace("{QUANTITY}", quantity_sum()),
            {
                "accounts": account_ids,
                "start": start,
                "end": end,
                "detail_start": detail_start,
                "detail_month": detail_month,
            },
        )
        for account_id, month, sku, resource_id, project, grouping, quantity, amount in cursor.fetchall():
            if grouping == 3:
                result.monthly.append(MonthlyUsage(account_id, month, sku, quantity, amount))
            elif grouping == 1:
                result.by_resource.setdefault((account_id, sku), []).append((resource_id, quantity, amount))
            else:
                result.by_project.setdefault((account_id, sku), []).append((project, quantity, amount))
    return result


def monthly_usage_through(*, through: dict[int, dt.date], since: dt.date) -> list[MonthlyUsage]:
    """Each account's rated usage per (calendar month, SKU) for the months from ``since`` up
    to and including the account's month in ``through``: what the billing check compares
    with what invoices billed. One statement over the daily rollup."""
    if not through:
        return []
    accounts = sorted(through)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT d.account_id, (date_trunc('month', d.day, 'UTC') AT TIME ZONE 'UTC')::date, d.sku,
                   {QUANTITY}, coalesce(sum(d.amount), 0)
            FROM unnest(%s::bigint[], %s::date[]) AS t(account_id, through)
            JOIN metering_dailyusage d
              ON d.account_id = t.account_id AND d.day >= %s::timestamptz
             AND d.day < ((t.through + interval '1 month') AT TIME ZONE 'UTC')
            WHERE d.account_id = ANY(%s::bigint[])  -- lets the planner probe each partition's index
            GROUP BY 1, 2, 3
            """.replace("{QUANTITY}", quantity_sum("d")),
            [accounts, [through[a] for a in accounts], dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC), accounts],
        )
        return [MonthlyUsage(*row) for row in cursor.fetchall()]


@dataclass(frozen=True, slots=True)
class AmountWindow:
    key: int
    account_id: int
    sku_prefix: str
    start: dt.datetime
    end: dt.datetime


def window_amounts(windows: list[AmountWindow]) -> dict[tuple[int, str], Decimal]:
    """Rated amount per (window key, SKU) of each account's SKUs starting with the window's
    prefix, for days in the window: what a contract discount applies to."""
    if not windows:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT w.key, d.sku, coalesce(sum(d.amount), 0)
            FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[], %s::timestamptz[])
                 AS w(key, account_id, prefix, start, "end")
            JOIN metering_dailyusage d
              ON d.account_id = w.account_id AND d.day >= w.start AND d.day < w."end"
             AND starts_with(d.sku, w.prefix)
            WHERE d.account_id = ANY(%s::bigint[])  -- lets the planner probe each partition's index
            GROUP BY 1, 2
            """,
            [
                [w.key for w in windows],
                [w.account_id for w in windows],
                [w.sku_prefix for w in windows],
                [w.start for w in windows],
                [w.end for w in windows],
                sorted({w.account_id for w in windows}),
            ],
        )
        return {(key, sku): amount for key, sku, amount in cursor.fetchall()}


def hourly_spend(windows: list[AmountWindow]) -> dict[tuple[int, str], tuple[Decimal, Decimal]]:
    """Rated (quantity, amount) per (window key, SKU) of each account's SKUs starting with the
    window's prefix, for hours in [start, end), from the hourly rollup in one statement: what
    antifraud's spend velocity reads for every new account at once."""
    if not windows:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT w.key, h.sku, {QUANTITY}, coalesce(sum(h.amount), 0)
            FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[], %s::timestamptz[])
                 AS w(key, account_id, prefix, start, "end")
            JOIN metering_hourlyusage h
              ON h.account_id = w.account_id AND h.hour >= w.start AND h.hour < w."end"
             AND starts_with(h.sku, w.prefix)
            WHERE h.account_id = ANY(%s::bigint[])
            GROUP BY 1, 2
            """.replace("{QUANTITY}", quantity_sum("h")),
            [
                [w.key for w in windows],
                [w.account_id for w in windows],
                [w.sku_prefix for w in windows],
                [w.start for w in windows],
                [w.end for w in windows],
                sorted({w.account_id for w in windows}),
            ],
        )
        return {(key, sku): (quantity, amount) for key, sku, quantity, amount in cursor.fetchall()}


@dataclass(frozen=True, slots=True)
class SkuPricing:
    name: str
    unit: str
    pricing: str  # "flat" (one unit price all period), "tiered", "varied" (changed in the period)
    unit_price: Decimal | None


def sku_pricing(*, currency: str, start: dt.datetime, end: dt.datetime) -> dict[str, SkuPricing]:
    """How each SKU was priced in ``currency`` during [start, end): for an invoice line's
    "unit price" column."""
    from metering.models import Price

    prices: dict[int, list[Price]] = {}
    for price in Price.objects.filter(currency=currency).order_by("sku_id", "valid_from"):
        prices.setdefault(price.sku_id, []).append(price)
    result: dict[str, SkuPricing] = {}
    for sku in Sku.objects.all():
        code, history = sku.code, prices.get(sku.id, [])
        in_force = [
            p
            for i, p in enumerate(history)
            if p.valid_from < end and (i + 1 == len(history) or history[i + 1].valid_from > start)
        ]
        if any(p.is_tiered for p in in_force):
            result[code] = SkuPricing(sku.name, sku.unit, "tiered", None)
        elif len(in_force) == 1:
            result[code] = SkuPricing(sku.name, sku.unit, "flat", in_force[0].unit_price)
        else:
            result[code] = SkuPricing(sku.name, sku.unit, "varied", None)
    return result


def transaction_ceiling() -> int:
    """The next transaction id to be assigned: every transaction that committed before this
    call has a lower id. The rollup has taken all such events once every shard's horizon is
    at or above it (see ``rollup_caught_up``)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        return int(cursor.fetchone()[0])


def rollup_caught_up(*, ceiling: int, shards: int) -> bool:
    """Whether all ``shards`` have rolled up every event of transactions below ``ceiling``."""
    from metering.models import RollupShard

    horizons = list(RollupShard.objects.values_list("txid_horizon", flat=True))
    return len(horizons) >= shards and min(horizons) >= ceiling


# --- Rollup progress: the rollup-shards page, the staff home page and /metrics read it.

# Counting the events a shard has waiting stops here: the point is how far behind, not the
# exact backlog (a count of millions would make a page slow exactly when it matters).
WAITING_COUNT_CAP = 100_000


@dataclass(frozen=True, slots=True)
class ShardProgress:
    """Where the rollup of one shard stands. ``events_waiting``: committed events not rolled up
    yet (the PostgreSQL event store; at most ``WAITING_COUNT_CAP``, then ``capped``), the oldest
    of them received at ``oldest_waiting_at``; ``hours_waiting``: hours of the shard marked
    dirty in the event store and not recomputed (the scale path), the oldest marked at
    ``oldest_dirty_at``. ``last_run_at``: when the last run committed (every run, idle or not,
    writes it); ``watermark``: the hour running resources are accrued to."""

    shard: int
    last_run_at: dt.datetime | None
    last_duration_ms: int | None
    watermark: dt.datetime | None
    events_processed: int
    events_waiting: int
    capped: bool
    oldest_waiting_at: dt.datetime | None
    hours_waiting: int
    oldest_dirty_at: dt.datetime | None

    @property
    def oldest_work_at(self) -> dt.datetime | None:
        times = [t for t in (self.oldest_waiting_at, self.oldest_dirty_at) if t is not None]
        return min(times) if times else None

    def lag(self, now: dt.datetime) -> dt.timedelta:
        """How far behind the shard is: the age of its oldest waiting work (0 when none waits)."""
        oldest = self.oldest_work_at
        return max(now - oldest, dt.timedelta(0)) if oldest is not None else dt.timedelta(0)

    def since_last_run(self, now: dt.datetime) -> dt.timedelta | None:
        return None if self.last_run_at is None else max(now - self.last_run_at, dt.timedelta(0))

    def behind(self, now: dt.datetime) -> bool:
        """Whether on call should look (red on the rollup-shards page and the home page): its
        oldest waiting work, or its last run, is older than ``DASHBOARD_ROLLUP_LAG_SECONDS``
        (every run writes its time, idle ones too: a still clock is a rollup that does not run),
        it never ran, or more than ``DASHBOARD_EVENTS_WAITING`` events wait."""
        max_lag = dt.timedelta(seconds=settings.DASHBOARD_ROLLUP_LAG_SECONDS)
        since = self.since_last_run(now)
        return (
            since is None
            or since > max_lag
            or self.lag(now) > max_lag
            or self.events_waiting > settings.DASHBOARD_EVENTS_WAITING
        )


def rollup_progress() -> list[ShardProgress]:
    """Every shard's progress, in one statement: per shard, the events at or above its horizon
    (each partition read through its BRIN index on ``txid``, at most ``WAITING_COUNT_CAP`` rows),
    and the dirty hours whose manifest is older than their mark. A shard never run yet has no
    progress row: everything in its partition waits."""
    waiting = " UNION ALL ".join(
        f"SELECT {shard} AS shard, count(*) AS events, min(w.received_at) AS oldest FROM "  # noqa: S608 (our tables)
        f"(SELECT e.received_at FROM metering_usageevent_p{shard:02d} e WHERE e.txid >= "
        f"(SELECT coalesce(max(txid_horizon), 0) FROM metering_rollupshard WHERE shard = {shard}) "
        f"LIMIT %(cap)s) w"
        for shard in range(sharding.SHARDS)
    )
    sql = f"""
        WITH waiting AS ({waiting}),
        dirty AS (
            SELECT d.shard, count(*) AS hours, min(d.marked_at) AS oldest
            FROM metering_dirtyhour d
            LEFT JOIN metering_hourmanifest m ON m.shard = d.shard AND m.hour = d.hour
            WHERE m.version IS NULL OR m.version < d.version
            GROUP BY d.shard
        )
        SELECT w.shard, s.updated_at, s.last_duration_ms, s.watermark, coalesce(s.events_processed, 0),
               w.events, w.oldest, coalesce(d.hours, 0), d.oldest
        FROM waiting w
        LEFT JOIN metering_rollupshard s ON s.shard = w.shard
        LEFT JOIN dirty d ON d.shard = w.shard
        ORDER BY w.shard
    """  # noqa: S608 (built above from our table names)
    with connection.cursor() as cursor:
        cursor.execute(sql, {"cap": WAITING_COUNT_CAP})
        rows = cursor.fetchall()
    return [
        ShardProgress(
            shard=shard,
            last_run_at=last_run_at,
            last_duration_ms=duration,
            watermark=watermark,
            events_processed=processed,
            events_waiting=events,
            capped=events >= WAITING_COUNT_CAP,
            oldest_waiting_at=oldest,
            hours_waiting=hours,
            oldest_dirty_at=oldest_dirty,
        )
        for shard, last_run_at, duration, watermark, processed, events, oldest, hours, oldest_dirty in rows
    ]


@dataclass(frozen=True, slots=True)
class FamilyMonth:
    month: dt.date  # first day of the month
    family: str  # the SKU's family: ``compute.vcpu`` → ``compute``
    amount: Decimal  # full precision, the account's currency


def monthly_cost_by_family(*, account_id: int, since: dt.date) -> list[FamilyMonth]:
    """The account's rated cost per calendar month (UTC) and SKU family from ``since`` (a first
    of the month) on, by month then family: one statement over the daily rollup, on the
    account's own partition (``account_id`` leads its primary key)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT (date_trunc('month', day, 'UTC') AT TIME ZONE 'UTC')::date,
                   coalesce(nullif(split_part(sku, '.', 1), ''), 'general'), coalesce(sum(amount), 0)
            FROM metering_dailyusage
            WHERE account_id = %s AND day >= %s
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            [account_id, dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)],
        )
        return [FamilyMonth(month, family, amount) for month, family, amount in cursor.fetchall()]
