"""The front door of the data plane: ``POST /api/v1/usage/events``, exactly once, fast.

One request is one batch of up to 10,000 events:

0. a byte-identical resend of a batch that went in cleanly (the client timed out and
   retries) is recognised by its SHA-256 and answered "all duplicates" from one indexed
   read (``IngestBatch``), without decoding it or touching the event table;
1. msgspec decodes and shape-checks the whole batch in one C call; only if that fails is
   it decoded event by event, to name each bad one (good events are still accepted);
2. one Python pass applies the rules a schema cannot say (type-specific fields, the
   acceptance window, SKU kinds), and one query checks every account in the batch;
3. the good events go to a session-private staging table with COPY, and one
   ``INSERT … SELECT … ON CONFLICT DO NOTHING`` moves them into the partitioned event table.
   The primary key ``(account_id, event_id)`` is the exactly-once guarantee: concurrent
   requests carrying the same events wait on each other's index entries, and only one
   insert wins;
4. only when fewer rows went in than were staged does a second set-based query compare
   the staged events with the stored ones: same content → duplicate, else → conflict.

The transaction takes the event writers' lock (shared) as its first statement, which is
what lets the rollup know when every event below its horizon has been committed
(``metering.horizon``). The transaction commits before the response is written: a 200 means
every accepted event is durable. No per-event ORM saves, serializers or queries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from django.conf import settings
from django.db import OperationalError, connection, transaction

from accounts import selectors as account_selectors
from billing_site.common import ids
from billing_site.common.copy import BulkTable
from billing_site.common.logs import ms_since
from metering import horizon, instruments, selectors, sharding
from metering.models import IngestBatch

log = logging.getLogger(__name__)

MAX_EVENTS = 10_000
MAX_BODY_BYTES = 10 * 1024 * 1024
FUTURE_TOLERANCE = dt.timedelta(minutes=5)
# The one grammar of a quantity (and of a spec's units): a decimal string of ASCII digits,
# at most 12 before the point and 12 after it — no sign, exponent, spaces, underscores or
# other scripts' digits, and no JSON numbers (many producers' JSON libraries turn them into
# binary floats). The API schema documents the same pattern.
QUANTITY_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,12})?$"
_QUANTITY_HELP = 'a decimal string of up to 12 digits, optionally a point and up to 12 more (e.g. "1.25")'
# Smaller batches are not fingerprinted: one row per tiny batch costs more than it saves.
FINGERPRINT_MIN_EVENTS = 50

NoNul = msgspec.Meta(pattern="^[^\\x00]*$")  # PostgreSQL text cannot hold NUL
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128), NoNul]
ResourceId = Annotated[str, msgspec.Meta(min_length=1, max_length=256), NoNul]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64), NoNul]
LabelValue = Annotated[str, msgspec.Meta(max_length=256), NoNul]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=16)]
# msgspec matches with re.search: "$" would let a trailing newline through, "\Z" does not.
Quantity = Annotated[str, msgspec.Meta(pattern=QUANTITY_PATTERN.removesuffix("$") + "\\Z")]


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    id: EventId
    account_id: str
    time: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    type: Literal["usage", "resource"]
    sku: str | None = None
    quantity: Quantity | None = None
    resource_id: ResourceId | None = None
    action: Literal["start", "update", "stop"] | None = None
    spec: dict[str, Quantity] | None = None
    labels: Labels | None = None


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    events: list[EventIn]


class LooseBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    events: list[msgspec.Raw]


class LooseEventId(msgspec.Struct):
    id: Any = None


_batch_decoder = msgspec.json.Decoder(BatchIn)
_loose_decoder = msgspec.json.Decoder(LooseBatchIn)
_event_decoder = msgspec.json.Decoder(EventIn)
_id_decoder = msgspec.json.Decoder(LooseEventId)
# Sorted keys: one spelling per meaning, so the event store's content hash of a resend whose
# producer ordered the labels differently is the same (PostgreSQL's jsonb does not care).
_json = msgspec.json.Encoder(decimal_format="number", order="sorted")


class BatchError(Exception):
    """The request as a whole is unusable (not JSON, not a batch, too large)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class Rejection:
    index: int
    id: str | None
    code: str
    message: str


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [r.__dict__ for r in sorted(self.rejected, key=lambda r: r.index)],
        }


