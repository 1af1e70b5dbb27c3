"""Events → rated hourly usage, exactly once, in set-based SQL, one shard at a time.

A shard is one hash partition (remainder) of every metering table, i.e. a fixed slice of
the accounts. One run of one shard is one transaction:

1. claim the shard's progress row (``FOR UPDATE SKIP LOCKED``: a second worker skips it);
2. take the new events: ``horizon_old <= txid < horizon``. The horizon comes from
   ``metering.horizon.take_horizon``: every writer of events holds a shared advisory lock
   from before its txid exists until it ends, and the rollup reads
   ``pg_snapshot_xmax(pg_current_snapshot())`` while holding that lock exclusively for a
   moment, so every event below it was committed or aborted before this transaction's
   statements began, and is visible to them (READ COMMITTED). An event can be neither
   skipped (still in flight: at or above the horizon, taken by a later run) nor taken twice
   (the horizon moves in this same transaction, and never back). One horizon serves every
   shard of a run; the argument in full is in ``metering/horizon.py``;
3. usage events: summed per (account, hour, SKU, resource, labels), a quantity to add;
4. lifecycle events: appended to each resource's timeline; each touched resource is replayed
   in event-time order (ties by event id) from its last start or stop before the hour of the
   event preceding the earliest new one (what decides whether it runs there), and its
   duration rows from that hour on are replaced by the rebuilt ones. So a late event lands
   where its time says and the answer never depends on arrival order. Closed intervals are
   materialised in full; open ones (running resources) up to the watermark. The
   data-quality counters move by the difference the new events make to the replayed part;
5. the watermark (start of the current hour) moves: running resources that had no events
   accrue the hours in between;
6. the new state of every hourly row that changes is computed before anything is written
   (existing rows read once), and rated there: flat prices per row; graduated prices
   re-walk the month's running total (``cum_quantity``) from the first changed hour, so a
   tier boundary crossed inside an hour splits that hour's amount. Then each changed row is
   written once, and ``dailyusage`` (what day and month cost breakdowns read) moves by the
   rows' differences (a day that lost a row is re-added from its hours), and so does each
   account's month in ``monthlyspend`` (what the credit check after a rollup reads);
7. the horizon and watermark are stored. A crash anywhere rolls all of it back.

Amounts keep 12 decimal places: rounding happens on invoices, not here. A duration SKU's
hourly quantity is units x seconds / 3600 rounded to 12 places (what it is rated from, as
before); the row also keeps ``unit_seconds``, units x seconds exactly, and the days sum it, so
that a month's quantity is read as one exact sum divided once (``metering.selectors``), not
as ~744 rounded pieces added up (``102076.199999999999``).

Only writers of events can hold the rollup back: a transaction open in another database of
the server, or one in this database that writes no events, changes nothing. A writer that
hangs with the lock taken (an ingest request stuck mid-transaction, a session that took the
lock and went idle) stops new events from being taken, never loses or doubles one: the run
does not wait longer than ``METERING_HORIZON_LOCK_TIMEOUT_SECONDS`` (and does not queue at
all behind a writer already older than that, so ingestion never waits behind it), and once
the writer has been open ``METERING_HORIZON_HOLD_SECONDS`` with committed events waiting,
``horizon_hold`` names it (pid, database, state, age) in every run's report
(``rollup_usage``, the task) and a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction

from billing_site.common.logs import ms_since
from metering import hours, partitions, sharding
from metering.horizon import EVENT_WRITERS_LOCK, take_horizon

log = logging.getLogger(__name__)

SHARDS = sharding.SHARDS  # the partitions of migration 0002/0004
TEMP_TABLES = (
    "rollup_new",
    "rollup_delta",
    "rollup_lifecycle",
    "rollup_dirty",
    "rollup_timeline",
    "rollup_replaced",
    "rollup_rebuilt",
    "rollup_prices",
    "rollup_tiers",
    "rollup_rows",
    "rollup_tier_groups",
    "rollup_tail",
    "rollup_write",
    "rollup_daily",
    "rollup_store_usage",
    "rollup_store_lifecycle",
)
# For this transaction only. A shard's sorts and hash tables (~1 M events, ~100 k hourly rows)
# fit in memory instead of spilling to disk; JIT compilation costs more than it saves on
# statements that run once per shard, and the planner cannot cost temp tables well anyway.
SESSION_SETTINGS = "SET LOCAL work_mem = '256MB'; SET LOCAL jit = off"


@dataclass
class ShardReport:
    shard: int
    events: int = 0
    usage_rows: int = 0
    resources: int = 0
    running_extended: int = 0
    rated_rows: int = 0
    watermark: dt.datetime | None = None
    horizon: int = 0  # the txid the next run of this shard starts from
    duration_ms: int = 0

    @property
    def did_work(self) -> bool:
        return bool(self.events or self.running_extended or self.rated_rows)


@dataclass(frozen=True)
class HorizonHold:
    """A writer of events that keeps the rollup from taking new events: the oldest transaction
    holding the event writers' lock (``metering.horizon``), with what ``pg_stat_activity``
    says of it."""

    horizon: int  # where the rollup stands: the lowest shard horizon
    waiting_events: int  # committed and not yet rolled up (counted up to WAITING_COUNT_LIMIT)
    pid: int | None = None  # None: a prepared transaction
    datname: str | None = None
    usename: str | None = None
    application_name: str | None = None
    state: str | None = None
    age_seconds: float | None = None  # since its transaction began
    backend_xid: str | None = None

    def fields(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "datname": self.datname,
            "usename": self.usename,
            "application_name": self.application_name,
            "state": self.state,
            "xact_age_s": None if self.age_seconds is None else round(self.age_seconds, 1),
            "backend_xid": self.backend_xid,
            "horizon": self.horizon,
            "waiting_events": self.waiting_events,
        }

    def describe(self) -> str:
        waiting = f"{self.waiting_events}{'+' if self.waiting_events >= WAITING_COUNT_LIMIT else ''}"
        head = f"held back: {waiting} committed events wait behind a writer of events holding the writers' lock"
        if self.pid is None:
            return f"{head}, a prepared transaction (see pg_prepared_xacts); the rollup catches up once it ends"
        age = "unknown" if self.age_seconds is None else f"{self.age_seconds:.1f} s"
        return (
            f"{head}: pid {self.pid} (database {self.datname}, user {self.usename}, "
            f"application {self.application_name or '-'}, {self.state or 'state unknown'}, open for {age}, "
            f"backend_xid {self.backend_xid or '-'}); the rollup catches up once it ends "
            f"(SELECT pg_terminate_backend({self.pid}) ends it)"
        )


# Counting what waits stops here: the point is that something waits, not the exact backlog.
WAITING_COUNT_LIMIT = 1_000_000


def horizon_hold(*, min_age_seconds: float | None = None) -> HorizonHold | None:
    """The writer of events holding the rollup back, if one has held the event writers' lock
    for ``min_age_seconds`` (default ``METERING_HORIZON_HOLD_SECONDS``) with committed events
    waiting to be rolled up. Transactions that write no events hold nothing back, whatever
    their database (``metering.horizon``); ingestion keeps short writers in flight all the
    time, which is why a writer is reported only once it is old enough."""
    threshold = settings.METERING_HORIZON_HOLD_SECONDS if min_age_seconds is None else min_age_seconds
    with connection.cursor() as cur:
        cur.execute(
            "SELECT a.pid, a.datname, a.usename, a.application_name, a.state, a.backend_xid::text, "
            "extract(epoch FROM clock_timestamp() - a.xact_start)::float8 "
            "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s "
            "AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.pid IS DISTINCT FROM pg_backend_pid() "
            "ORDER BY a.xact_start NULLS FIRST LIMIT 1",
            [EVENT_WRITERS_LOCK >> 32, EVENT_WRITERS_LOCK & 0xFFFFFFFF],
        )
        writer = cur.fetchone()
        if writer is None:
            return None
        age = writer[6]
        if age is not None and age < threshold:
            return None
        cur.execute("SELECT coalesce(min(txid_horizon), 0) FROM metering_rollupshard")
        (standing,) = cur.fetchone()
        cur.execute(
            "SELECT count(*) FROM (SELECT 1 FROM metering_usageevent WHERE txid >= %s "
            "AND txid <> coalesce(pg_current_xact_id_if_assigned()::text::bigint, 0) LIMIT %s) AS w",
            [standing, WAITING_COUNT_LIMIT],
        )
        (waiting,) = cur.fetchone()
    if not waiting:
        return None
    pid, datname, usename, application_name, state, backend_xid, age = writer
    return HorizonHold(
        horizon=standing,
        waiting_events=waiting,
        pid=pid,
        datname=datname,
        usename=usename,
        application_name=application_name,
        state=state,
        age_seconds=age,
        backend_xid=backend_xid,
    )


def check_horizon() -> HorizonHold | None:
    """``horizon_hold``, logged as a warning when there is one (someone should look)."""
    held = horizon_hold()
    if held is not None:
        log.warning("rollup.horizon_held", extra=held.fields())
    return held


@dataclass
class RollupReport:
    shards: list[ShardReport] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # claimed by another worker
    horizon: int | None = None  # None: the writers' lock was busy, no new events were taken
    held: HorizonHold | None = None  # a writer of events keeps committed events from this run

    @property
    def events(self) -> int:
        return sum(s.events for s in self.shards)

    def summary(self) -> str:
        rows = sum(s.usage_rows for s in self.shards)
        resources = sum(s.resources for s in self.shards)
        extended = sum(s.running_extended for s in self.shards)
        rated = sum(s.rated_rows for s in self.shards)
        watermark = max((s.watermark for s in self.shards if s.watermark), default=None)
        text = (
            f"{self.events} events from {len(self.shards)} shards: {rows} usage rows added to, "
            f"{resources} resources replayed, {extended} running resources extended, {rated} hourly rows rated"
        )
        if watermark:
            text += f"; watermark {watermark.isoformat()}"
        if self.skipped:
            text += f"; shards {self.skipped} busy in another worker"
        if self.horizon is None:
            text += "; no new events taken (a writer of events held the event writers' lock)"
        if self.held:
            text += f"\n{self.held.describe()}"
        return text


def hour_floor(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def rollup(*, now: dt.datetime | None = None, shards: list[int] | None = None, check_held: bool = True) -> RollupReport:
    """Process everything pending in every shard (or the given ones); then, with
    ``check_held``, say whether a transaction holds events back (``check_horizon``)."""
    report = RollupReport()
    started = time.monotonic()
    # One horizon for the whole run: the writers' lock is taken once, not once per shard. The
    # scale path takes dirty hours instead, and no horizon.
    report.horizon = NO_NEW_EVENTS if settings.METERING_EVENT_STORE == "clickhouse" else take_horizon()
    for shard in shards if shards is not None else range(SHARDS):
        shard_started = time.monotonic()
        taken = NO_NEW_EVENTS if report.horizon is None else report.horizon
        result = rollup_shard(shard=shard, now=now, horizon=taken)
        if result is None:
            report.skipped.append(shard)
            log.debug("rollup.shard_busy", extra={"shard": shard})
            continue
        result.duration_ms = ms_since(shard_started)
        report.shards.append(result)
        # Logged once committed. A shard with nothing to do is a DEBUG line: the drain runs
        # every few seconds on every shard.
        log.log(
            logging.INFO if result.did_work else logging.DEBUG,
            "rollup.shard",
            extra={
                "shard": shard,
                "events": result.events,
                "usage_rows": result.usage_rows,
                "resources": result.resources,
                "running_extended": result.running_extended,
                "rated_rows": result.rated_rows,
                "horizon": result.horizon,
                "watermark": result.watermark,
                "duration_ms": result.duration_ms,
            },
        )
    log.log(
        logging.INFO if report.events else logging.DEBUG,
        "rollup.run",
        extra={
            "shards": len(report.shards),
            "events": report.events,
            "skipped": report.skipped,
            "horizon": report.horizon,
            "duration_ms": ms_since(started),
        },
    )
    if check_held:
        report.held = check_horizon()
    return report


def _p(table: str, shard: int) -> str:
    return f"{table}_p{shard:02d}"


NO_NEW_EVENTS = 0  # a horizon below every shard's: the run takes no events (the lock was busy)


@transaction.atomic(durable=True)
def rollup_shard(*, shard: int, now: dt.datetime | None = None, horizon: int | None = None) -> ShardReport | None:
    """One shard's run (see the module docstring). ``horizon``: from ``take_horizon`` before
    this transaction began (``rollup`` takes one per run); None takes one now, inside this
    transaction, after the claim. A horizon below the shard's stored one takes no events."""
    if not 0 <= shard < SHARDS:
        raise ValueError(f"shard {shard} is not in 0..{SHARDS - 1}")
    events_p, hourly_p = _p("metering_usageevent", shard), _p("metering_hourlyusage", shard)
    resev_p, state_p = _p("metering_resourceevent", shard), _p("metering_resourcestate", shard)
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO metering_rollupshard (shard, txid_horizon, events_processed, updated_at) "
            "VALUES (%s, 0, 0, now()) ON CONFLICT DO NOTHING",
            [shard],
        )
        cur.execute(
            "SELECT txid_horizon, watermark FROM metering_rollupshard WHERE shard = %s FOR UPDATE SKIP LOCKED",
            [shard],
        )
        claimed = cur.fetchone()
        if claimed is None:
            return None
        horizon_old, watermark_old = claimed
        if horizon is None and settings.METERING_EVENT_STORE != "clickhouse":
            horizon = take_horizon()
        # Never back: a run whose horizon was read before another worker's run of this shard
        # committed takes nothing rather than events again.
        horizon_new = max(horizon or NO_NEW_EVENTS, horizon_old)
        cur.execute(SESSION_SETTINGS)
        cur.execute("SELECT now()")
        (db_now,) = cur.fetchone()
        watermark = hour_floor(now or db_now)
        if watermark_old is not None and watermark < watermark_old:
            watermark = watermark_old  # the watermark never moves back
        report = ShardReport(shard=shard, watermark=watermark, horizon=horizon_new)
        # ON COMMIT DROP cleans up after a real transaction; inside an outer one (tests, a
        # caller's atomic block) the previous shard's tables are still there.
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(TEMP_TABLES)}")
        params = {"h_old": horizon_old, "h_new": horizon_new, "w_old": watermark_old or watermark, "w": watermark}

        # 2. The new events of this shard: from the event table by txid, or on the scale path
        # the changes of its dirty hours in the event store (``metering.hours``).
        taken: hours.HourlyInput | None = None
        if settings.METERING_EVENT_STORE == "clickhouse":
            cur.execute(
                "CREATE TEMP TABLE rollup_new (account_id bigint, event_id text, occurred_at timestamptz, kind text, "
                "sku text, quantity numeric, resource_id text, action text, spec jsonb, labels jsonb) ON COMMIT DROP"
            )
            taken = hours.take(cur, shard=shard, hourly_p=hourly_p)
            report.events = taken.events
        else:
            cur.execute(
                f"""
                CREATE TEMP TABLE rollup_new ON COMMIT DROP AS
                SELECT account_id, event_id, occurred_at, kind, sku, quantity, resource_id, action, spec, labels
                FROM {events_p} WHERE txid >= %(h_old)s AND txid < %(h_new)s
                """,
                params,
            )
            report.events = cur.rowcount

        # 3. Usage events: what to add to each hourly row. (Hashed, not sorted: ~1 M events
        # fold into ~100 k rows, and the planner cannot know that of a fresh temp table.)
        cur.execute("SET LOCAL enable_sort = off")
        cur.execute(
            """
            CREATE TEMP TABLE rollup_delta ON COMMIT DROP AS
            SELECT account_id, date_trunc('hour', occurred_at, 'UTC') AS hour, sku,
                   coalesce(resource_id, '') AS resource_id, coalesce(labels, '{}') AS labels,
                   sum(quantity) AS quantity, NULL::numeric AS unit_seconds
            FROM rollup_new WHERE kind = 'usage'
            GROUP BY 1, 2, 3, 4, 5
            """
        )
        report.usage_rows = cur.rowcount
        cur.execute("SET LOCAL enable_sort = on")

        # 4. Lifecycle events: extend the timelines, replay the touched resources.
        cur.execute(
            "CREATE TEMP TABLE rollup_lifecycle (account_id bigint, resource_id text, occurred_at timestamptz, "
            "event_id text) ON COMMIT DROP"
        )
        cur.execute(
            f"""
            WITH added AS (
                INSERT INTO {resev_p} (account_id, resource_id, occurred_at, event_id, action, spec, labels)
                SELECT account_id, resource_id, occurred_at, event_id, action, spec, coalesce(labels, '{{}}')
                FROM rollup_new WHERE kind = 'resource'
                ORDER BY account_id, resource_id, occurred_at, event_id
                ON CONFLICT DO NOTHING
                RETURNING account_id, resource_id, occurred_at, event_id
            )
            INSERT INTO rollup_lifecycle SELECT * FROM added
            """
        )
        # Per touched resource: the hour it is replayed from (that of the event before its
        # earliest new one) and the anchor, its last start or stop before that hour: whether
        # it runs from there on depends on nothing older. Never from before the replay floor
        # (``metering.partitions``: older months' hourly rows are, or soon will be, dropped,
        # and rows rebuilt there would be added to their days again); a later start changes
        # nothing, as the anchor moves with it, as long as it is not after the first new event.
        params["replay_floor"] = partitions.replay_floor(now or db_now)
        cur.execute(
            f"""
            CREATE TEMP TABLE rollup_dirty ON COMMIT DROP AS
            SELECT d.account_id, d.resource_id, r.replay_from,
                   coalesce(a.occurred_at, '-infinity') AS anchor_at, coalesce(a.event_id, '') AS anchor_id
            FROM (SELECT account_id, resource_id, min(occurred_at) AS first_new
                  FROM rollup_lifecycle GROUP BY 1, 2) d
            CROSS JOIN LATERAL (
                SELECT least(greatest(date_trunc('hour', coalesce(
                    (SELECT max(e.occurred_at) FROM {resev_p} e
                     WHERE e.account_id = d.account_id AND e.resource_id = d.resource_id
                       AND e.occurred_at < d.first_new),
                    d.first_new), 'UTC'), %(replay_floor)s::timestamptz),
                    date_trunc('hour', d.first_new, 'UTC')) AS replay_from
            ) r
            LEFT JOIN LATERAL (
                SELECT e.occurred_at, e.event_id FROM {resev_p} e
                WHERE e.account_id = d.account_id AND e.resource_id = d.resource_id
                  AND e.occurred_at < r.replay_from AND e.action IN ('start', 'stop')
                ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1
            ) a ON true
            """,
            params,
        )
        report.resources = cur.rowcount
        _replay_resources(cur, resev_p=resev_p, hourly_p=hourly_p, state_p=state_p, params=params)

        # 5. The watermark moved: running resources without events accrue the hours between.
        if watermark_old is not None and watermark > watermark_old:
            cur.execute(
                f"""
                INSERT INTO rollup_delta (account_id, hour, sku, resource_id, labels, quantity, unit_seconds)
                SELECT r.account_id, h.hour, s.key AS sku, r.resource_id, r.labels,
                       sum(s.value::numeric * extract(epoch FROM
                           least(h.hour + interval '1 hour', %(w)s) - greatest(r.since, h.hour)) / 3600) AS quantity,
                       sum(s.value::numeric * extract(epoch FROM
                           least(h.hour + interval '1 hour', %(w)s) - greatest(r.since, h.hour))) AS unit_seconds
                FROM {state_p} r
                CROSS JOIN LATERAL generate_series(
                    greatest(%(w_old)s::timestamptz, date_trunc('hour', r.since, 'UTC')),
                    %(w)s::timestamptz - interval '1 hour', interval '1 hour') AS h(hour)
                CROSS JOIN LATERAL jsonb_each_text(r.spec) AS s(key, value)
                WHERE r.running
                  AND NOT EXISTS (SELECT 1 FROM rollup_dirty d
                                  WHERE d.account_id = r.account_id AND d.resource_id = r.resource_id)
                  AND greatest(r.since, h.hour) < least(h.hour + interval '1 hour', %(w)s)
                GROUP BY 1, 2, 3, 4, 5
                """,
                params,
            )
            report.running_extended = cur.rowcount

        # 6. The new state of every changed hourly row, rated; then written once.
        report.rated_rows = _rate_and_write(cur, hourly_p=hourly_p, daily_p=_p("metering_dailyusage", shard))

        # 7. Done: the next run starts where this one ended.
        if taken is not None:
            hours.write_manifest(cur, shard=shard, taken=taken)
        cur.execute(
            "UPDATE metering_rollupshard SET txid_horizon = %s, watermark = %s, "
            "events_processed = events_processed + %s, updated_at = now(), "
            # now() is this transaction's start: the run's duration so far, for the admin and /metrics
            "last_duration_ms = (extract(epoch FROM clock_timestamp() - now()) * 1000)::integer WHERE shard = %s",
            [horizon_new, watermark, report.events, shard],
        )
    return report


