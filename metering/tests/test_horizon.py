"""The rollup's horizon depends only on writers of events (``metering/horizon.py``).

A transaction open in another database of the same server, or one in this database that
writes no events, holds nothing back: the rollup takes every committed event, exactly once.
A writer of events that is stuck with the event writers' lock taken does hold new events
back: the rollup says so, naming the backend, instead of a bare "0 events", and catches up
once it ends. A writer in flight when the rollup starts is waited for, and its events are
taken by that very run.

Second connections (psycopg, not Django's) play the other applications; the tests commit for
real (``transaction=True``), as the rollup only takes events of finished transactions.

(Until issue 19 the horizon was the cluster-wide snapshot xmin, and the first tests here
asserted that any transaction with a txid, in any database, held the rollup back and was
named. That was the defect; they now assert the opposite, and the naming moved to a stuck
writer of events, the only thing that can still hold the rollup back.)"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from io import StringIO
from typing import Any

import psycopg
import pytest
import time_machine
from django.core.management import call_command
from django.db import connection, transaction
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from billing_site.common.logs import fields_of
from conftest import wait_for
from metering import horizon, rollup
from metering.models import HourlyUsage

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)


def connect(dbname: str, application_name: str) -> psycopg.Connection[Any]:
    params = connection.settings_dict
    return psycopg.connect(
        dbname=dbname,
        user=params["USER"] or None,
        password=params["PASSWORD"] or None,
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        application_name=application_name,
    )


@pytest.fixture
def other_session() -> Iterator[psycopg.Connection[Any]]:
    """A session of its own on the test database, as another application would have."""
    conn = connect(connection.settings_dict["NAME"], "forgotten-writer")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def other_database() -> Iterator[psycopg.Connection[Any]]:
    """A session on another database of the same server (created for the test, dropped after),
    as another service, a report or a pg_dump would have."""
    name = f"{connection.settings_dict['NAME']}_elsewhere"
    admin = connect("postgres", "test-admin")
    admin.autocommit = True
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    conn = connect(name, "other-service")
    try:
        yield conn
    finally:
        conn.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def send(producer: APIClient, account: BillingAccount, *event_ids: str) -> None:
    events = [
        {
            "id": event_id,
            "account_id": account.public_id,
            "time": "2026-11-03T10:15:00Z",
            "type": "usage",
            "sku": "network.egress",
            "quantity": "2",
        }
        for event_id in event_ids
    ]
    with time_machine.travel(NOW, tick=False):
        response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
    assert response.status_code == 200 and response.json()["accepted"] == len(events)


def write_event_directly(session: psycopg.Connection[Any], account: BillingAccount, event_id: str) -> None:
    """An event inserted by hand in ``session``'s open transaction (the trigger takes the lock)."""
    session.execute(
        "INSERT INTO metering_usageevent (account_id, event_id, occurred_at, kind, sku, quantity) "
        "VALUES (%s, %s, '2026-11-03T10:20:00Z', 'usage', 'network.egress', 5)",
        [account.id, event_id],
    )


def rollup_usage(*args: str) -> str:
    out = StringIO()
    with time_machine.travel(NOW, tick=False):
        call_command("rollup_usage", *args, stdout=out)
    return out.getvalue()


def egress(account: BillingAccount) -> list[Any]:
    return [r.quantity for r in HourlyUsage.objects.filter(account_id=account.id, sku="network.egress")]


def test_transactions_that_write_no_events_hold_nothing_back_whatever_their_database(
    settings: Any,
    catalog: None,
    producer: APIClient,
    account: BillingAccount,
    other_database: psycopg.Connection[Any],
    other_session: psycopg.Connection[Any],
) -> None:
    settings.METERING_HORIZON_HOLD_SECONDS = 0  # anything that held the rollup back would be named at once
    # Another service writes in its own database and keeps its transaction open ...
    other_database.execute("CREATE TABLE report (x int)")
    other_database.execute("INSERT INTO report VALUES (1)")
    # ... and a session on our database has a txid but writes no events.
    other_session.execute("CREATE TEMP TABLE scratch (x int)")
    other_session.execute("INSERT INTO scratch VALUES (1)")

    send(producer, account, "e-1", "e-2")  # committed while both are open
    out = rollup_usage()
    assert out.startswith("2 events from 16 shards") and "held back" not in out and "no new events" not in out
    send(producer, account, "e-3")
    assert rollup_usage().startswith("1 events from 16 shards")
    assert rollup_usage().startswith("0 events from 16 shards")  # exactly once
    assert egress(account) == [6]
    assert rollup.horizon_hold() is None

    other_database.commit()  # whenever they end, nothing more is taken
    other_session.rollback()
    assert rollup_usage().startswith("0 events from 16 shards")
    assert egress(account) == [6]