def _field_message(exc: msgspec.ValidationError) -> str:
    """msgspec says "Expected `str` of length <= 128 - at `$.id`": name the field first."""
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        return text
    name = path.rstrip("`").removeprefix("$").lstrip(".") or "event"
    if name == "quantity":
        return f"quantity: must be {_QUANTITY_HELP}"
    if name == "spec[...]":  # msgspec does not say which key
        return f"spec: each SKU's units must be {_QUANTITY_HELP}"
    return f"{name}: {message}"


def decode_batch(body: bytes) -> list[EventIn | Rejection]:
    """Every event decoded, or a ``Rejection`` in its place naming the bad field."""
    if len(body) > MAX_BODY_BYTES:
        raise BatchError(413, "payload_too_large", f"A batch is at most {MAX_BODY_BYTES} bytes.")
    try:
        return list(_batch_decoder.decode(body).events)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass  # malformed JSON, bad UTF-8 or a shape error somewhere: find out below
    try:
        loose = _loose_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BatchError(400, "invalid", f'Send {{"events": [...]}}: {exc}', field="events") from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BatchError(400, "malformed_request", f"The body is not valid JSON: {exc}") from exc
    out: list[EventIn | Rejection] = []
    for index, raw in enumerate(loose.events):
        try:
            out.append(_event_decoder.decode(raw))
        except UnicodeDecodeError:
            out.append(Rejection(index, None, "invalid", "event: not valid UTF-8"))
        except msgspec.ValidationError as exc:
            try:
                event_id = _id_decoder.decode(raw).id
            except msgspec.MsgspecError:
                event_id = None
            out.append(
                Rejection(index, event_id if isinstance(event_id, str) else None, "invalid", _field_message(exc))
            )
    return out


_WRONG_KIND = {
    "quantity": "is a duration SKU; usage events take quantity SKUs",
    "duration": "is a quantity SKU, not a duration one",
}


def _sku_error(kinds: dict[str, str], code: str, wanted: str, field: str) -> str | None:
    """Why ``code`` is not a SKU of kind ``wanted`` (a miss re-reads the catalog once: it may
    have just been loaded), or None."""
    kind = kinds.get(code) or selectors.sku_kinds(refresh=True).get(code)
    if kind == wanted:
        return None
    return f"{field}: {code} {'is not in the catalog' if kind is None else _WRONG_KIND[wanted]}"


class Row(NamedTuple):
    """One accepted event, as it is staged and stored (``idx``: its place in the batch)."""

    idx: int
    account_id: int
    event_id: str
    occurred_at: dt.datetime
    kind: str
    sku: str | None
    quantity: Decimal | None
    resource_id: str | None
    action: str | None
    spec: str | None  # JSON
    labels: str | None  # JSON


# The staging table and the event table, described once: each ``Row`` field's PostgreSQL type.
_STAGED = BulkTable(
    "metering_ingest_staging",
    Row,
    {
        "idx": "int",
        "account_id": "bigint",
        "event_id": "text",
        "occurred_at": "timestamptz",
        "kind": "text",
        "sku": "text",
        "quantity": "numeric",
        "resource_id": "text",
        "action": "text",
        "spec": "jsonb",
        "labels": "jsonb",
    },
)
# States whose accepted usage is counted (``InactiveAccountUsage``); closed accounts refuse it.
_COUNTED_STATES = frozenset({"pending", "suspended", "blocked"})