def _replay_resources(cur: object, *, resev_p: str, hourly_p: str, state_p: str, params: dict[str, object]) -> None:
    # Each touched resource's timeline from its anchor on, in event-time order (ties by event
    # id), with whether the resource runs before and after each event: the last start or stop
    # so far decides; an update changes the spec, not whether it runs. The same is worked out
    # without this run's events (``_old``), for the counters' difference.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        CREATE TEMP TABLE rollup_timeline ON COMMIT DROP AS
        WITH replayed AS (
            SELECT e.account_id, e.resource_id, e.occurred_at, e.event_id, e.action, e.spec, e.labels,
                   d.replay_from, n.event_id IS NOT NULL AS is_new
            FROM rollup_dirty d
            JOIN {resev_p} e ON e.account_id = d.account_id AND e.resource_id = d.resource_id
                            AND (e.occurred_at, e.event_id) >= (d.anchor_at, d.anchor_id)
            LEFT JOIN rollup_lifecycle n ON n.account_id = e.account_id AND n.resource_id = e.resource_id
                                        AND n.occurred_at = e.occurred_at AND n.event_id = e.event_id
        ), ordered AS (
            SELECT r.*, lead(r.occurred_at) OVER w AS next_at, row_number() OVER w AS position
            FROM replayed r
            WINDOW w AS (PARTITION BY r.account_id, r.resource_id ORDER BY r.occurred_at, r.event_id)
        )
        -- The last start or stop so far as 2 x its position, + 1 for a start: odd is running.
        SELECT o.*,
               coalesce((max(o.position * 2 + (o.action = 'start')::int)
                         FILTER (WHERE o.action IN ('start', 'stop')) OVER upto) % 2 = 1, false) AS running_after,
               coalesce((max(o.position * 2 + (o.action = 'start')::int)
                         FILTER (WHERE o.action IN ('start', 'stop')) OVER before) % 2 = 1, false) AS running_before,
               coalesce((max(o.position * 2 + (o.action = 'start')::int)
                         FILTER (WHERE o.action IN ('start', 'stop') AND NOT o.is_new) OVER before) % 2 = 1, false)
                   AS running_before_old
        FROM ordered o
        WINDOW upto AS (PARTITION BY o.account_id, o.resource_id ORDER BY o.position ROWS UNBOUNDED PRECEDING),
               before AS (PARTITION BY o.account_id, o.resource_id ORDER BY o.position
                          ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        """
    )
    # The duration rows from each replay hour on: replaced by what the replay rebuilds.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        CREATE TEMP TABLE rollup_replaced ON COMMIT DROP AS
        SELECT h.account_id, h.hour, h.sku, h.resource_id, h.labels
        FROM rollup_dirty d
        JOIN {hourly_p} h ON h.account_id = d.account_id AND h.resource_id = d.resource_id AND h.hour >= d.replay_from
        JOIN metering_sku k ON k.code = h.sku AND k.kind = 'duration'
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_rebuilt ON COMMIT DROP AS
        WITH intervals AS (
            SELECT account_id, resource_id, labels, spec,
                   greatest(occurred_at, replay_from) AS t0,
                   coalesce(next_at, %(w)s::timestamptz) AS t1
            FROM rollup_timeline
            WHERE running_after AND action IN ('start', 'update') AND spec IS NOT NULL
        )
        SELECT i.account_id, h.hour, s.key AS sku, i.resource_id, i.labels,
               sum(s.value::numeric * extract(epoch FROM
                   least(i.t1, h.hour + interval '1 hour') - greatest(i.t0, h.hour)) / 3600) AS quantity,
               sum(s.value::numeric * extract(epoch FROM
                   least(i.t1, h.hour + interval '1 hour') - greatest(i.t0, h.hour))) AS unit_seconds
        FROM intervals i
        CROSS JOIN LATERAL generate_series(date_trunc('hour', i.t0, 'UTC'), i.t1 - interval '1 microsecond',
                                           interval '1 hour') AS h(hour)
        CROSS JOIN LATERAL jsonb_each_text(i.spec) AS s(key, value)
        WHERE i.t1 > i.t0
        GROUP BY 1, 2, 3, 4, 5
        """,
        params,
    )
    # Where each timeline leaves its resource. Its data-quality counters move by what the new
    # events change in the replayed part (nothing before the anchor changes), so replays
    # never double count and the history before the anchor is never read again.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        WITH counts AS (
            SELECT account_id, resource_id, max(position) AS last_position,
                   max(position) FILTER (WHERE action IN ('start', 'update') AND running_after) AS open_position,
                   count(*) FILTER (WHERE is_new) AS events,
                   count(*) FILTER (WHERE action = 'start' AND running_before)
                   - count(*) FILTER (WHERE NOT is_new AND action = 'start' AND running_before_old)
                       AS start_while_running,
                   count(*) FILTER (WHERE action = 'stop' AND NOT running_before)
                   - count(*) FILTER (WHERE NOT is_new AND action = 'stop' AND NOT running_before_old)
                       AS stop_while_stopped,
                   count(*) FILTER (WHERE action = 'update' AND NOT running_before)
                   - count(*) FILTER (WHERE NOT is_new AND action = 'update' AND NOT running_before_old)
                       AS update_while_stopped
            FROM rollup_timeline GROUP BY 1, 2
        ), last AS (
            SELECT t.account_id, t.resource_id, t.running_after, t.labels, t.occurred_at
            FROM counts c JOIN rollup_timeline t
              ON t.account_id = c.account_id AND t.resource_id = c.resource_id AND t.position = c.last_position
        ), open AS (
            SELECT t.account_id, t.resource_id, t.occurred_at, t.spec
            FROM counts c JOIN rollup_timeline t
              ON t.account_id = c.account_id AND t.resource_id = c.resource_id AND t.position = c.open_position
        )
        INSERT INTO {state_p} AS r (account_id, resource_id, running, since, spec, labels, last_event_at, events,
                                    start_while_running, stop_while_stopped, update_while_stopped, updated_at)
        SELECT c.account_id, c.resource_id, l.running_after,
               CASE WHEN l.running_after THEN o.occurred_at END,
               CASE WHEN l.running_after THEN o.spec END,
               coalesce(l.labels, '{{}}'), l.occurred_at, c.events,
               c.start_while_running, c.stop_while_stopped, c.update_while_stopped, now()
        FROM counts c
        JOIN last l ON l.account_id = c.account_id AND l.resource_id = c.resource_id
        LEFT JOIN open o ON o.account_id = c.account_id AND o.resource_id = c.resource_id
        ON CONFLICT (account_id, resource_id) DO UPDATE SET
            running = EXCLUDED.running, since = EXCLUDED.since, spec = EXCLUDED.spec, labels = EXCLUDED.labels,
            last_event_at = EXCLUDED.last_event_at, events = r.events + EXCLUDED.events,
            start_while_running = r.start_while_running + EXCLUDED.start_while_running,
            stop_while_stopped = r.stop_while_stopped + EXCLUDED.stop_while_stopped,
            update_while_stopped = r.update_while_stopped + EXCLUDED.update_while_stopped, updated_at = now()
        """
    )


def _rate_and_write(cur: object, *, hourly_p: str, daily_p: str) -> int:
    """The new quantity, amount and running total of every hourly row that changes, at the
    price valid at its hour; each such row written once; the days moved by the differences."""
    # The catalog as periods (a price holds until the next one of its SKU and currency) and
    # tiers with their lower bounds: small tables joined, not looked up row by row.
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_prices ON COMMIT DROP AS
        SELECT k.code AS sku, p.currency, p.id AS price_id, p.unit_price, p.valid_from,
               coalesce(lead(p.valid_from) OVER (PARTITION BY k.code, p.currency ORDER BY p.valid_from),
                        'infinity'::timestamptz) AS valid_to
        FROM metering_price p JOIN metering_sku k ON k.id = p.sku_id
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_tiers ON COMMIT DROP AS
        SELECT price_id, unit_price, up_to,
               coalesce(lag(up_to) OVER (PARTITION BY price_id ORDER BY position), 0) AS lower_bound
        FROM metering_pricetier
        """
    )
    # Changed rows: usage and accrual add to a row; a replayed resource's duration rows are
    # replaced by the rebuilt ones (a row not rebuilt, or rebuilt as zero, goes). Values are
    # cast to the columns' scale here, so the daily differences are exact.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        CREATE TEMP TABLE rollup_rows ON COMMIT DROP AS
        WITH changed AS (
            SELECT account_id, hour, sku, resource_id, labels, sum(quantity) AS quantity,
                   sum(unit_seconds) AS unit_seconds, bool_or(replaced) AS replaced
            FROM (
                SELECT account_id, hour, sku, resource_id, labels, quantity, unit_seconds, false AS replaced
                FROM rollup_delta
                UNION ALL
                SELECT account_id, hour, sku, resource_id, labels, quantity, unit_seconds, true FROM rollup_rebuilt
                UNION ALL
                SELECT account_id, hour, sku, resource_id, labels, 0, NULL, true FROM rollup_replaced
            ) c
            GROUP BY 1, 2, 3, 4, 5
        )
        SELECT c.account_id, c.hour, c.sku, c.resource_id, c.labels,
               h.account_id IS NOT NULL AS existed, h.quantity AS old_quantity, h.amount AS old_amount,
               h.cum_quantity AS old_cum,
               NOT c.replaced OR c.quantity <> 0 AS kept,
               (CASE WHEN c.replaced THEN c.quantity ELSE coalesce(h.quantity, 0) + c.quantity END)::numeric(38, 12)
                   AS quantity,
               -- durations: units x seconds, exact (NULL for quantity SKUs)
               h.unit_seconds AS old_unit_seconds,
               CASE WHEN c.replaced THEN c.unit_seconds
                    WHEN c.unit_seconds IS NULL THEN h.unit_seconds
                    ELSE coalesce(h.unit_seconds, 0) + c.unit_seconds END AS unit_seconds,
               a.currency, p.price_id, p.unit_price
        FROM changed c
        LEFT JOIN {hourly_p} h ON h.account_id = c.account_id AND h.hour = c.hour AND h.sku = c.sku
                              AND h.resource_id = c.resource_id AND h.labels = c.labels
        LEFT JOIN accounts_billingaccount a ON a.id = c.account_id
        LEFT JOIN rollup_prices p ON p.sku = c.sku AND p.currency = a.currency
                                 AND c.hour >= p.valid_from AND c.hour < p.valid_to
        """
    )
    # Graduated prices: walk each touched month's running total from its first changed hour
    # (rows before it keep theirs), over the rows as they will be.
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_tier_groups ON COMMIT DROP AS
        SELECT account_id, sku, currency, date_trunc('month', hour, 'UTC') AS month, min(hour) AS tail_from
        FROM rollup_rows WHERE price_id IS NOT NULL AND unit_price IS NULL
        GROUP BY 1, 2, 3, 4
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        CREATE TEMP TABLE rollup_tail ON COMMIT DROP AS
        WITH based AS (
            SELECT g.*, coalesce((
                SELECT h.cum_quantity FROM {hourly_p} h
                WHERE h.account_id = g.account_id AND h.sku = g.sku AND h.hour >= g.month AND h.hour < g.tail_from
                ORDER BY h.hour DESC, h.resource_id DESC, h.labels DESC LIMIT 1), 0) AS base
            FROM rollup_tier_groups g
        ), tail_rows AS (
            SELECT h.account_id, h.hour, h.sku, h.resource_id, h.labels, h.quantity, b.currency, b.base, b.month,
                   false AS changed, h.amount AS old_amount, h.cum_quantity AS old_cum, h.unit_seconds
            FROM based b
            JOIN {hourly_p} h ON h.account_id = b.account_id AND h.sku = b.sku
                             AND h.hour >= b.tail_from AND h.hour < b.month + interval '1 month'
            WHERE NOT EXISTS (SELECT 1 FROM rollup_rows r
                              WHERE r.account_id = h.account_id AND r.hour = h.hour AND r.sku = h.sku
                                AND r.resource_id = h.resource_id AND r.labels = h.labels)
            UNION ALL
            SELECT r.account_id, r.hour, r.sku, r.resource_id, r.labels, r.quantity, b.currency, b.base, b.month,
                   true, r.old_amount, r.old_cum, r.unit_seconds
            FROM based b
            JOIN rollup_rows r ON r.account_id = b.account_id AND r.sku = b.sku
                              AND r.hour >= b.tail_from AND r.hour < b.month + interval '1 month'
            WHERE r.kept
        ), walked AS (
            -- each month's running total on its own: a run may touch two months of one SKU
            SELECT t.*, t.base + sum(t.quantity) OVER (
                       PARTITION BY t.account_id, t.sku, t.month ORDER BY t.hour, t.resource_id, t.labels
                       ROWS UNBOUNDED PRECEDING) AS cum_after
            FROM tail_rows t
        )
        -- an hour at a flat price in a month that also has tiers has no tiers: left out
        SELECT t.account_id, t.hour, t.sku, t.resource_id, t.labels, t.quantity, t.changed, t.old_amount, t.old_cum,
               t.unit_seconds, t.cum_after::numeric(38, 12) AS cum_quantity,
               sum(tier.unit_price * greatest(0,
                   least(t.cum_after, coalesce(tier.up_to, t.cum_after))
                   - greatest(t.cum_after - t.quantity, tier.lower_bound)))::numeric(38, 12) AS amount
        FROM walked t
        JOIN rollup_prices p ON p.sku = t.sku AND p.currency = t.currency
                            AND t.hour >= p.valid_from AND t.hour < p.valid_to
        JOIN rollup_tiers tier ON tier.price_id = p.price_id
        GROUP BY t.account_id, t.hour, t.sku, t.resource_id, t.labels, t.quantity, t.changed, t.old_amount,
                 t.old_cum, t.unit_seconds, t.cum_after
        """
    )
    # What is written: changed rows (flat: quantity x price; unpriced: no amount; graduated:
    # from the walk) and unchanged rows whose walk moved; a row equal to what is stored is not.
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_write ON COMMIT DROP AS
        SELECT * FROM (
            SELECT r.account_id, r.hour, r.sku, r.resource_id, r.labels, r.existed, r.kept,
                   r.old_quantity, r.old_amount, r.quantity,
                   CASE WHEN t.account_id IS NOT NULL THEN t.amount
                        WHEN r.price_id IS NOT NULL AND r.unit_price IS NULL THEN r.old_amount
                        ELSE (r.quantity * r.unit_price)::numeric(38, 12) END AS amount,
                   CASE WHEN t.account_id IS NOT NULL THEN t.cum_quantity
                        WHEN r.price_id IS NOT NULL AND r.unit_price IS NULL THEN r.old_cum END AS cum_quantity,
                   r.old_cum, r.unit_seconds, r.old_unit_seconds
            FROM rollup_rows r
            LEFT JOIN rollup_tail t ON t.changed AND t.account_id = r.account_id AND t.hour = r.hour
                                   AND t.sku = r.sku AND t.resource_id = r.resource_id AND t.labels = r.labels
            UNION ALL
            SELECT t.account_id, t.hour, t.sku, t.resource_id, t.labels, true, true,
                   t.quantity, t.old_amount, t.quantity, t.amount, t.cum_quantity, t.old_cum,
                   t.unit_seconds, t.unit_seconds
            FROM rollup_tail t
            WHERE NOT t.changed
        ) w
        WHERE CASE WHEN NOT w.kept THEN w.existed
                   ELSE NOT w.existed OR (w.quantity, w.amount, w.cum_quantity, w.unit_seconds)
                                         IS DISTINCT FROM (w.old_quantity, w.old_amount, w.old_cum,
                                                           w.old_unit_seconds) END
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        DELETE FROM {hourly_p} h USING rollup_write w
        WHERE NOT w.kept AND h.account_id = w.account_id AND h.hour = w.hour AND h.sku = w.sku
          AND h.resource_id = w.resource_id AND h.labels = w.labels
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO {hourly_p} AS h (account_id, hour, sku, resource_id, labels, quantity, amount, cum_quantity,
                                     unit_seconds)
        SELECT account_id, hour, sku, resource_id, labels, quantity, amount, cum_quantity, unit_seconds
        FROM rollup_write WHERE kept
        ORDER BY account_id, hour, sku, resource_id, labels
        ON CONFLICT (account_id, hour, sku, resource_id, labels) DO UPDATE SET
            quantity = EXCLUDED.quantity, amount = EXCLUDED.amount, cum_quantity = EXCLUDED.cum_quantity,
            unit_seconds = EXCLUDED.unit_seconds
        """
    )
    written: int = cur.rowcount  # type: ignore[attr-defined]
    _move_days(cur, hourly_p=hourly_p, daily_p=daily_p)
    _move_months(cur)
    return written


def _move_days(cur: object, *, hourly_p: str, daily_p: str) -> None:
    """Add each written row's difference to its day. A day that lost an hourly row, or whose
    row lost its amount, is summed again from its hours instead (it may have no rows left,
    and a sum of no amounts is no amount, not zero)."""
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_daily ON COMMIT DROP AS
        SELECT account_id, date_trunc('day', hour, 'UTC') AS day, sku, resource_id, labels,
               sum(CASE WHEN kept THEN quantity ELSE 0 END - coalesce(old_quantity, 0)) AS quantity,
               CASE WHEN bool_or(kept AND amount IS NOT NULL OR old_amount IS NOT NULL)
                    THEN sum(coalesce(CASE WHEN kept THEN amount END, 0) - coalesce(old_amount, 0)) END AS amount,
               CASE WHEN bool_or(kept AND unit_seconds IS NOT NULL OR old_unit_seconds IS NOT NULL)
                    THEN sum(coalesce(CASE WHEN kept THEN unit_seconds END, 0) - coalesce(old_unit_seconds, 0))
                    END AS unit_seconds,
               bool_or(NOT kept OR (old_amount IS NOT NULL AND amount IS NULL)) AS recount
        FROM rollup_write
        GROUP BY 1, 2, 3, 4, 5
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO {daily_p} AS d (account_id, day, sku, resource_id, labels, quantity, amount, unit_seconds)
        SELECT account_id, day, sku, resource_id, labels, quantity, amount, unit_seconds
        FROM rollup_daily WHERE NOT recount
        ORDER BY account_id, day, sku, resource_id, labels
        ON CONFLICT (account_id, day, sku, resource_id, labels) DO UPDATE SET
            quantity = d.quantity + EXCLUDED.quantity,
            amount = CASE WHEN EXCLUDED.amount IS NULL THEN d.amount ELSE coalesce(d.amount, 0) + EXCLUDED.amount END,
            unit_seconds = CASE WHEN EXCLUDED.unit_seconds IS NULL THEN d.unit_seconds
                                ELSE coalesce(d.unit_seconds, 0) + EXCLUDED.unit_seconds END
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        DELETE FROM {daily_p} d USING rollup_daily x
        WHERE x.recount AND d.account_id = x.account_id AND d.day = x.day AND d.sku = x.sku
          AND d.resource_id = x.resource_id AND d.labels = x.labels
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO {daily_p} (account_id, day, sku, resource_id, labels, quantity, amount, unit_seconds)
        SELECT h.account_id, x.day, h.sku, h.resource_id, h.labels, sum(h.quantity), sum(h.amount), sum(h.unit_seconds)
        FROM rollup_daily x
        JOIN {hourly_p} h ON h.account_id = x.account_id AND h.resource_id = x.resource_id
                         AND h.hour >= x.day AND h.hour < x.day + interval '1 day'
                         AND h.sku = x.sku AND h.labels = x.labels
        WHERE x.recount
        GROUP BY h.account_id, x.day, h.sku, h.resource_id, h.labels
        """
    )


def _move_months(cur: object) -> None:
    """Add each written row's amount difference to its account's month (``MonthlySpend``).
    Shards hold disjoint accounts, so concurrent shard runs never touch the same row."""
    cur.execute(  # type: ignore[attr-defined]
        """
        INSERT INTO metering_monthlyspend AS m (account_id, month, amount)
        SELECT account_id, (date_trunc('month', hour, 'UTC') AT TIME ZONE 'UTC')::date,
               sum(coalesce(CASE WHEN kept THEN amount END, 0) - coalesce(old_amount, 0))
        FROM rollup_write
        GROUP BY 1, 2
        HAVING sum(coalesce(CASE WHEN kept THEN amount END, 0) - coalesce(old_amount, 0)) <> 0
        ORDER BY 1, 2
        ON CONFLICT (account_id, month) DO UPDATE SET amount = m.amount + EXCLUDED.amount
        """
    )


def shard_of(account_id: int) -> int:
    """The shard (hash partition remainder) that holds an account's rows: PostgreSQL's routing,
    one implementation (``metering.sharding``)."""
    return sharding.shard_of(account_id)
