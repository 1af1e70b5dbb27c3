"""Hourly usage in monthly partitions (``metering.partitions``, migration 0014): months created
ahead, a row for a month without a partition caught by DEFAULT and moved, an old month dropped
whole (the table gone, not its rows deleted) with costs, spend and invoices unchanged, and the
rollup never writing a dropped month again."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from conftest import Customer
from invoicing.models import Invoice
from metering import partitions, rollup, selectors
from metering.api import CostQuerySerializer
from metering.models import MonthlySpend
from metering.sharding import SHARDS
from metering.tests.test_rollup import at, lifecycle, used
from tests.test_billing_month import bill, send

NOV = dt.date(2026, 11, 1)


def exists(table: str) -> bool:
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
        return bool(cur.fetchone()[0])


def where(account_id: int, hour: dt.datetime) -> str:
    """The partition that holds an hourly row."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT tableoid::regclass::text FROM metering_hourlyusage WHERE account_id = %s AND hour = %s",
            [account_id, hour],
        )
        return str(cur.fetchone()[0])


def insert_hourly(account_id: int, hour: dt.datetime, *, daily: bool) -> None:
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO metering_hourlyusage (account_id, hour, sku, resource_id, labels, quantity, amount) "
            "VALUES (%s, %s, 'network.egress', '', '{}', 5, 0.45)",
            [account_id, hour],
        )
        if daily:
            cur.execute(
                "INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount) "
                "VALUES (%s, date_trunc('day', %s::timestamptz, 'UTC'), 'network.egress', '', '{}', 5, 0.45)",
                [account_id, hour],
            )


@pytest.fixture
def empty_rollups(db: None) -> None:
    """No rows left by a test that committed (the next such test's setup empties them): these
    tests count what the maintenance finds. Rolled back with the test."""
    with connection.cursor() as cur:
        cur.execute("TRUNCATE metering_hourlyusage, metering_dailyusage")


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_rollups")
def test_a_month_without_partition_lands_in_default_and_maintenance_moves_it_and_creates_months_ahead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    account_id, hour = 424242, dt.datetime(2031, 3, 14, 9, tzinfo=dt.UTC)
    shard = rollup.shard_of(account_id)
    assert not exists(partitions.month_table(shard, dt.date(2031, 3, 1)))
    insert_hourly(account_id, hour, daily=True)  # never fails: DEFAULT catches it
    assert where(account_id, hour) == partitions.default_table(shard)

    now = dt.datetime(2031, 3, 20, 12, tzinfo=dt.UTC)
    planned = partitions.maintain(now=now, dry_run=True)
    assert partitions.month_table(shard, dt.date(2031, 3, 1)) in planned.created and planned.moved_rows == 1
    assert where(account_id, hour) == partitions.default_table(shard)  # a dry run changes nothing

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metering.partitions"):
        report = partitions.maintain(now=now)
    assert report.moved_rows == 1
    assert where(account_id, hour) == partitions.month_table(shard, dt.date(2031, 3, 1))
    warned = [r for r in caplog.records if r.msg == "metering.hourly_partition_default_rows"]
    assert [(r.shard, r.month, r.rows) for r in warned] == [(shard, "2031-03-01", 1)]  # type: ignore[attr-defined]
    created = [r for r in caplog.records if r.msg == "metering.hourly_partition_created"]
    assert len(created) == len(report.created)  # one line per partition
    # The months events can still arrive for, and the next two, in every shard: none waits in DEFAULT.
    for s in range(SHARDS):
        for month in (dt.date(2031, 2, 1), dt.date(2031, 3, 1), dt.date(2031, 4, 1), dt.date(2031, 5, 1)):
            assert exists(partitions.month_table(s, month))
    # A leaf has the rollup's fillfactor and the primary key (an upsert conflicts there).
    with connection.cursor() as cur:
        cur.execute(
            "SELECT reloptions FROM pg_class WHERE relname = %s", [partitions.month_table(shard, dt.date(2031, 4, 1))]
        )
        assert cur.fetchone()[0] == ["fillfactor=70"]
        cur.execute(
            "INSERT INTO metering_hourlyusage (account_id, hour, sku, resource_id, labels, quantity) "
            "VALUES (%s, %s, 'network.egress', '', '{}', 1) ON CONFLICT (account_id, hour, sku, resource_id, labels) "
            "DO UPDATE SET quantity = metering_hourlyusage.quantity + 1 RETURNING quantity",
            [account_id, hour],
        )
        assert cur.fetchone()[0] == 6
    assert partitions.maintain(now=now).created == []  # idempotent


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_rollups")
def test_an_old_month_whose_days_disagree_is_kept_and_dropped_once_they_agree(caplog: pytest.LogCaptureFixture) -> None:
    account_id, hour = 434343, dt.datetime(2031, 3, 14, 9, tzinfo=dt.UTC)
    shard, march = rollup.shard_of(account_id), dt.date(2031, 3, 1)
    insert_hourly(account_id, hour, daily=False)  # the hours say more than the days
    later = dt.datetime(2032, 6, 2, tzinfo=dt.UTC)  # March 2031 is past 13 months
    with caplog.at_level(logging.INFO, logger="metering.partitions"):
        report = partitions.maintain(now=later)
    assert partitions.month_table(shard, march) in report.kept and exists(partitions.month_table(shard, march))
    assert [r for r in caplog.records if r.msg == "metering.hourly_partition_drop_refused"]
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount) "
            "VALUES (%s, '2031-03-14', 'network.egress', '', '{}', 5, 0.45)",
            [account_id],
        )
    report = partitions.maintain(now=later)
    assert partitions.month_table(shard, march) in report.dropped and not exists(partitions.month_table(shard, march))


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_rollups")
def test_the_command_says_what_it_would_do_and_then_does_it() -> None:
    later = dt.datetime(2031, 3, 20, 12, tzinfo=dt.UTC)
    with time_machine.travel(later, tick=False):
        out = StringIO()
        call_command("hourly_partitions", "--dry-run", stdout=out)
        assert "would create metering_hourlyusage_p00_y2031m05" in out.getvalue()
        assert "would drop metering_hourlyusage_p00_y2026m12" in out.getvalue() or not exists(
            "metering_hourlyusage_p00_y2026m12"
        )
        assert not exists("metering_hourlyusage_p00_y2031m05")
        out = StringIO()
        call_command("hourly_partitions", stdout=out)
        assert out.getvalue().startswith("created 64 partitions") and exists("metering_hourlyusage_p00_y2031m05")