def check_events(
    decoded: list[EventIn | Rejection], *, now: dt.datetime
) -> tuple[list[Row], list[Rejection], dict[int, str]]:
    """The rules a schema cannot say, in one pass; then one query for the accounts. Returns
    the good rows, the rejections, and the accounts among the rows that are not active
    (pending, suspended, blocked: their usage is accepted and counted) with their state."""
    max_age = dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)
    oldest, newest = now - max_age, now + FUTURE_TOLERANCE
    kinds = selectors.sku_kinds()
    rows: list[Row] = []
    rejected: list[Rejection] = []

    def reject(index: int, event: EventIn, code: str, message: str) -> None:
        rejected.append(Rejection(index, event.id, code, message))

    account_ids: dict[str, int | None] = {}  # a batch names few accounts many times
    for index, event in enumerate(decoded):
        if isinstance(event, Rejection):
            rejected.append(event)
            continue
        account_id = account_ids.get(event.account_id, -1)
        if account_id == -1:
            account_id = account_ids[event.account_id] = ids.decode("acc", event.account_id)
        if account_id is None:
            reject(index, event, "invalid", "account_id: not a billing account id (acc_…)")
            continue
        try:
            occurred_at = event.time.astimezone(dt.UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
            reject(index, event, "invalid", "time: out of range")
            continue
        spec_json: str | None = None
        if event.type == "usage":
            if event.sku is None or event.quantity is None:
                reject(index, event, "invalid", "sku and quantity: both required for a usage event")
                continue
            if event.action is not None or event.spec is not None:
                reject(index, event, "invalid", "action and spec: only for resource events")
                continue
            quantity = Decimal(event.quantity)  # the pattern admits nothing Decimal could refuse
            # The usual case inline (a call per event is ~15% of a 10,000-event batch's checks).
            problem = None if kinds.get(event.sku) == "quantity" else _sku_error(kinds, event.sku, "quantity", "sku")
            if problem:
                reject(index, event, "unknown_sku", problem)
                continue
        else:
            if event.resource_id is None or event.action is None:
                reject(index, event, "invalid", "resource_id and action: both required for a resource event")
                continue
            if event.sku is not None or event.quantity is not None:
                reject(index, event, "invalid", "sku and quantity: only for usage events")
                continue
            if event.spec is None and event.action != "stop":
                reject(index, event, "invalid", f"spec: required for {event.action}")
                continue
            quantity = None
            if event.spec is not None:
                problem = None
                for code in event.spec:
                    problem = _sku_error(kinds, code, "duration", f"spec.{code}")
                    if problem:
                        reject(index, event, "unknown_sku", problem)
                        break
                if problem:
                    continue
                # Stored as JSON numbers, exactly as written (the rollup reads them as numeric).
                spec_json = _json.encode({code: Decimal(units) for code, units in event.spec.items()}).decode()
        if occurred_at < oldest:
            reject(index, event, "too_old", f"time: older than the {max_age.days}-day acceptance window")
            continue
        if occurred_at > newest:
            reject(index, event, "in_future", "time: more than 5 minutes in the future")
            continue
        # No labels and {} are the same content (else a resend spelled differently conflicts).
        labels_json = _json.encode(event.labels).decode() if event.labels else None
        rows.append(
            Row(
                idx=index,
                account_id=account_id,
                event_id=event.id,
                occurred_at=occurred_at,
                kind=event.type,
                sku=event.sku,
                quantity=quantity,
                resource_id=event.resource_id,
                action=event.action,
                spec=spec_json,
                labels=labels_json,
            )
        )

    standings = account_selectors.billing_account_standings({row.account_id for row in rows})
    kept: list[Row] = []
    for row in rows:
        standing = standings.get(row.account_id)
        if standing is None:
            rejected.append(
                Rejection(
                    row.idx,
                    row.event_id,
                    "unknown_account",
                    f"account_id: no billing account {ids.encode('acc', row.account_id)}",
                )
            )
        elif standing.closed_at is not None and row.occurred_at >= standing.closed_at:
            rejected.append(
                Rejection(
                    row.idx,
                    row.event_id,
                    "account_closed",
                    f"time: {ids.encode('acc', row.account_id)} was closed at {standing.closed_at:%Y-%m-%dT%H:%M:%SZ};"
                    " usage after its closure is not accepted",
                )
            )
        else:
            kept.append(row)
    inactive = {a: s.state for a, s in standings.items() if s.state in _COUNTED_STATES}
    return kept, rejected, inactive


_COLUMNS = ", ".join(name for name in _STAGED.columns if name != "idx")  # the event table's columns
_STAGING = f"""
CREATE TEMP TABLE IF NOT EXISTS metering_ingest_staging (
    {", ".join(f"{name} {kind}" for name, kind in _STAGED.types.items())}
) ON COMMIT DELETE ROWS
"""
_INSERT = f"""
INSERT INTO metering_usageevent ({_COLUMNS})
SELECT {_COLUMNS} FROM metering_ingest_staging ORDER BY account_id, event_id, idx
ON CONFLICT (account_id, event_id) DO NOTHING
"""  # noqa: S608 (constants only)
# The same, when the batch names an inactive account: how many went in per account (only a
# few rows travel back), to count them. Batches of active accounts skip the aggregation.
_INSERT_COUNTED = f"""
WITH inserted AS ({_INSERT} RETURNING account_id)
SELECT account_id, count(*) FROM inserted GROUP BY account_id ORDER BY account_id
"""  # noqa: S608 (constants only)
# Appended, never upserted: a shared counter row per account would make concurrent batches
# of one busy account wait on each other's row lock until commit.
_COUNT_INACTIVE = """
INSERT INTO metering_inactiveaccountusage (account_id, account_state, events, received_at)
SELECT a, s, n, now() FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS c(a, s, n)
"""
# Staged events whose stored twin differs: conflicts. Nested loops over the primary key
# (pruned to one partition per probe), never a scan of the event table.
_CONFLICTS = """
SELECT s.idx, s.event_id
FROM metering_ingest_staging s
JOIN metering_usageevent e ON e.account_id = s.account_id AND e.event_id = s.event_id
WHERE (e.occurred_at, e.kind, e.sku, e.quantity, e.resource_id, e.action, e.spec, e.labels)
      IS DISTINCT FROM
      (s.occurred_at, s.kind, s.sku, s.quantity, s.resource_id, s.action, s.spec, s.labels)
"""


def store(
    rows: list[Row], *, fingerprint: str | None, inactive: dict[int, str] | None = None
) -> tuple[int, list[tuple[int, str]]]:
    """``_store`` once more if PostgreSQL broke a deadlock by aborting ours (it rolled back
    whole, so the retry starts clean). Inserting in key order makes that rare; two batches
    holding the same events still wait on each other's index entries in one order."""
    try:
        return _store(rows, fingerprint=fingerprint, inactive=inactive or {})
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) not in ("40P01", "40001"):
            raise
        return _store(rows, fingerprint=fingerprint, inactive=inactive or {})


