"""Events → rated hourly usage, exactly once, in set-based SQL, one shard at a time.

A shard is one hash partition (remainder) of every metering table, i.e. a fixed slice of
the accounts. One run of one shard is one transaction:

1. claim the shard's progress row (``FOR UPDATE SKIP LOCKED``: a second worker skips it);
2. take the new events: ``horizon_old <= txid < pg_snapshot_xmin(now)``. Every transaction
   below the snapshot's xmin has finished, so an event can be neither skipped (still in
   flight) nor taken twice (the horizon moves in this same transaction);
3. usage events: summed into their hour and added to ``hourlyusage``;
4. lifecycle events: appended to each resource's timeline; for each touched resource the
   timeline is replayed in event-time order (ties by event id) from the event before the
   earliest new one, its duration rows from that hour on are deleted and rebuilt. So a late
   event lands where its time says and the answer never depends on arrival order. Closed
   intervals are materialised in full; open ones (running resources) up to the watermark;
5. the watermark (start of the current hour) moves: running resources that had no events
   accrue the hours in between;
6. every hour touched is rated: flat prices per row; graduated prices re-walk the month's
   running total (``cum_quantity``) from the first touched hour, so a tier boundary crossed
   inside an hour splits that hour's amount; the days of everything rated are rebuilt in
   ``dailyusage`` (what day and month cost breakdowns read);
7. the horizon and watermark are stored. A crash anywhere rolls all of it back.

Amounts keep 12 decimal places: rounding happens on invoices, not here.

Operational caveat: the snapshot xmin is cluster-wide, so a long-running transaction in
any database of the same PostgreSQL server holds the horizon back and the rollup waits
(events are delayed, never lost or doubled). Keep ``idle_in_transaction_session_timeout``
and statement timeouts on, and long reports on a replica.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.db import connection, transaction

SHARDS = 16  # the partitions of migration 0002/0004
TEMP_TABLES = (
    "rollup_new",
    "rollup_touched",
    "rollup_dirty",
    "rollup_timeline",
    "rollup_rebuilt",
    "rollup_extension",
    "rollup_rate",
    "rollup_prices",
    "rollup_tiers",
    "rollup_tier_groups",
    "rollup_days",
)


@dataclass
class ShardReport:
    shard: int
    events: int = 0
    usage_rows: int = 0
    resources: int = 0
    running_extended: int = 0
    rated_rows: int = 0
    watermark: dt.datetime | None = None


@dataclass
class RollupReport:
    shards: list[ShardReport] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # claimed by another worker

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
        return text


def hour_floor(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def rollup(*, now: dt.datetime | None = None, shards: list[int] | None = None) -> RollupReport:
    """Process everything pending in every shard (or the given ones)."""
    report = RollupReport()
    for shard in shards if shards is not None else range(SHARDS):
        result = rollup_shard(shard=shard, now=now)
        if result is None:
            report.skipped.append(shard)
        else:
            report.shards.append(result)
    return report


def _p(table: str, shard: int) -> str:
    return f"{table}_p{shard:02d}"


@transaction.atomic(durable=True)
def rollup_shard(*, shard: int, now: dt.datetime | None = None) -> ShardReport | None:
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
        cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, now()")
        horizon_new, db_now = cur.fetchone()
        watermark = hour_floor(now or db_now)
        if watermark_old is not None and watermark < watermark_old:
            watermark = watermark_old  # the watermark never moves back
        report = ShardReport(shard=shard, watermark=watermark)
        # ON COMMIT DROP cleans up after a real transaction; inside an outer one (tests, a
        # caller's atomic block) the previous shard's tables are still there.
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(TEMP_TABLES)}")
        params = {"h_old": horizon_old, "h_new": horizon_new, "w_old": watermark_old or watermark, "w": watermark}

        # 2. The new events of this shard.
        cur.execute(
            f"""
            CREATE TEMP TABLE rollup_new ON COMMIT DROP AS
            SELECT account_id, event_id, occurred_at, kind, sku, quantity, resource_id, action, spec, labels
            FROM {events_p} WHERE txid >= %(h_old)s AND txid < %(h_new)s
            """,
            params,
        )
        report.events = cur.rowcount
        cur.execute("CREATE TEMP TABLE rollup_touched (account_id bigint, sku text, hour timestamptz) ON COMMIT DROP")

        # 3. Usage events: added to their hour.
        cur.execute(
            f"""
            INSERT INTO {hourly_p} AS h (account_id, hour, sku, resource_id, labels, quantity)
            SELECT account_id, date_trunc('hour', occurred_at, 'UTC'), sku, coalesce(resource_id, ''),
                   coalesce(labels, '{{}}'), sum(quantity)
            FROM rollup_new WHERE kind = 'usage'
            GROUP BY 1, 2, 3, 4, 5
            ON CONFLICT (account_id, hour, sku, resource_id, labels)
            DO UPDATE SET quantity = h.quantity + EXCLUDED.quantity
            """
        )
        report.usage_rows = cur.rowcount
        cur.execute(
            """
            INSERT INTO rollup_touched
            SELECT DISTINCT account_id, sku, date_trunc('hour', occurred_at, 'UTC') FROM rollup_new WHERE kind = 'usage'
            """
        )

        # 4. Lifecycle events: extend the timelines, replay the touched resources.
        cur.execute(
            f"""
            INSERT INTO {resev_p} (account_id, resource_id, occurred_at, event_id, action, spec, labels)
            SELECT account_id, resource_id, occurred_at, event_id, action, spec, coalesce(labels, '{{}}')
            FROM rollup_new WHERE kind = 'resource'
            ON CONFLICT DO NOTHING
            """
        )
        cur.execute(
            f"""
            CREATE TEMP TABLE rollup_dirty ON COMMIT DROP AS
            SELECT d.account_id, d.resource_id,
                   date_trunc('hour', coalesce(
                       (SELECT max(e.occurred_at) FROM {resev_p} e
                        WHERE e.account_id = d.account_id AND e.resource_id = d.resource_id
                          AND e.occurred_at < d.first_new),
                       d.first_new), 'UTC') AS replay_from
            FROM (SELECT account_id, resource_id, min(occurred_at) AS first_new
                  FROM rollup_new WHERE kind = 'resource' GROUP BY 1, 2) d
            """
        )
        report.resources = cur.rowcount
        if report.resources:
            _replay_resources(cur, resev_p=resev_p, hourly_p=hourly_p, state_p=state_p, params=params)

        # 5. The watermark moved: running resources without events accrue the hours between.
        if watermark_old is not None and watermark > watermark_old:
            cur.execute(
                f"""
                CREATE TEMP TABLE rollup_extension ON COMMIT DROP AS
                SELECT r.account_id, h.hour, s.key AS sku, r.resource_id, r.labels,
                       sum(s.value::numeric * extract(epoch FROM
                           least(h.hour + interval '1 hour', %(w)s) - greatest(r.since, h.hour)) / 3600) AS quantity
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
            cur.execute(
                f"""
                INSERT INTO {hourly_p} AS h (account_id, hour, sku, resource_id, labels, quantity)
                SELECT account_id, hour, sku, resource_id, labels, quantity FROM rollup_extension
                ON CONFLICT (account_id, hour, sku, resource_id, labels)
                DO UPDATE SET quantity = h.quantity + EXCLUDED.quantity
                """
            )
            report.running_extended = cur.rowcount
            cur.execute("INSERT INTO rollup_touched SELECT DISTINCT account_id, sku, hour FROM rollup_extension")

        # 6. Rate every touched hour; rebuild the days they belong to.
        report.rated_rows = _rate(cur, hourly_p=hourly_p)
        _refresh_days(cur, hourly_p=hourly_p, daily_p=_p("metering_dailyusage", shard))

        # 7. Done: the next run starts where this one ended.
        cur.execute(
            "UPDATE metering_rollupshard SET txid_horizon = %s, watermark = %s, "
            "events_processed = events_processed + %s, updated_at = now() WHERE shard = %s",
            [horizon_new, watermark, report.events, shard],
        )
    return report