# --- Dropping a month for real: the rollup takes committed events only, so these tests commit.


@pytest.fixture
def restore_partitions() -> Iterator[None]:
    """The test drops months for good (it commits): put back those the suite's clock needs."""
    yield
    partitions.maintain(now=dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC))
    partitions.maintain()


def what_is_read(account: BillingAccount) -> dict[str, Any]:
    """What costs by day and month, invoices and the spend read of November and December."""
    start, end = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    costs = {
        granularity: selectors.cost_breakdown(
            selectors.CostQuery(
                account_id=account.id,
                start=start,
                end=end,
                granularity=granularity,
                by_sku=True,
                by_resource=True,
                label_keys=("project",),
            )
        )
        for granularity in ("day", "month")
    }
    usage = selectors.billing_usage(account_ids=[account.id], start=start, end=end, detail_month=dt.date(2026, 12, 1))
    return {
        "costs": costs,
        "monthly": sorted(usage.monthly, key=lambda u: (u.month, u.sku)),
        "by_resource": usage.by_resource,
        "by_project": usage.by_project,
        "through": selectors.monthly_usage_through(through={account.id: dt.date(2026, 12, 1)}, since=NOV),
        "spend": dict(
            MonthlySpend.objects.filter(account_id=account.id, month__lt=dt.date(2027, 1, 1)).values_list(
                "month", "amount"
            )
        ),
    }


