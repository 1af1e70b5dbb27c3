"""Which events the rollup may take: the event writers' lock and the rollup's horizon.

Events are read by the id of the transaction that inserted them (``metering_usageevent.txid``;
``seq`` values are handed out before commit, in any order). A shard's run takes the events with
``horizon_old <= txid < horizon_new``, so ``horizon_new`` must be a txid below which no event
can still appear: every transaction below it that wrote events has ended, and its events are
visible to the statements that read them. Nothing outside the event writers may matter: a
transaction open in another database of the server (a ``pg_dump``, a report, another service,
another test run) must not stop the rollup.

**The lock.** One well-known advisory lock, ``EVENT_WRITERS_LOCK``, per database (PostgreSQL
scopes advisory locks to the current database, so other databases never see it):

* every writer of raw events takes it *shared*, transaction-level, as the first statement of
  its transaction, before anything assigns the transaction a txid (``writer_lock``; ingestion
  does, ``bench/rollup.py`` does). A database trigger on ``metering_usageevent`` (migration
  0011) backs this up: an insert into the event table takes the lock itself when its
  transaction has no txid yet, and is refused when its transaction already has one without
  holding the lock. So no transaction can write an event unless it held the lock since
  before its txid was assigned, and held it until it ended (transaction-level locks are
  released after the commit is visible, ``ProcArrayEndTransaction`` before lock release);
* the rollup takes it *exclusive*, session-level, only for a moment (``take_horizon``): it
  waits for the writers in flight (ingest transactions are short: one batch), reads
  ``pg_snapshot_xmax(pg_current_snapshot())`` in a statement of its own, and releases it.

**Why the horizon is safe.** While the rollup holds the exclusive lock no other transaction
holds the shared one. Take an event with ``txid < xmax``. Its transaction got its txid before
the rollup's snapshot (txids are handed out in increasing order, and ``xmax`` is at most the
next txid to be handed out), and it held the shared lock from before that moment until its
end; the rollup got the exclusive lock after that moment (its statement reading ``xmax``
came after the lock was granted), so the writer had already ended: committed or aborted.
Then:

* *visible*: the statements that read events start after this (READ COMMITTED, a snapshot
  per statement: the shard's run happens after ``take_horizon`` returned; ``take_horizon``
  refuses another isolation level, whose snapshot could predate the lock), so a committed
  event below the horizon is seen by them;
* *never skipped*: an event at or above the horizon is left for a later run, whose horizon is
  larger (``xmax`` never goes back, and a shard's stored horizon only moves forward);
* *never taken twice*: each run takes ``[horizon_old, horizon_new)`` and stores
  ``horizon_new`` in the same transaction;
* the xmax must be read in a statement *after* the one that took the lock: a statement's
  snapshot is taken when it starts, so ``SELECT pg_advisory_lock(k), pg_current_snapshot()``
  would read a snapshot from before the wait (tested: ``test_horizon.py``).

Transactions that never write events (in this database or any other) hold nothing back: they
are in the snapshot's in-progress list, not below a lock. The rollup's own transaction writes
no events; a caller that ingests and rolls up in one transaction (some tests) may see its own
uncommitted events below the horizon and take them, which is consistent: they stand or fall
with that same transaction.

**Fairness and ingest latency.** PostgreSQL queues a lock request behind conflicting waiters,
so the rollup's exclusive request is not starved by a stream of overlapping ingest
transactions, and ingest transactions that begin while it waits queue behind it: ingest pauses
for at most the time the batches already in flight need to commit, once per rollup run (one
horizon serves all 16 shards of a run; the drain runs a pass every few seconds). The rollup
first tries without waiting; it queues only when writers are in flight, and then for at most
``METERING_HORIZON_LOCK_TIMEOUT_SECONDS``. If a writer has been holding the lock longer than
that (a stuck writer: an ingest transaction that hangs, a session that took the lock and went
idle), the rollup does not queue at all, so ingestion never waits behind a rollup that waits
behind a stuck writer; that run takes no new events and ``rollup.horizon_hold`` names the
writer.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import OperationalError, connection, transaction

log = logging.getLogger(__name__)

# "meteringevents" as a number: the one key, in every database that has the metering tables.
EVENT_WRITERS_LOCK = 0x6D65746572696E67
# Set (transaction-locally) by whoever took the lock as a writer; the trigger checks it.
WRITER_FLAG = "metering.event_writer"

_LOCK_NOT_AVAILABLE = "55P03"


class EventWriterLockTooLate(RuntimeError):
    """A transaction asked for the event writers' lock after it had already been given a txid."""


