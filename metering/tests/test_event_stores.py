"""The two event stores give the same hourly usage for the same events.

The single-machine default keeps raw events in PostgreSQL; the scale path keeps them in
ClickHouse (chdb here) and computes hourly usage per hour and shard from there
(``metering.hours``). Whatever the events (usage with labels in any key order, lifecycles with
late and out-of-order events), however they are cut into batches and resent (byte-identical,
re-batched, interleaved with rollups), both paths must leave the same hourly rows — quantity,
amount, running total, exact unit-seconds — the same days, months and resource states, to the
last decimal place. These tests commit for real: the rollup reads committed events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import time_machine
from django.db import connection
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import BillingAccount
from metering import eventstore, hours, ingest, rollup, sink
from metering.models import HourManifest
from metering.tests.support import used

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)
BASE = dt.datetime(2026, 11, 1, 22, 0, tzinfo=dt.UTC)  # across a day and a month's end... and hours


def _store_batch(events: list[dict[str, Any]]) -> None:
    """What the API and a sink do on the scale path, without the log in between: the batch's
    accepted events encoded as the log carries them, inserted, their hours marked."""
    body = json.dumps({"events": events}).encode()
    rows, rejected, _ = ingest.check_events(ingest.decode_batch(body), now=NOW)
    assert not rejected, rejected
    payload = ingest.encode_for_log(rows)
    sink.store_messages([payload], token=hashlib.sha256(payload).hexdigest()[:32])


def _pg_batch(events: list[dict[str, Any]]) -> None:
    body = json.dumps({"events": events}).encode()
    result = ingest.ingest(body, now=NOW)
    assert not result.rejected, result.as_dict()


def _snapshot(account: BillingAccount) -> dict[str, Any]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT hour, sku, resource_id, labels::text, quantity, amount, cum_quantity, unit_seconds "
            "FROM metering_hourlyusage WHERE account_id = %s ORDER BY 1, 2, 3, 4",
            [account.id],
        )
        hourly = cur.fetchall()
        cur.execute(
            "SELECT day, sku, resource_id, labels::text, quantity, amount FROM metering_dailyusage "
            "WHERE account_id = %s ORDER BY 1, 2, 3, 4",
            [account.id],
        )
        daily = cur.fetchall()
        cur.execute(
            "SELECT month, amount FROM metering_monthlyspend WHERE account_id = %s ORDER BY 1",
            [account.id],
        )
        monthly = cur.fetchall()
        cur.execute(
            "SELECT resource_id, running, since, spec::text, labels::text, last_event_at, events, "
            "start_while_running, stop_while_stopped, update_while_stopped "
            "FROM metering_resourcestate WHERE account_id = %s ORDER BY 1",
            [account.id],
        )
        states = cur.fetchall()
    return {"hourly": hourly, "daily": daily, "monthly": monthly, "states": states}


def _roll(account: BillingAccount) -> None:
    rollup.rollup(now=NOW, shards=[rollup.shard_of(account.id)])


# --- The events: usage and lifecycles, with the producer's freedom (key order, batches, resends).

_usage = st.builds(
    lambda minute, sku, quantity, resource, labels: {
        "type": "usage",
        "minute": minute,
        "sku": sku,
        "quantity": quantity,
        "resource_id": resource,
        "labels": labels,
    },
    st.integers(0, 60 * 30),
    st.sampled_from(["network.egress", "storage.object.requests"]),
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from([None, "vm-1", "bucket-a"]),
    st.sampled_from([None, {"project": "ml", "env": "prod"}, {"env": "prod", "project": "ml"}, {"team": "x"}]),
)
_lifecycle = st.builds(
    lambda minute, action, units, resource: {
        "type": "resource",
        "minute": minute,
        "action": action,
        "units": units,
        "resource_id": resource,
    },
    st.integers(0, 60 * 30),
    st.sampled_from(["start", "update", "stop"]),
    st.integers(0, 16),
    st.sampled_from(["vm-1", "vm-2"]),
)


def _event(account: BillingAccount, index: int, spec: dict[str, Any]) -> dict[str, Any]:
    moment = (BASE + dt.timedelta(minutes=spec["minute"])).isoformat()
    event: dict[str, Any] = {"id": f"e{index}", "account_id": account.public_id, "time": moment, "type": spec["type"]}
    if spec["type"] == "usage":
        event |= {"sku": spec["sku"], "quantity": spec["quantity"]}
        if spec["resource_id"]:
            event["resource_id"] = spec["resource_id"]
        if spec["labels"]:
            event["labels"] = spec["labels"]
    else:
        event |= {"resource_id": spec["resource_id"], "action": spec["action"]}
        if spec["action"] != "stop":
            event["spec"] = {"compute.vcpu": str(spec["units"])}
    return event


def _cut(events: list[dict[str, Any]], cuts: list[int]) -> list[list[dict[str, Any]]]:
    bounds = [0, *sorted(cuts), len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(
    max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=bool(os.environ.get("CI"))
)
@given(specs=st.lists(st.one_of(_usage, _lifecycle), min_size=1, max_size=24), data=st.data())
def test_both_event_stores_give_identical_hourly_usage(
    specs: list[dict[str, Any]],
    data: st.DataObject,
    catalog: None,
    make_customer: Callable,
    make_account: Callable,
    event_store: eventstore.EventStore,
) -> None:
    owner = make_customer()
    on_postgres, on_clickhouse = make_account(owner.user), make_account(owner.user)
    with time_machine.travel(NOW, tick=False):
        # The single-machine path: in order, one batch, one rollup.
        _pg_batch([_event(on_postgres, i, spec) for i, spec in enumerate(specs)])
        _roll(on_postgres)

        # The scale path: shuffled, cut into batches, some batches resent whole or re-cut,
        # rollups in between.
        events = data.draw(st.permutations([_event(on_clickhouse, i, spec) for i, spec in enumerate(specs)]))
        batches = _cut(events, data.draw(st.lists(st.integers(0, len(events)), max_size=3)))
        resent = _cut(events, data.draw(st.lists(st.integers(0, len(events)), max_size=3)))
        with override_settings(METERING_EVENT_STORE="clickhouse"):
            for batch in batches:
                _store_batch(batch)
                if data.draw(st.booleans()):
                    _roll(on_clickhouse)
            for batch in resent if data.draw(st.booleans()) else []:
                _store_batch(batch)
            _roll(on_clickhouse)
            _roll(on_clickhouse)  # nothing left: the same rows

    assert _snapshot(on_clickhouse) == _snapshot(on_postgres)


@pytest.mark.clock(NOW)
def test_a_late_event_recomputes_its_hour_and_the_manifest_says_what_was_counted(
    usage_account: BillingAccount, event_store: eventstore.EventStore
) -> None:
    account = usage_account
    shard = rollup.shard_of(account.id)

    def usage(event_id: str, minute: int, quantity: str) -> dict[str, Any]:
        return used(account, event_id, BASE + dt.timedelta(minutes=minute), quantity)

    with override_settings(METERING_EVENT_STORE="clickhouse"):
        _store_batch([usage("a", 5, "1.5"), usage("b", 65, "2")])
        _store_batch([usage("a", 5, "1.5")])  # a resend in another batch
        _roll(account)
        first = {m.hour: (m.events, m.usage_rows) for m in HourManifest.objects.filter(shard=shard)}
        assert first == {BASE: (1, 1), BASE + dt.timedelta(hours=1): (1, 1)}

        _store_batch([usage("c", 10, "0.25")])  # late, into the first hour
        report = rollup.rollup(now=NOW, shards=[shard])
        assert report.events == 2  # only the dirty hour was read again
        manifest = HourManifest.objects.get(shard=shard, hour=BASE)
        assert (manifest.events, manifest.usage_rows) == (2, 1)
        with connection.cursor() as cur:
            cur.execute(
                "SELECT hour, quantity FROM metering_hourlyusage WHERE account_id = %s ORDER BY hour", [account.id]
            )
            assert cur.fetchall() == [(BASE, Decimal("1.750000000000")), (BASE + dt.timedelta(hours=1), Decimal(2))]
        assert rollup.rollup(now=NOW, shards=[shard]).events == 0  # nothing dirty: nothing read
        assert hours.dirty_hours(connection.cursor(), shard, 10) == []
        assert event_store.counted_events() == 3


def test_the_log_line_carries_every_field_the_event_store_needs() -> None:
    row = ingest.Row(
        idx=0,
        account_id=42,
        event_id="e-1",
        occurred_at=dt.datetime(2026, 11, 1, 22, 15, 0, 250, tzinfo=dt.UTC),
        kind="usage",
        sku="network.egress",
        quantity=Decimal("1.000000000001"),
        resource_id=None,
        action=None,
        spec=None,
        labels='{"a":"1","b":"2"}',
    )
    head, _, body = ingest.encode_for_log([row]).partition(b"\n")
    decoded = ingest.decode_log_head(head)
    assert decoded.shards == {42: rollup.shard_of(42)}
    assert ingest.log_head_hours(decoded) == [(rollup.shard_of(42), dt.datetime(2026, 11, 1, 22, tzinfo=dt.UTC))]
    assert msgspec.json.decode(body) == [
        0,
        42,
        "e-1",
        "2026-11-01T22:15:00.000250Z",
        "usage",
        "network.egress",
        "1.000000000001",
        None,
        None,
        None,
        '{"a":"1","b":"2"}',
    ]


def test_the_cluster_ddl_is_clickhouse_sql_from_the_same_table_description(event_store: eventstore.EventStore) -> None:
    """No ClickHouse server runs here: the cluster's statements are at least parsed by the same
    engine (26.9) that runs the embedded table, and carry its columns, key and TTL."""
    statements = eventstore.cluster_ddl(cluster="billing_cluster", database="billing", retention_days=100)
    for statement in statements:
        assert event_store._run(f"EXPLAIN AST {statement}").startswith(b"CreateQuery")
    replicated = statements[1]
    assert "ReplicatedReplacingMergeTree" in replicated and eventstore.SORTING_KEY in replicated
    assert all(f"{name} {kind}" in replicated for name, kind in eventstore.COLUMNS)
    assert "Distributed(billing_cluster, billing, usage_events_local, shard)" in statements[2]


def test_events_past_retention_leave_the_event_store_a_whole_day_at_a_time(event_store: eventstore.EventStore) -> None:
    """The TTL drops a day's partition once all of it is past retention (by the real clock:
    the engine's, which no test freezes: the moments are taken from it, not from Python's
    clock, which a test session may have moved)."""
    today = dt.datetime.fromtimestamp(int(event_store._run("SELECT toUnixTimestamp(now())")), dt.UTC)

    def line(event_id: str, moment: dt.datetime) -> bytes:
        return (
            msgspec.json.encode([0, 1, event_id, moment, "usage", "network.egress", "1", None, None, None, None])
            + b"\n"
        )

    expired = today - dt.timedelta(days=settings_retention() + 2)
    kept = today - dt.timedelta(days=settings_retention() - 2)
    event_store.insert_lines(
        line("old", expired) + line("kept", kept) + line("new", today), token="retention-test", shards={1: 0}
    )
    event_store._run(f"ALTER TABLE {eventstore.TABLE} MATERIALIZE TTL")
    event_store.optimize()
    assert event_store._run("SELECT event_id FROM usage_events FINAL ORDER BY event_id") == b"kept\nnew\n"
    assert event_store.stats().partitions == 2  # the expired day is gone whole, not emptied row by row


def settings_retention() -> int:
    from django.conf import settings as django_settings

    return int(django_settings.METERING_EVENT_RETENTION_DAYS)


def test_an_event_of_an_account_without_a_shard_is_refused_with_its_whole_block(
    event_store: eventstore.EventStore,
) -> None:
    line = msgspec.json.encode([0, 7, "e", NOW, "usage", "network.egress", "1", None, None, None, None]) + b"\n"
    with pytest.raises(Exception, match="known_shard"):
        event_store.insert_lines(line, token="no-shard", shards={8: 1})
    assert event_store.counted_events() == 0