def test_a_writer_in_flight_is_waited_for_and_its_events_are_taken_by_that_run(
    settings: Any, catalog: None, producer: APIClient, account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    settings.METERING_HORIZON_LOCK_TIMEOUT_SECONDS = 30
    send(producer, account, "e-1")
    write_event_directly(other_session, account, "in-flight")  # holds the writers' lock, not committed
    reports: list[rollup.RollupReport] = []

    def run() -> None:
        try:
            with time_machine.travel(NOW, tick=False):
                reports.append(rollup.rollup())
        finally:
            connection.close()

    runner = threading.Thread(target=run)
    runner.start()

    def rollup_waits() -> bool:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock'"
            )
            return bool(cur.fetchone()[0])

    assert wait_for(rollup_waits, 30), "the rollup did not wait for the writer in flight"
    other_session.commit()  # the writer ends while the rollup waits for it
    runner.join(60)
    assert len(reports) == 1
    # The horizon was read after the writer committed (a statement after the lock's), so its
    # event is below it and visible: taken by this run, with the one committed before.
    assert reports[0].events == 2 and reports[0].horizon is not None
    assert rollup_usage().startswith("0 events from 16 shards")
    assert egress(account) == [7]


def test_a_stuck_writer_of_events_is_named_and_the_rollup_catches_up_once_it_ends(
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    catalog: None,
    producer: APIClient,
    account: BillingAccount,
    other_session: psycopg.Connection[Any],
) -> None:
    settings.METERING_HORIZON_HOLD_SECONDS = 0  # report at once: no test waits for a clock
    settings.METERING_HORIZON_LOCK_TIMEOUT_SECONDS = 0.2
    write_event_directly(other_session, account, "stuck")  # takes the lock and stays open
    pid = other_session.info.backend_pid
    send(producer, account, "e-1", "e-2")  # committed, after the writer began: ingestion is not blocked

    caplog.set_level(logging.WARNING, logger="metering")
    out = rollup_usage()
    assert out.startswith("0 events from 16 shards")
    assert "no new events taken" in out
    assert f"held back: 2 committed events wait behind a writer of events holding the writers' lock: pid {pid}" in out
    assert "application forgotten-writer, idle in transaction" in out
    warning = [r for r in caplog.records if r.getMessage() == "rollup.horizon_held"]
    assert len(warning) == 1 and warning[0].levelno == logging.WARNING
    fields = fields_of(warning[0])
    assert {k: fields[k] for k in ("pid", "datname", "state", "waiting_events")} == {
        "pid": pid,
        "datname": connection.settings_dict["NAME"],
        "state": "idle in transaction",
        "waiting_events": 2,
    }
    assert fields["xact_age_s"] >= 0 and fields["backend_xid"] is not None
    assert not HourlyUsage.objects.filter(account_id=account.id).exists()

    other_session.commit()  # the writer ends
    caplog.clear()
    out = rollup_usage()
    assert out.startswith("3 events from 16 shards") and "held back" not in out
    assert not [r for r in caplog.records if r.getMessage() == "rollup.horizon_held"]
    assert egress(account) == [9]


def test_a_young_writer_is_not_reported(
    catalog: None, producer: APIClient, account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    # Ingestion keeps short writers in flight all the time: only an old one is news.
    other_session.execute("SELECT pg_advisory_xact_lock_shared(%s)", [horizon.EVENT_WRITERS_LOCK])
    send(producer, account, "e-1")
    assert rollup.horizon_hold(min_age_seconds=3600) is None
    held = rollup.horizon_hold(min_age_seconds=0)
    assert held is not None and held.pid == other_session.info.backend_pid and held.waiting_events == 1


def test_nothing_is_reported_when_no_event_waits(
    settings: Any, catalog: None, producer: APIClient, account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    settings.METERING_HORIZON_HOLD_SECONDS = 0
    send(producer, account, "e-1")
    assert rollup_usage().startswith("1 events from 16 shards")
    other_session.execute("SELECT pg_advisory_xact_lock_shared(%s)", [horizon.EVENT_WRITERS_LOCK])
    assert rollup.horizon_hold() is None  # a writer, but nothing committed waits


def test_the_task_reports_the_hold_once_per_run(
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    catalog: None,
    producer: APIClient,
    account: BillingAccount,
    other_session: psycopg.Connection[Any],
) -> None:
    from metering.tasks import rollup_usage as task

    settings.METERING_HORIZON_HOLD_SECONDS = 0
    settings.METERING_HORIZON_LOCK_TIMEOUT_SECONDS = 0.2
    other_session.execute("SELECT pg_advisory_xact_lock_shared(%s)", [horizon.EVENT_WRITERS_LOCK])
    send(producer, account, "e-1")
    caplog.set_level(logging.INFO, logger="metering")
    with time_machine.travel(NOW, tick=False):
        result = task.delay(seconds=0, pause=0).get(timeout=30)
    assert f"pid {other_session.info.backend_pid}" in result
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("metering")
    ]
    assert warnings == ["rollup.horizon_held"]
    drain = [r for r in caplog.records if r.getMessage() == "rollup.drain"]
    assert len(drain) == 1 and fields_of(drain[0])["passes"] == 1 and fields_of(drain[0])["events"] == 0


def test_an_event_write_after_another_write_of_the_transaction_is_refused(
    account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    # Its txid would exist before its lock: a rollup could read a horizon above it meanwhile.
    other_session.execute("SELECT pg_current_xact_id()")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="event writers' lock"):
        write_event_directly(other_session, account, "late")
    other_session.rollback()
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("CREATE TEMP TABLE wrote_first (x int) ON COMMIT DROP")
        with pytest.raises(horizon.EventWriterLockTooLate):
            horizon.writer_lock()
