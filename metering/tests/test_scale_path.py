"""The scale path end to end: API → NATS JetStream → sink → ClickHouse (chdb) → hourly usage.

Real servers throughout: a private nats-server, the embedded ClickHouse, PostgreSQL. These
tests commit for real.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings

from accounts.models import BillingAccount
from conftest import free_port
from metering import eventlog, pipeline, rollup
from metering.tests.support import used

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.clock(dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)),
]

HOUR = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


def usage(account: BillingAccount, event_id: str, minute: int, quantity: str) -> dict[str, Any]:
    return used(account, event_id, HOUR + dt.timedelta(minutes=minute), quantity)


def hourly(account: BillingAccount) -> list[tuple[dt.datetime, str, Decimal]]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT hour, sku, quantity FROM metering_hourlyusage WHERE account_id = %s ORDER BY hour, sku",
            [account.id],
        )
        return cur.fetchall()


@pytest.fixture
def scale_path(event_log: str, event_store: Any) -> Any:
    with override_settings(METERING_EVENT_STORE="clickhouse"):
        yield event_store


def test_usage_through_the_log_and_the_event_store_is_counted_once_however_it_is_resent(
    usage_account: BillingAccount, send: Callable[..., Any], scale_path: Any
) -> None:
    events = [usage(usage_account, f"e{i}", i, "1.5") for i in range(60)] + [
        usage(usage_account, "late", 70, "2")  # the next hour
    ]
    first = send(events)
    assert first.status_code == 200, first.content
    assert first.json() == {"accepted": 61, "duplicates": 0, "rejected": []}
    # A byte-identical resend (the client timed out): answered from its fingerprint.
    again = send(events)
    assert again.json() == {"accepted": 0, "duplicates": 61, "rejected": []}
    # Re-cut into other batches: accepted by the API, counted once downstream.
    for start in range(0, 61, 25):
        assert send(events[start : start + 25]).status_code == 200

    pipeline.run(until_idle=True)

    assert hourly(usage_account) == [
        (HOUR, "network.egress", Decimal("90.000000000000")),
        (HOUR + dt.timedelta(hours=1), "network.egress", Decimal("2.000000000000")),
    ]
    assert scale_path.counted_events() == 61
    assert eventlog.consumer_info().num_pending == 0
    assert rollup.rollup().events == 0  # nothing dirty is left


def test_a_resend_the_log_calls_a_duplicate_keeps_the_fingerprint_the_first_send_never_wrote(
    usage_account: BillingAccount, send: Callable[..., Any], scale_path: Any
) -> None:
    """An API killed after the log acknowledged a batch and before it wrote the batch's
    fingerprint: the client's resend is a duplicate to the log, and now writes the fingerprint,
    so a byte-identical resend after the log's duplicate window (minutes) is still answered as
    duplicates (the fault test saw one answered as accepted, days later)."""
    events = [usage(usage_account, f"e{i}", i, "1") for i in range(60)]
    assert send(events).json() == {"accepted": 60, "duplicates": 0, "rejected": []}
    with connection.cursor() as cur:
        cur.execute("DELETE FROM metering_ingestbatch")  # as if the API died before writing it
    assert send(events).json() == {"accepted": 0, "duplicates": 60, "rejected": []}  # the log's window
    with connection.cursor() as cur:
        cur.execute("SELECT events FROM metering_ingestbatch")
        assert cur.fetchall() == [(60,)]  # what answers the resends after that window


def test_while_the_log_cannot_acknowledge_the_api_answers_503_and_stores_nothing(
    usage_account: BillingAccount, send: Callable[..., Any], scale_path: Any, settings: Any
) -> None:
    eventlog.close()
    settings.METERING_LOG_URLS = [f"nats://127.0.0.1:{free_port()}"]  # nothing listens there
    settings.METERING_LOG_ACK_TIMEOUT_SECONDS = 1
    response = send([usage(usage_account, "e1", 1, "1")])
    assert response.status_code == 503
    assert response.json()["code"] == "log_unavailable"
    assert int(response["Retry-After"]) >= 1
    assert scale_path.counted_events() == 0
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM metering_ingestbatch")
        assert cur.fetchone() == (0,)
    eventlog.close()


def test_the_pipeline_outlives_a_log_it_cannot_reach(scale_path: Any, settings: Any) -> None:
    """A leader election or a lost connection is a pause for the worker, not its end."""
    eventlog.close()
    settings.METERING_LOG_URLS = [f"nats://127.0.0.1:{free_port()}"]  # nothing listens there
    settings.METERING_LOG_ACK_TIMEOUT_SECONDS = 0.5
    report = pipeline.run(seconds=3, until_idle=True)  # not idle: the log never answered
    assert report.log_unavailable >= 1
    assert report.messages == 0
    eventlog.close()


def test_until_idle_waits_for_what_a_dead_sink_left_unacknowledged(
    usage_account: BillingAccount, send: Callable[..., Any], scale_path: Any, settings: Any
) -> None:
    settings.METERING_LOG_ACK_WAIT_SECONDS = 2
    assert send([usage(usage_account, f"e{i}", i, "1") for i in range(5)]).status_code == 200
    # A sink takes the message and dies before its acknowledgement: the log hands it out again
    # only after the ack wait, and until then nothing is pending but it is not done either.
    assert len(eventlog.fetch(10, timeout=5)) == 1
    assert eventlog.consumer_info().num_pending == 0

    report = pipeline.run(until_idle=True, seconds=60)

    assert report.messages == 1, report
    assert scale_path.counted_events() == 5
    assert hourly(usage_account) == [(HOUR, "network.egress", Decimal("5.000000000000"))]