def _replay_resources(cur: object, *, resev_p: str, hourly_p: str, state_p: str, params: dict[str, object]) -> None:
    # The whole timeline of each touched resource, in event-time order (ties by event id),
    # with whether the resource is running before and after each event: the last start or
    # stop so far decides; an update changes the spec, not whether it runs.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        CREATE TEMP TABLE rollup_timeline ON COMMIT DROP AS
        WITH ordered AS (
            SELECT e.account_id, e.resource_id, e.occurred_at, e.event_id, e.action, e.spec, e.labels,
                   d.replay_from,
                   lead(e.occurred_at) OVER w AS next_at,
                   count(*) FILTER (WHERE e.action IN ('start', 'stop')) OVER w AS run_group,
                   row_number() OVER w AS position
            FROM {resev_p} e
            JOIN rollup_dirty d ON d.account_id = e.account_id AND d.resource_id = e.resource_id
            WINDOW w AS (PARTITION BY e.account_id, e.resource_id ORDER BY e.occurred_at, e.event_id)
        ), with_status AS (
            SELECT o.*,
                   coalesce(first_value(o.action) OVER g = 'start', false) AND o.run_group > 0 AS running_after
            FROM ordered o
            WINDOW g AS (PARTITION BY o.account_id, o.resource_id, o.run_group ORDER BY o.position)
        )
        SELECT s.*,
               coalesce(lag(s.running_after) OVER (PARTITION BY s.account_id, s.resource_id ORDER BY s.position),
                        false) AS running_before
        FROM with_status s
        """
    )
    # Throw away the touched resources' duration rows from their replay hour, then rebuild them.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        WITH gone AS (
            DELETE FROM {hourly_p} h
            USING rollup_dirty d, metering_sku k
            WHERE h.account_id = d.account_id AND h.resource_id = d.resource_id AND h.hour >= d.replay_from
              AND k.code = h.sku AND k.kind = 'duration'
            RETURNING h.account_id, h.sku, h.hour
        )
        INSERT INTO rollup_touched SELECT DISTINCT account_id, sku, hour FROM gone
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
                   least(i.t1, h.hour + interval '1 hour') - greatest(i.t0, h.hour)) / 3600) AS quantity
        FROM intervals i
        CROSS JOIN LATERAL generate_series(date_trunc('hour', i.t0, 'UTC'), i.t1 - interval '1 microsecond',
                                           interval '1 hour') AS h(hour)
        CROSS JOIN LATERAL jsonb_each_text(i.spec) AS s(key, value)
        WHERE i.t1 > i.t0
        GROUP BY 1, 2, 3, 4, 5
        """,
        params,
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO {hourly_p} (account_id, hour, sku, resource_id, labels, quantity)
        SELECT account_id, hour, sku, resource_id, labels, quantity FROM rollup_rebuilt WHERE quantity <> 0
        """
    )
    cur.execute("INSERT INTO rollup_touched SELECT DISTINCT account_id, sku, hour FROM rollup_rebuilt")  # type: ignore[attr-defined]
    # Where each timeline leaves its resource, and its data-quality counters (recounted in
    # full, so replays never double count).
    cur.execute(  # type: ignore[attr-defined]
        f"""
        WITH last AS (
            SELECT DISTINCT ON (account_id, resource_id) account_id, resource_id, running_after, labels, occurred_at
            FROM rollup_timeline ORDER BY account_id, resource_id, position DESC
        ), open AS (
            SELECT DISTINCT ON (account_id, resource_id) account_id, resource_id, occurred_at, spec
            FROM rollup_timeline WHERE action IN ('start', 'update') AND running_after
            ORDER BY account_id, resource_id, position DESC
        ), counts AS (
            SELECT account_id, resource_id, count(*) AS events,
                   count(*) FILTER (WHERE action = 'start' AND running_before) AS start_while_running,
                   count(*) FILTER (WHERE action = 'stop' AND NOT running_before) AS stop_while_stopped,
                   count(*) FILTER (WHERE action = 'update' AND NOT running_before) AS update_while_stopped
            FROM rollup_timeline GROUP BY 1, 2
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
            last_event_at = EXCLUDED.last_event_at, events = EXCLUDED.events,
            start_while_running = EXCLUDED.start_while_running, stop_while_stopped = EXCLUDED.stop_while_stopped,
            update_while_stopped = EXCLUDED.update_while_stopped, updated_at = now()
        """
    )


def _rate(cur: object, *, hourly_p: str) -> int:
    """Amounts for every touched (account, SKU, hour), at the price valid at that hour."""
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
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_rate ON COMMIT DROP AS
        SELECT t.account_id, t.sku, t.hour, a.currency, p.price_id, p.unit_price
        FROM (SELECT DISTINCT account_id, sku, hour FROM rollup_touched) t
        JOIN accounts_billingaccount a ON a.id = t.account_id
        LEFT JOIN rollup_prices p ON p.sku = t.sku AND p.currency = a.currency
                                 AND t.hour >= p.valid_from AND t.hour < p.valid_to
        """
    )
    # Flat prices (and unpriced hours, left without an amount).
    cur.execute(  # type: ignore[attr-defined]
        f"""
        UPDATE {hourly_p} h SET amount = h.quantity * r.unit_price, cum_quantity = NULL
        FROM rollup_rate r
        WHERE (r.unit_price IS NOT NULL OR r.price_id IS NULL)
          AND h.account_id = r.account_id AND h.sku = r.sku AND h.hour = r.hour
        """
    )
    rated: int = cur.rowcount  # type: ignore[attr-defined]
    # Graduated prices: walk each touched month's running total from its first touched hour.
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_tier_groups ON COMMIT DROP AS
        SELECT account_id, sku, currency, date_trunc('month', hour, 'UTC') AS month, min(hour) AS tail_from
        FROM rollup_rate WHERE price_id IS NOT NULL AND unit_price IS NULL
        GROUP BY 1, 2, 3, 4
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        WITH groups AS (SELECT * FROM rollup_tier_groups), based AS (
            SELECT g.*, coalesce((
                SELECT h.cum_quantity FROM {hourly_p} h
                WHERE h.account_id = g.account_id AND h.sku = g.sku AND h.hour >= g.month AND h.hour < g.tail_from
                ORDER BY h.hour DESC, h.resource_id DESC, h.labels DESC LIMIT 1), 0) AS base
            FROM groups g
        ), tail AS (
            SELECT h.account_id, h.hour, h.sku, h.resource_id, h.labels, h.quantity, b.currency,
                   b.base + sum(h.quantity) OVER (
                       PARTITION BY h.account_id, h.sku ORDER BY h.hour, h.resource_id, h.labels
                       ROWS UNBOUNDED PRECEDING) AS cum_after
            FROM {hourly_p} h
            JOIN based b ON h.account_id = b.account_id AND h.sku = b.sku
                        AND h.hour >= b.tail_from AND h.hour < b.month + interval '1 month'
        ), priced AS (
            -- an hour at a flat price in a month that also has tiers has no tiers: left out
            SELECT t.account_id, t.hour, t.sku, t.resource_id, t.labels, t.cum_after,
                   sum(tier.unit_price * greatest(0,
                       least(t.cum_after, coalesce(tier.up_to, t.cum_after))
                       - greatest(t.cum_after - t.quantity, tier.lower_bound))) AS amount
            FROM tail t
            JOIN rollup_prices p ON p.sku = t.sku AND p.currency = t.currency
                                AND t.hour >= p.valid_from AND t.hour < p.valid_to
            JOIN rollup_tiers tier ON tier.price_id = p.price_id
            GROUP BY 1, 2, 3, 4, 5, 6
        )
        UPDATE {hourly_p} h SET cum_quantity = p.cum_after, amount = p.amount
        FROM priced p
        WHERE h.account_id = p.account_id AND h.hour = p.hour AND h.sku = p.sku
          AND h.resource_id = p.resource_id AND h.labels = p.labels
        """
    )
    rated += cur.rowcount  # type: ignore[attr-defined]
    return rated


def _refresh_days(cur: object, *, hourly_p: str, daily_p: str) -> None:
    """Rebuild the daily rows of every (account, SKU, day) whose hours changed or were
    re-rated (a graduated month's tail re-rates the days after its first touched hour)."""
    cur.execute(  # type: ignore[attr-defined]
        """
        CREATE TEMP TABLE rollup_days ON COMMIT DROP AS
        SELECT DISTINCT account_id, sku, date_trunc('day', hour, 'UTC') AS day FROM rollup_touched
        UNION
        SELECT g.account_id, g.sku, d.day
        FROM rollup_tier_groups g
        CROSS JOIN LATERAL generate_series(date_trunc('day', g.tail_from, 'UTC'),
                                           g.month + interval '1 month' - interval '1 day', interval '1 day') AS d(day)
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        DELETE FROM {daily_p} d USING rollup_days x
        WHERE d.account_id = x.account_id AND d.sku = x.sku AND d.day = x.day
        """
    )
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO {daily_p} (account_id, day, sku, resource_id, labels, quantity, amount)
        SELECT h.account_id, x.day, h.sku, h.resource_id, h.labels, sum(h.quantity), sum(h.amount)
        FROM rollup_days x
        JOIN {hourly_p} h ON h.account_id = x.account_id AND h.sku = x.sku
                         AND h.hour >= x.day AND h.hour < x.day + interval '1 day'
        GROUP BY h.account_id, x.day, h.sku, h.resource_id, h.labels
        """
    )


def shard_of(account_id: int) -> int:
    """The shard (hash partition remainder) that holds an account's rows."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT r FROM generate_series(0, %s - 1) AS r "
            "WHERE satisfies_hash_partition('metering_usageevent'::regclass, %s, r, %s::bigint)",
            [SHARDS, SHARDS, account_id],
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0])
