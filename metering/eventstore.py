"""The raw events on the scale path: a ClickHouse table, embedded (chdb) or on a cluster.

The only module that imports ``chdb`` or ``clickhouse_connect``. The table is described once
(``COLUMNS``, ``SORTING_KEY``, ``PARTITION_KEY``); the embedded DDL and the cluster DDL are both
generated from that description.

**Identity and exactly once.** An event is ``(account_id, event_id)``. The table is a
``ReplacingMergeTree`` ordered by ``(shard, hour, account_id, event_id)`` and partitioned by
the day of the event's time: every copy of one event (a resend, re-batched, days later, after a
sink died before acknowledging the log) has the same time, so it lands in the same partition
under the same key, and ``FINAL`` counts it once — exactly, whatever the merges have done so
far. Reads therefore always use ``FINAL`` (with ``do_not_merge_across_partitions_select_final``:
no key spans two partitions); nothing is counted through materialized views, which count
retried and re-batched inserts again (ClickHouse issue #76110). Two *different* contents under
one id in the same hour are one event too: the version column ``precedence`` is a hash of the
content, so the same version wins whatever the order of arrival and recalculation always gives
the same answer. Under one id in different hours they are two events (the API cannot see that
synchronously without an index of every id; the README says so).

**Storage is bounded**: a TTL drops a day's partition whole once it is older than
``METERING_EVENT_RETENTION_DAYS`` (``ttl_only_drop_parts``). Inserts carry a deterministic
deduplication token, so a sink that inserts the same block twice stores it once even before any
merge.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

TABLE = "usage_events"
# (name, ClickHouse type) in the order of the table and of the log's JSON lines' fields.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("shard", "UInt8"),
    ("account_id", "Int64 CODEC(Delta, ZSTD(1))"),  # sorted: long runs
    ("event_id", "String CODEC(ZSTD(3))"),
    ("occurred_at", "DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1))"),
    ("kind", "LowCardinality(String)"),  # usage | resource
    ("sku", "LowCardinality(String)"),  # '' for resource events
    ("quantity", "Decimal(38, 12) CODEC(ZSTD(1))"),  # 0 for resource events
    ("resource_id", "String CODEC(ZSTD(3))"),
    ("action", "LowCardinality(String)"),  # '' for usage events
    ("spec", "String CODEC(ZSTD(3))"),  # JSON, '' when none
    ("labels", "LowCardinality(String)"),  # JSON with sorted keys, '' when none: few distinct sets
    ("precedence", "UInt32 CODEC(ZSTD(1))"),  # the version: a hash of the content
)
SORTING_KEY = "shard, toStartOfHour(occurred_at), account_id, event_id"
PARTITION_KEY = "toYYYYMMDD(occurred_at)"
# The log's lines: one JSON array per event, an ingest ``Row`` as msgspec encodes it
# (``metering.ingest.encode_for_log``). The shard comes from the message heads' account → shard
# map, the version (precedence) from the content.
LINE_SCHEMA = (
    "i UInt32, a Int64, e String, t String, k String, u Nullable(String), q Nullable(Decimal(38, 12)), "
    "r Nullable(String), x Nullable(String), p Nullable(String), l Nullable(String)"
)
_LINE_TO_ROW = (
    "{shard}, a, e, parseDateTime64BestEffort(t, 6, 'UTC'), k, ifNull(u, ''), ifNull(q, 0), ifNull(r, ''), "
    "ifNull(x, ''), ifNull(p, ''), ifNull(l, ''), "
    "toUInt32(cityHash64(k, ifNull(u, ''), toString(ifNull(q, 0)), ifNull(r, ''), ifNull(x, ''), ifNull(p, ''), "
    "ifNull(l, ''), t) % 4294967296)"
)
# Deduplication of identical inserts (by token) without replication.
DEDUP_WINDOW = 10_000
_READ = "SETTINGS do_not_merge_across_partitions_select_final = 1"


def _columns_sql() -> str:
    columns = [f"{name} {kind}" for name, kind in COLUMNS]
    # An insert whose shard map missed an account is refused whole, never stored under no shard.
    return ",\n    ".join([*columns, "CONSTRAINT known_shard CHECK shard < 16"])


def _ttl(retention_days: int) -> str:
    return f"toDateTime(occurred_at) + INTERVAL {int(retention_days)} DAY"


def local_ddl(*, retention_days: int) -> str:
    """The table on one ClickHouse (embedded or a single server)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {TABLE} (\n    {_columns_sql()}\n)\n"
        f"ENGINE = ReplacingMergeTree(precedence)\nPARTITION BY {PARTITION_KEY}\nORDER BY ({SORTING_KEY})\n"
        f"TTL {_ttl(retention_days)}\n"
        f"SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )


def cluster_ddl(*, cluster: str, database: str, retention_days: int) -> list[str]:
    """The same table on a cluster: a replicated local table on every node and a Distributed
    table over it, sharded by the event's shard (so every copy of an event, and a whole
    hour-shard, lives on one ClickHouse shard and ``FINAL`` there is exact). Generated, not run
    here: no current ClickHouse server can be installed on these machines."""
    local = f"{database}.{TABLE}_local"
    return [
        f"CREATE DATABASE IF NOT EXISTS {database} ON CLUSTER {cluster}",
        f"CREATE TABLE IF NOT EXISTS {local} ON CLUSTER {cluster} (\n    {_columns_sql()}\n)\n"
        f"ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{database}/{TABLE}', '{{replica}}', "
        f"precedence)\nPARTITION BY {PARTITION_KEY}\nORDER BY ({SORTING_KEY})\nTTL {_ttl(retention_days)}\n"
        f"SETTINGS ttl_only_drop_parts = 1, replicated_deduplication_window = {DEDUP_WINDOW}",
        f"CREATE TABLE IF NOT EXISTS {database}.{TABLE} ON CLUSTER {cluster} AS {local}\n"
        f"ENGINE = Distributed({cluster}, {database}, {TABLE}_local, shard)",
    ]


@dataclass(frozen=True)
class StoreStats:
    rows: int  # stored, before FINAL (copies not yet merged count)
    bytes_on_disk: int
    partitions: int  # days holding events (a dropped day's empty part may linger a moment)


def _hours_sql(hours: Sequence[dt.datetime]) -> str:
    return ", ".join(str(int(hour.timestamp())) for hour in hours)


def _where(shard: int, hours: Sequence[dt.datetime]) -> str:
    return f"shard = {int(shard)} AND toUnixTimestamp(toStartOfHour(occurred_at)) IN ({_hours_sql(hours)})"


_TS = "concat(toString(toStartOfHour(occurred_at)), '+00')"


