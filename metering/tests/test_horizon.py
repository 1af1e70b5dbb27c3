"""A writing transaction elsewhere on the server holds the rollup's horizon back: the rollup
says so, naming the backend, instead of a bare "0 events"; once it ends the rollup catches up.

A second connection (psycopg, not Django's) plays the forgotten transaction; the tests commit
for real (``transaction=True``), as the rollup only takes events of finished transactions."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from io import StringIO
from typing import Any

import psycopg
import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from billing_site.common.logs import fields_of
from metering import rollup
from metering.models import HourlyUsage

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)


@pytest.fixture
def other_session() -> Iterator[psycopg.Connection[Any]]:
    """A session of its own on the test database, as another application would have."""
    params = connection.settings_dict
    conn = psycopg.connect(
        dbname=params["NAME"],
        user=params["USER"] or None,
        password=params["PASSWORD"] or None,
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        application_name="forgotten-report",
    )
    try:
        yield conn
    finally:
        conn.close()


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


def rollup_usage(*args: str) -> str:
    out = StringIO()
    with time_machine.travel(NOW, tick=False):
        call_command("rollup_usage", *args, stdout=out)
    return out.getvalue()


def test_a_writing_transaction_elsewhere_is_named_and_the_rollup_catches_up_once_it_ends(
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    catalog: None,
    producer: APIClient,
    account: BillingAccount,
    other_session: psycopg.Connection[Any],
) -> None:
    settings.METERING_HORIZON_HOLD_SECONDS = 0  # report at once: no test waits for a clock
    (holder_txid,) = other_session.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()  # type: ignore[misc]
    pid = other_session.info.backend_pid
    send(producer, account, "e-1", "e-2")  # committed, but after the other transaction began

    caplog.set_level(logging.WARNING, logger="metering")
    out = rollup_usage()
    assert out.startswith("0 events from 16 shards")
    assert f"held back: 2 committed events wait behind transaction {holder_txid} of pid {pid}" in out
    assert "application forgotten-report, idle in transaction" in out
    warning = [r for r in caplog.records if r.getMessage() == "rollup.horizon_held"]
    assert len(warning) == 1 and warning[0].levelno == logging.WARNING
    fields = fields_of(warning[0])
    assert {k: fields[k] for k in ("pid", "datname", "state", "horizon", "waiting_events")} == {
        "pid": pid,
        "datname": connection.settings_dict["NAME"],
        "state": "idle in transaction",
        "horizon": holder_txid,
        "waiting_events": 2,
    }
    assert fields["xact_age_s"] >= 0 and fields["backend_xid"] == str(holder_txid % 2**32)
    assert not HourlyUsage.objects.filter(account_id=account.id).exists()

    other_session.rollback()  # the other application ends its transaction
    caplog.clear()
    out = rollup_usage()
    assert out.startswith("2 events from 16 shards") and "held back" not in out
    assert not [r for r in caplog.records if r.getMessage() == "rollup.horizon_held"]
    assert [r.quantity for r in HourlyUsage.objects.filter(account_id=account.id)] == [4]


def test_a_young_transaction_is_not_reported(
    catalog: None, producer: APIClient, account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    # Ingestion keeps short transactions in flight all the time: only an old one is news.
    other_session.execute("SELECT pg_current_xact_id()")
    send(producer, account, "e-1")
    assert rollup.horizon_hold(min_age_seconds=3600) is None
    held = rollup.horizon_hold(min_age_seconds=0)
    assert held is not None and held.pid == other_session.info.backend_pid and held.waiting_events == 1


def test_nothing_is_reported_when_no_event_waits(
    settings: Any, catalog: None, producer: APIClient, account: BillingAccount, other_session: psycopg.Connection[Any]
) -> None:
    settings.METERING_HORIZON_HOLD_SECONDS = 0
    send(producer, account, "e-1")
    other_session.execute("SELECT pg_current_xact_id()")  # began after the events committed
    out = rollup_usage()
    assert out.startswith("1 events from 16 shards") and "held back" not in out
    assert rollup.horizon_hold() is None


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
    other_session.execute("SELECT pg_current_xact_id()")
    send(producer, account, "e-1")
    caplog.set_level(logging.INFO, logger="metering")
    with time_machine.travel(NOW, tick=False):
        result = task.delay(seconds=0, pause=0).get(timeout=30)
    assert f"of pid {other_session.info.backend_pid}" in result
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("metering")
    ]
    assert warnings == ["rollup.horizon_held"]
    drain = [r for r in caplog.records if r.getMessage() == "rollup.drain"]
    assert len(drain) == 1 and fields_of(drain[0])["passes"] == 1 and fields_of(drain[0])["events"] == 0