def _store(rows: list[Row], *, fingerprint: str | None, inactive: dict[int, str]) -> tuple[int, list[tuple[int, str]]]:
    """COPY into staging, one insert that dedupes; returns (inserted, conflicts).

    With a ``fingerprint`` (the batch had no rejected event), it is recorded in the same
    transaction when no conflict turns up either. Newly stored events of ``inactive``
    accounts are counted by account and state in the same transaction."""
    count = len(rows)
    with transaction.atomic(durable=True), connection.cursor() as cursor:
        horizon.writer_lock()  # first, before anything gives this transaction a txid
        cursor.execute(_STAGING)
        _STAGED.copy(rows)
        counted: list[tuple[int, str, int]] = []
        if inactive:
            cursor.execute(_INSERT_COUNTED)
            per_account: list[tuple[int, int]] = cursor.fetchall()
            inserted = sum(n for _, n in per_account)
            counted = [(a, inactive[a], n) for a, n in per_account if a in inactive]
        else:
            cursor.execute(_INSERT)
            inserted = cursor.rowcount
        if counted:
            cursor.execute(
                _COUNT_INACTIVE, [[a for a, _, _ in counted], [s for _, s, _ in counted], [n for *_, n in counted]]
            )
        conflicts: list[tuple[int, str]] = []
        if inserted < count:
            cursor.execute("SET LOCAL enable_hashjoin = off")
            cursor.execute("SET LOCAL enable_mergejoin = off")
            cursor.execute(_CONFLICTS)
            conflicts = cursor.fetchall()
        if fingerprint is not None and not conflicts and count >= FINGERPRINT_MIN_EVENTS:
            cursor.execute(
                "INSERT INTO metering_ingestbatch (digest, events, oldest_event_at, received_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT DO NOTHING",
                [fingerprint, count, min(row.occurred_at for row in rows)],
            )
    return inserted, conflicts


class LogHead(msgspec.Struct):
    """The first line of a log message: each account's shard, and the hours of each shard the
    events fall in. Then one line per event: the ``Row`` as a JSON array (msgspec encodes it in
    C, with no Python object per event; ``metering.eventstore.LINE_SCHEMA`` reads it)."""

    shards: dict[int, int]  # account id -> shard
    hours: list[tuple[int, int]]  # (shard, hour as seconds since the epoch)


_lines = msgspec.json.Encoder()
_head_decoder = msgspec.json.Decoder(LogHead)


def encode_for_log(rows: list[Row]) -> bytes:
    """The log message of a batch's accepted events: a ``LogHead`` line, then one line each."""
    shards = {account: sharding.shard_of(account) for account in {row.account_id for row in rows}}
    hours = {(row.account_id, row.occurred_at.replace(minute=0, second=0, microsecond=0)) for row in rows}
    head = LogHead(shards=shards, hours=sorted({(shards[account], int(hour.timestamp())) for account, hour in hours}))
    return _lines.encode(head) + b"\n" + _lines.encode_lines(rows)


def decode_log_head(head: bytes) -> LogHead:
    return _head_decoder.decode(head)


def log_head_hours(head: LogHead) -> list[tuple[int, dt.datetime]]:
    return [(shard, dt.datetime.fromtimestamp(hour, dt.UTC)) for shard, hour in head.hours]


