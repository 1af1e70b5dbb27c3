"""Hourly usage from the event store (the scale path), per hour and shard, exactly and idempotently.

The sinks mark each hour and shard their insert touched (``mark_dirty``) after the insert and
before they acknowledge the log, with a version from a PostgreSQL sequence. A rollup run of a
shard (``metering.rollup.rollup_shard``, in its one transaction) takes the shard's hours whose
marked version is above the manifest's (``take``), reads the version *before* it reads the
event store, and then:

1. asks the event store for those hours' usage per (account, hour, SKU, resource, labels),
   every event counted once (``FINAL``), and their lifecycle events;
2. compares the usage with the hourly rows of quantity SKUs the hours have now, and hands the
   differences to the rollup as usage to add (usually only what is new; a recomputation that
   finds nothing new adds nothing), and the lifecycle events to its timelines (an event
   already there is skipped by its key);
3. records in the manifest the version it read, the counts and a checksum of the events.

So a late event recomputes the hours it touches, a hour recomputed twice gives the same rows,
and a sink's insert that lands after the read is marked with a later version and taken by the
next run: nothing rests on PostgreSQL's snapshot horizon. Rating, invoicing, credit checks and
the ledger read PostgreSQL as on the single-machine path.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection

from billing_site.common.copy import copy_text

log = logging.getLogger(__name__)

_MARK = """
INSERT INTO metering_dirtyhour AS d (shard, hour, version, marked_at)
SELECT s, h, nextval('metering_dirtyhour_version'), now()
FROM unnest(%s::smallint[], %s::timestamptz[]) AS m(s, h)
ORDER BY s, h
ON CONFLICT (shard, hour) DO UPDATE SET version = EXCLUDED.version, marked_at = EXCLUDED.marked_at
"""


def mark_dirty(pairs: Iterable[tuple[int, dt.datetime]]) -> int:
    """Mark hours of shards as changed (in their own transaction when called outside one)."""
    ordered = sorted(set(pairs))
    if not ordered:
        return 0
    with connection.cursor() as cur:
        cur.execute(_MARK, [[s for s, _ in ordered], [h for _, h in ordered]])
    return len(ordered)


@dataclass
class HourlyInput:
    """What ``take`` put into ``rollup_new`` for one shard's run."""

    hours: list[tuple[dt.datetime, int]]  # (hour, version read before the event store)
    events: int = 0  # counted in the event store over those hours
    usage_changes: int = 0
    resource_events: int = 0
    digests: dict[dt.datetime, tuple[int, str]] = field(default_factory=dict)  # per hour: (events, checksum)


def dirty_hours(cur: object, shard: int, limit: int) -> list[tuple[dt.datetime, int]]:
    cur.execute(  # type: ignore[attr-defined]
        "SELECT d.hour, d.version FROM metering_dirtyhour d "
        "LEFT JOIN metering_hourmanifest m ON m.shard = d.shard AND m.hour = d.hour "
        "WHERE d.shard = %s AND (m.version IS NULL OR d.version > m.version) "
        "ORDER BY d.hour LIMIT %s",
        [shard, limit],
    )
    return list(cur.fetchall())  # type: ignore[attr-defined]