class EventStore:
    """One ClickHouse: ``chdb`` in this process (``path``) or a server (``url``)."""

    def __init__(self, *, path: str | None = None, url: str | None = None, retention_days: int) -> None:
        self._lock = threading.Lock()  # one query at a time on the embedded engine
        self.path, self.url = path, url
        if url:
            import clickhouse_connect

            self._client: Any = clickhouse_connect.get_client(dsn=url)
            self._session: Any = None
        else:
            from chdb import session

            os.makedirs(path or ".", exist_ok=True)
            self._session = session.Session(path)
            self._client = None
        self._run(local_ddl(retention_days=retention_days))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _run(self, sql: str) -> bytes:
        with self._lock:
            if self._client is not None:
                return bytes(self._client.raw_query(sql))
            result = self._session.query(sql, "TabSeparated")
            return bytes(result.bytes())

    def insert_lines(self, lines: bytes, *, token: str, shards: dict[int, int]) -> None:
        """Insert the log's event lines as one block, deduplicated by ``token``; ``shards``
        maps every account in them to its shard."""
        accounts = sorted(shards)
        keys, values = ", ".join(map(str, accounts)), ", ".join(str(shards[a]) for a in accounts)
        shard = f"transform(a, [{keys}], [{values}], 255)"  # 255: refused by the known_shard constraint
        head = (
            f"INSERT INTO {TABLE} SETTINGS insert_deduplication_token = '{token}' "
            f"SELECT {_LINE_TO_ROW.format(shard=shard)} FROM "
        )
        if self._client is not None:
            with self._lock:
                self._client.raw_query(f"{head} input('{LINE_SCHEMA}') FORMAT JSONCompactEachRow", data=lines)
            return
        with tempfile.NamedTemporaryFile(dir=_scratch(), suffix=".jsonl") as file:
            file.write(lines)
            file.flush()
            self._run(f"{head} file('{file.name}', JSONCompactEachRow, '{LINE_SCHEMA}')")

    def hour_usage(self, shard: int, hours: Sequence[dt.datetime]) -> bytes:
        """Per (account, hour, SKU, resource, labels) the usage quantity of the hours, counted
        once, as COPY text rows: account_id, hour, sku, resource_id, labels, quantity."""
        return self._run(
            f"SELECT account_id, {_TS}, sku, resource_id, if(labels = '', '{{}}', labels), sum(quantity) "
            f"FROM {TABLE} FINAL WHERE {_where(shard, hours)} AND kind = 'usage' "
            f"GROUP BY account_id, toStartOfHour(occurred_at), sku, resource_id, labels {_READ}"
        )

    def hour_resource_events(self, shard: int, hours: Sequence[dt.datetime]) -> bytes:
        """The lifecycle events of the hours, once each, as COPY text rows: account_id,
        resource_id, event_id, occurred_at, action, spec, labels."""
        return self._run(
            f"SELECT account_id, resource_id, event_id, concat(toString(occurred_at), '+00'), action, "
            f"if(spec = '', NULL, spec), if(labels = '', NULL, labels) "
            f"FROM {TABLE} FINAL WHERE {_where(shard, hours)} AND kind = 'resource' {_READ}"
        )

    def hour_digests(self, shard: int, hours: Sequence[dt.datetime]) -> dict[dt.datetime, tuple[int, str]]:
        """Per hour: how many events count, and a checksum of which (an XOR of their hashes)."""
        text = self._run(
            f"SELECT toUnixTimestamp(toStartOfHour(occurred_at)) AS h, count(), "
            f"hex(groupBitXor(cityHash64(account_id, event_id, precedence))) "
            f"FROM {TABLE} FINAL WHERE {_where(shard, hours)} GROUP BY h {_READ}"
        )
        out: dict[dt.datetime, tuple[int, str]] = {}
        for line in text.decode().splitlines():
            hour, count, checksum = line.split("\t")
            out[dt.datetime.fromtimestamp(int(hour), dt.UTC)] = (int(count), checksum)
        return out

    def counted_events(self) -> int:
        """Every event stored, counted once (``FINAL``): for tests and the soak's check."""
        return int(self._run(f"SELECT count() FROM {TABLE} FINAL {_READ}").strip() or 0)

    def stats(self) -> StoreStats:
        text = self._run(
            "SELECT sum(rows), sum(bytes_on_disk), uniqExactIf(partition, rows > 0) FROM system.parts "
            f"WHERE table = '{TABLE}' AND active AND database = currentDatabase()"
        ).decode()
        rows, size, partitions = (int(v or 0) for v in text.split("\t"))
        return StoreStats(rows=rows, bytes_on_disk=size, partitions=partitions)

    def optimize(self) -> None:
        """Merge every partition now (what background merges do eventually): for measuring
        the bytes an event takes once merged, never needed for correct answers."""
        self._run(f"OPTIMIZE TABLE {TABLE} FINAL")


def _scratch() -> str:
    """Where a block waits for the embedded engine to read it: memory-backed when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


_store: EventStore | None = None
_store_pid: int | None = None
_store_lock = threading.Lock()


def get_store() -> EventStore:
    """This process's event store (the embedded engine can be open in one process only)."""
    global _store, _store_pid
    with _store_lock:
        if _store is None or _store_pid != os.getpid():
            _store = EventStore(
                path=settings.METERING_CHDB_PATH,
                url=settings.METERING_CLICKHOUSE_URL or None,
                retention_days=settings.METERING_EVENT_RETENTION_DAYS,
            )
            _store_pid = os.getpid()
            log.info(
                "eventstore.opened",
                extra={"embedded": not settings.METERING_CLICKHOUSE_URL, "pid": _store_pid},
            )
        return _store


def close_store() -> None:
    global _store
    with _store_lock:
        if _store is not None:
            _store.close()
            _store = None