def writer_lock() -> None:
    """Take the event writers' lock (shared, until the transaction ends). Call it as the first
    statement of every transaction that inserts raw events, inside that transaction."""
    if not connection.in_atomic_block:
        raise EventWriterLockTooLate("writer_lock() belongs inside the transaction that writes the events")
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pg_current_xact_id_if_assigned() IS NOT NULL, pg_advisory_xact_lock_shared(%s), "
            "set_config(%s, 'on', true)",
            [EVENT_WRITERS_LOCK, WRITER_FLAG],
        )
        (too_late, _, _) = cur.fetchone()
    # A test's enclosing transaction (pytest-django's ``db`` fixture) has usually written
    # already: its events carry that txid, and no rollup outside it can see them anyway.
    if too_late and not any(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks):
        raise EventWriterLockTooLate(
            "this transaction wrote before taking the event writers' lock: take it first (metering.horizon)"
        )


def _oldest_writer_age() -> float | None:
    """How long the oldest transaction holding the writers' lock has been open (seconds)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT max(extract(epoch FROM clock_timestamp() - a.xact_start))::float8 "
            "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = "
            "current_database()) AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1 AND l.granted "
            "AND l.pid <> pg_backend_pid()",
            [EVENT_WRITERS_LOCK >> 32, EVENT_WRITERS_LOCK & 0xFFFFFFFF],
        )
        row = cur.fetchone()
    return None if row is None else row[0]


def take_horizon(*, timeout_seconds: float | None = None) -> int | None:
    """The txid below which every event writer has ended (see the module docstring), or None
    when the writers' lock could not be had in ``timeout_seconds`` (default
    ``METERING_HORIZON_LOCK_TIMEOUT_SECONDS``) or a writer has held it longer than that."""
    timeout = settings.METERING_HORIZON_LOCK_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
    try:
        # Its own transaction (a savepoint inside a caller's), so that a lock timeout rolls
        # back cleanly and the lock_timeout setting ends with it. It writes nothing: no txid.
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(
                "SELECT current_setting('transaction_isolation'), current_setting('lock_timeout'), "
                "pg_try_advisory_lock(%s)",
                [EVENT_WRITERS_LOCK],
            )
            isolation, previous_timeout, locked = cur.fetchone()
            if isolation != "read committed":
                if locked:
                    cur.execute("SELECT pg_advisory_unlock(%s)", [EVENT_WRITERS_LOCK])
                raise RuntimeError(f"the rollup's horizon needs READ COMMITTED, not {isolation}")
            if not locked:
                age = _oldest_writer_age()
                if age is not None and age > timeout:
                    log.info("rollup.horizon_writer_stuck", extra={"writer_age_s": round(age, 1)})
                    return None
                cur.execute("SELECT set_config('lock_timeout', %s, true)", [f"{max(1, int(timeout * 1000))}ms"])
                cur.execute("SELECT pg_advisory_lock(%s)", [EVENT_WRITERS_LOCK])
                cur.execute("SELECT set_config('lock_timeout', %s, true)", [previous_timeout])
            try:
                # A statement of its own: its snapshot is taken now, after the lock was granted.
                cur.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
                (horizon,) = cur.fetchone()
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", [EVENT_WRITERS_LOCK])
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        log.info("rollup.horizon_lock_timeout", extra={"timeout_s": timeout})
        return None
    return int(horizon)