def take(cur: object, *, shard: int, hourly_p: str) -> HourlyInput:
    """Fill ``rollup_new`` (created by the caller, the rollup's event columns) with the
    changes of the shard's dirty hours; then ``write_manifest`` once the rollup wrote them."""
    from metering import eventstore  # the engine opens in the process that computes hours

    taken = HourlyInput(hours=dirty_hours(cur, shard, settings.METERING_HOURS_PER_PASS))
    if not taken.hours:
        return taken
    hours = [hour for hour, _ in taken.hours]
    store = eventstore.get_store()
    cur.execute(  # type: ignore[attr-defined]
        "CREATE TEMP TABLE rollup_store_usage (account_id bigint, hour timestamptz, sku text, resource_id text, "
        "labels jsonb, quantity numeric) ON COMMIT DROP"
    )
    copy_text(
        "rollup_store_usage",
        ("account_id", "hour", "sku", "resource_id", "labels", "quantity"),
        store.hour_usage(shard, hours),
    )
    # What to add to each hourly row of a quantity SKU: the event store's sum minus the row's
    # quantity now (labels compared as jsonb: one meaning, one row); a row the hour does not
    # have yet is added even at zero, as the single-machine path adds a zero event's row. Only
    # the accounts and hours with usage in the event store are compared: an account whose rows
    # came from elsewhere (the other store, before a switch) is left alone.
    cur.execute(  # type: ignore[attr-defined]
        f"""
        INSERT INTO rollup_new (account_id, event_id, occurred_at, kind, sku, quantity, resource_id, action, spec,
                                labels)
        WITH target AS (
            SELECT account_id, hour, sku, resource_id, labels, sum(quantity) AS quantity
            FROM rollup_store_usage GROUP BY 1, 2, 3, 4, 5
        ), present AS (
            SELECT h.account_id, h.hour, h.sku, h.resource_id, h.labels, h.quantity
            FROM {hourly_p} h JOIN metering_sku k ON k.code = h.sku AND k.kind = 'quantity'
            WHERE h.hour = ANY(%(hours)s)
              AND (h.account_id, h.hour) IN (SELECT DISTINCT account_id, hour FROM rollup_store_usage)
        )
        SELECT coalesce(t.account_id, p.account_id), '', coalesce(t.hour, p.hour), 'usage',
               coalesce(t.sku, p.sku), coalesce(t.quantity, 0) - coalesce(p.quantity, 0),
               nullif(coalesce(t.resource_id, p.resource_id), ''), NULL, NULL,
               nullif(coalesce(t.labels, p.labels), '{{}}'::jsonb)
        FROM target t
        FULL JOIN present p ON p.account_id = t.account_id AND p.hour = t.hour AND p.sku = t.sku
                           AND p.resource_id = t.resource_id AND p.labels = t.labels
        WHERE p.account_id IS NULL OR coalesce(t.quantity, 0) <> coalesce(p.quantity, 0)
        """,
        {"hours": hours},
    )
    taken.usage_changes = cur.rowcount  # type: ignore[attr-defined]
    cur.execute(  # type: ignore[attr-defined]
        "CREATE TEMP TABLE rollup_store_lifecycle (account_id bigint, resource_id text, event_id text, "
        "occurred_at timestamptz, "
        "action text, spec jsonb, labels jsonb) ON COMMIT DROP"
    )
    copy_text(
        "rollup_store_lifecycle",
        ("account_id", "resource_id", "event_id", "occurred_at", "action", "spec", "labels"),
        store.hour_resource_events(shard, hours),
    )
    cur.execute(  # type: ignore[attr-defined]
        "INSERT INTO rollup_new (account_id, event_id, occurred_at, kind, sku, quantity, resource_id, action, spec, "
        "labels) SELECT account_id, event_id, occurred_at, 'resource', NULL, NULL, resource_id, action, spec, labels "
        "FROM rollup_store_lifecycle"
    )
    taken.resource_events = cur.rowcount  # type: ignore[attr-defined]
    taken.digests = store.hour_digests(shard, hours)
    taken.events = sum(count for count, _ in taken.digests.values())
    return taken


def write_manifest(cur: object, *, shard: int, taken: HourlyInput) -> None:
    digests = taken.digests
    if not taken.hours:
        return
    hours = [hour for hour, _ in taken.hours]
    cur.execute(  # type: ignore[attr-defined]
        """
        INSERT INTO metering_hourmanifest AS m (shard, hour, version, events, usage_rows, resource_events, checksum,
                                                computed_at)
        SELECT %(shard)s, h, v, e, coalesce(u.rows, 0), coalesce(r.events, 0), c, now()
        FROM unnest(%(hours)s::timestamptz[], %(versions)s::bigint[], %(events)s::bigint[], %(checks)s::text[])
             AS x(h, v, e, c)
        LEFT JOIN (SELECT hour, count(*) AS rows FROM rollup_store_usage GROUP BY 1) u ON u.hour = x.h
        LEFT JOIN (SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, count(*) AS events
                   FROM rollup_store_lifecycle GROUP BY 1) r ON r.hour = x.h
        ON CONFLICT (shard, hour) DO UPDATE SET version = EXCLUDED.version, events = EXCLUDED.events,
            usage_rows = EXCLUDED.usage_rows, resource_events = EXCLUDED.resource_events,
            checksum = EXCLUDED.checksum, computed_at = EXCLUDED.computed_at
        """,
        {
            "shard": shard,
            "hours": hours,
            "versions": [version for _, version in taken.hours],
            "events": [digests.get(hour, (0, ""))[0] for hour in hours],
            "checks": [digests.get(hour, (0, "0"))[1] for hour in hours],
        },
    )
    log.info(
        "hours.computed",
        extra={
            "shard": shard,
            "hours": len(hours),
            "first_hour": min(hours),
            "last_hour": max(hours),
            "events": taken.events,
            "usage_changes": taken.usage_changes,
            "resource_events": taken.resource_events,
        },
    )