def publish(rows: list[Row], *, fingerprint: str | None, inactive: dict[int, str] | None = None) -> tuple[int, int]:
    """The scale path's store: one log message for the batch's accepted events, identified by
    the SHA-256 of its content (the log drops a copy inside its duplicate window), answered
    only once the log acknowledged it (``eventlog.LogUnavailable`` otherwise: the API says
    503). Returns (accepted, duplicates). The batch's fingerprint and the inactive accounts'
    counts are written after the acknowledgement."""
    from metering import eventlog

    payload = encode_for_log(rows)
    published = eventlog.publish(payload, msg_id=hashlib.sha256(payload).hexdigest())
    with transaction.atomic(), connection.cursor() as cursor:
        counts: dict[int, int] = {}
        for row in rows:
            if inactive and row.account_id in inactive and not published.duplicate:
                counts[row.account_id] = counts.get(row.account_id, 0) + 1
        if counts:
            accounts = sorted(counts)
            cursor.execute(_COUNT_INACTIVE, [accounts, [inactive[a] for a in accounts], [counts[a] for a in accounts]])  # type: ignore[index]
        # Also when the log answers "duplicate": the first send was acknowledged, and whoever
        # sent it may have died before writing this (an API killed between the two), so a
        # byte-identical resend after the log's duplicate window is still answered from here.
        if fingerprint is not None and len(rows) >= FINGERPRINT_MIN_EVENTS:
            cursor.execute(
                "INSERT INTO metering_ingestbatch (digest, events, oldest_event_at, received_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT DO NOTHING",
                [fingerprint, len(rows), min(row.occurred_at for row in rows)],
            )
    return (0, len(rows)) if published.duplicate else (len(rows), 0)


def _replayed(digest: str, now: dt.datetime) -> IngestResult | None:
    """The answer for a byte-identical resend of a clean batch, if this is one."""
    oldest = now - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)
    known = IngestBatch.objects.filter(digest=digest, oldest_event_at__gte=oldest).values_list("events", flat=True)
    events = next(iter(known), None)
    return None if events is None else IngestResult(duplicates=events)


def ingest(body: bytes, *, now: dt.datetime | None = None) -> IngestResult:
    """One batch: stored (or published to the log) and answered; counted for /metrics."""
    started = time.monotonic()
    try:
        result = _ingest(body, now=now, started=started)
    except BatchError as exc:
        instruments.batch_refused(code=exc.code, seconds=time.monotonic() - started)
        raise
    except Exception as exc:
        from metering import eventlog  # already imported when it is what raised (the scale path)

        if isinstance(exc, eventlog.LogUnavailable):
            instruments.batch_refused(code="log_unavailable", seconds=time.monotonic() - started)
        raise
    instruments.batch_done(
        accepted=result.accepted,
        duplicates=result.duplicates,
        rejected_codes=[r.code for r in result.rejected],
        seconds=time.monotonic() - started,
    )
    return result


def _ingest(body: bytes, *, now: dt.datetime | None, started: float) -> IngestResult:
    now = now or dt.datetime.now(dt.UTC)
    if len(body) > MAX_BODY_BYTES:
        raise BatchError(413, "payload_too_large", f"A batch is at most {MAX_BODY_BYTES} bytes.")
    digest = hashlib.sha256(body).hexdigest()
    replayed = _replayed(digest, now)
    if replayed is not None:
        return replayed
    decoded = decode_batch(body)
    if len(decoded) > MAX_EVENTS:
        raise BatchError(413, "payload_too_large", f"A batch is at most {MAX_EVENTS} events; got {len(decoded)}.")
    rows, rejected, inactive = check_events(decoded, now=now)
    result = IngestResult(rejected=rejected)
    if rows and settings.METERING_EVENT_STORE == "clickhouse":
        result.accepted, result.duplicates = publish(rows, fingerprint=None if rejected else digest, inactive=inactive)
    elif rows:
        inserted, conflicts = store(rows, fingerprint=None if rejected else digest, inactive=inactive)
        result.accepted = inserted
        result.duplicates = len(rows) - inserted - len(conflicts)
        result.rejected.extend(
            Rejection(idx, event_id, "conflict", "id: already accepted with different content")
            for idx, event_id in conflicts
        )
    log.info(
        "ingest.batch",
        extra={
            "events": len(decoded),
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "rejected": len(result.rejected),
            "duration_ms": ms_since(started),
        },
    )
    return result