def hours_in(account: BillingAccount, month: dt.date) -> int:
    start = partitions.month_start(month)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM metering_hourlyusage WHERE account_id = %s AND hour >= %s AND hour < %s",
            [account.id, start, partitions.month_start(partitions.add_months(month, 1))],
        )
        return int(cur.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_an_old_month_is_dropped_whole_and_costs_spend_and_invoices_stay_the_same(
    catalog: None,
    producer: APIClient,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
    restore_partitions: None,
) -> None:
    account = make_account(customer.user, currency="USD", country="US", kind="business")
    shard = rollup.shard_of(account.id)
    send(
        producer,
        [
            lifecycle(account, "s", at("2026-11-02 08:00:00"), "start", labels={"project": "web"}),
            used(account, "e1", at("2026-11-02 09:10:00"), "160"),
        ],
        dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC),
    )
    assert "issued 1 invoices" in bill("2026-11", dt.datetime(2026, 12, 2, 2, 30, tzinfo=dt.UTC))
    # The VM runs on through December; the rollup accrues it up to January 5th, 10:00.
    rollup.rollup(now=dt.datetime(2027, 1, 5, 10, tzinfo=dt.UTC), shards=[shard])
    assert hours_in(account, NOV) > 0
    before = what_is_read(account)

    # Keep one month before the current one: on January 5th November goes.
    late = dt.datetime(2027, 1, 5, 12, tzinfo=dt.UTC)
    with override_settings(METERING_HOURLY_RETENTION_MONTHS=1), time_machine.travel(late, tick=False):
        report = partitions.maintain()
        assert {partitions.month_table(s, NOV) for s in range(SHARDS)} <= set(report.dropped)
        assert not any(exists(partitions.month_table(s, NOV)) for s in range(SHARDS))  # DROP, not DELETE
        assert exists(partitions.month_table(shard, dt.date(2026, 12, 1)))
        assert hours_in(account, NOV) == 0
        assert what_is_read(account) == before

        # An hour breakdown of November would now show an empty month: refused, by day it is there.
        hourly = CostQuerySerializer(data={"start": "2026-11-02", "end": "2026-11-03", "granularity": "hour"})
        assert not hourly.is_valid() and "start" in hourly.errors
        assert CostQuerySerializer(data={"start": "2026-11-02", "end": "2026-11-03"}).is_valid()

        # The VM stops: its timeline is replayed from the replay floor (January), never from its
        # start in November, whose hours would come back and be added to its days a second time.
        send(producer, [lifecycle(account, "x", at("2027-01-05 11:30:00"), "stop")], late)
        rollup.rollup(now=late, shards=[shard])
        assert hours_in(account, NOV) == 0
        after = what_is_read(account)
        assert after == before
        january = selectors.cost_breakdown(
            selectors.CostQuery(
                account_id=account.id,
                start=dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
                end=dt.datetime(2027, 2, 1, tzinfo=dt.UTC),
                granularity="month",
                by_sku=True,
            )
        )[0]
        assert [(r["sku"], r["quantity"]) for r in january] == [("compute.vcpu", Decimal("215"))]  # 2 x 107.5 h

        # December's invoice bills December only: nothing of November's changed, so no adjustment.
        assert "issued 1 invoices" in bill("2026-12", late)
    december = Invoice.objects.get(account_id=account.id, period_start__month=12)
    assert {line.usage_month for line in december.lines.all() if line.usage_month} == {dt.date(2026, 12, 1)}


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_rollups")
def test_the_migration_keeps_every_row_both_ways() -> None:
    from django.db.migrations.executor import MigrationExecutor

    before, after = ("metering", "0013_scale_path_hours"), ("metering", "0014_hourlyusage_monthly_partitions")
    MigrationExecutor(connection).migrate([before])
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'metering_hourlyusage_p05'::regclass")
        assert cur.fetchone()[0] == 0  # a plain hash partition again
        cur.execute(
            "INSERT INTO metering_hourlyusage (account_id, hour, sku, resource_id, labels, quantity, amount) "
            "SELECT a, timestamptz '2019-12-31 23:00+00' + h * interval '1 hour', 'network.egress', '', '{}', h, h "
            "FROM generate_series(1, 40) a, generate_series(0, 24 * 70, 7) h"
        )
        cur.execute("SELECT count(*), sum(quantity), sum(amount * account_id) FROM metering_hourlyusage")
        rows = cur.fetchone()
    MigrationExecutor(connection).migrate([after])
    with connection.cursor() as cur:
        cur.execute("SELECT count(*), sum(quantity), sum(amount * account_id) FROM metering_hourlyusage")
        assert cur.fetchone() == rows
        cur.execute(
            "SELECT count(*) FROM metering_hourlyusage WHERE tableoid::regclass::text LIKE '%default' "
            "OR tableoid::regclass::text NOT LIKE '%\\_y' || to_char(hour AT TIME ZONE 'UTC', 'YYYY\"m\"MM')"
        )
        assert cur.fetchone()[0] == 0  # every row in its month's partition
        cur.execute("SELECT reloptions FROM pg_class WHERE relname = 'metering_hourlyusage_p05_y2020m02'")
        assert cur.fetchone()[0] == ["fillfactor=70"]
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'metering_hourlyusage_p05_y2020m02'")
        assert sorted(d.split(" USING ")[1] for (d,) in cur.fetchall()) == [
            "btree (account_id, hour, sku, resource_id, labels)",
            "btree (account_id, resource_id, hour)",
        ]
