"""Events to rated hourly usage: accrual across boundaries, order independence, late
events, anomalies, the watermark, crash safety, concurrency, prices and tiers.

These tests commit for real (``transaction=True``): the rollup takes only events of
finished transactions, as in production."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.db import connection, connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from conftest import Customer, backend_alive, backend_terminate, backend_waiting, database_url, in_threads, wait_for
from metering import rollup
from metering.models import HourlyUsage, MonthlySpend, ResourceState
from metering.tests.support import lifecycle, used

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)  # the tests' clock: after a month end
H = dt.timedelta(hours=1)


def q12(value: Decimal) -> Decimal:
    return value.quantize(Decimal("1e-12"))


def q9(value: Decimal) -> Decimal:
    return value.quantize(Decimal("1e-9"))


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


@pytest.fixture
def post(producer: APIClient) -> Callable[[list[dict[str, Any]]], None]:
    def send(events: list[dict[str, Any]]) -> None:
        with time_machine.travel(NOW, tick=False):
            response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
        body = response.json()
        assert response.status_code == 200 and not body["rejected"], body

    return send


def roll(account: BillingAccount, now: dt.datetime = NOW) -> rollup.RollupReport:
    return rollup.rollup(now=now, shards=[rollup.shard_of(account.id)])


def hourly(account: BillingAccount, sku: str | None = None) -> dict[tuple[str, str, str, str], Decimal]:
    rows = HourlyUsage.objects.filter(account_id=account.id)
    if sku:
        rows = rows.filter(sku=sku)
    return {
        (r.hour.strftime("%m-%d %H"), r.sku, r.resource_id, json.dumps(r.labels, sort_keys=True)): r.quantity
        for r in rows
    }


def hourly_rows(account: BillingAccount) -> list[HourlyUsage]:
    return list(HourlyUsage.objects.filter(account_id=account.id))


def days_of(rows: list[HourlyUsage]) -> dict[tuple[str, str, str, str], tuple[Decimal, Decimal | None]]:
    """The daily rows as the hourly ones add up (no amount where no hour has one)."""
    out: dict[tuple[str, str, str, str], tuple[Decimal, Decimal | None]] = {}
    for r in rows:
        key = (r.hour.strftime("%m-%d"), r.sku, r.resource_id, json.dumps(r.labels, sort_keys=True))
        quantity, amount = out.get(key, (Decimal(0), None))
        if r.amount is not None:
            amount = (amount or Decimal(0)) + r.amount
        out[key] = (quantity + r.quantity, amount)
    return out


def daily(account: BillingAccount) -> dict[tuple[str, str, str, str], tuple[Decimal, Decimal | None]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT day, sku, resource_id, labels::text, quantity, amount FROM metering_dailyusage "
            "WHERE account_id = %s",
            [account.id],
        )
        return {
            (day.strftime("%m-%d"), sku, resource, json.dumps(json.loads(labels), sort_keys=True)): (quantity, amount)
            for day, sku, resource, labels, quantity, amount in cursor.fetchall()
        }


def months_of(rows: list[HourlyUsage]) -> dict[str, Decimal]:
    """The account's monthly spend as its hourly amounts add up (months with no amount left out)."""
    out: dict[str, Decimal] = {}
    for r in rows:
        if r.amount is not None:
            out[r.hour.strftime("%Y-%m")] = out.get(r.hour.strftime("%Y-%m"), Decimal(0)) + r.amount
    return {month: amount for month, amount in out.items() if amount}


def monthly(account: BillingAccount) -> dict[str, Decimal]:
    return {f"{s.month:%Y-%m}": s.amount for s in MonthlySpend.objects.filter(account_id=account.id) if s.amount}


def resource_state(account: BillingAccount) -> dict[str, tuple[Any, ...]]:
    return {
        s.resource_id: (
            s.running,
            s.since,
            s.spec,
            s.last_event_at,
            s.events,
            s.start_while_running,
            s.stop_while_stopped,
            s.update_while_stopped,
        )
        for s in ResourceState.objects.filter(account_id=account.id)
    }


def amounts(account: BillingAccount, sku: str) -> dict[str, Decimal | None]:
    return {r.hour.strftime("%m-%d %H"): r.amount for r in HourlyUsage.objects.filter(account_id=account.id, sku=sku)}


@pytest.fixture
def account(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="USD")


def test_accrual_across_hour_day_and_month_boundaries(account: BillingAccount, post: Callable) -> None:
    post(
        [
            lifecycle(account, "s", at("2026-10-31 22:45:00"), "start", spec={"compute.vcpu": 2, "compute.ram": 3}),
            lifecycle(account, "x", at("2026-11-01 01:15:30"), "stop"),
        ]
    )
    roll(account)
    vcpu = {k[0]: v for k, v in hourly(account, "compute.vcpu").items()}
    assert vcpu == {
        "10-31 22": Decimal("0.5"),  # 15 minutes of 2 vCPU
        "10-31 23": Decimal(2),  # the last hour of October
        "11-01 00": Decimal(2),  # the first of November
        "11-01 01": q12(Decimal(2) * 930 / 3600),  # 15 min 30 s, to the second (12 places kept)
    }
    assert q9(sum(vcpu.values())) == q9(Decimal(2) * 9030 / 3600)
    assert q9(sum(hourly(account, "compute.ram").values())) == q9(Decimal(3) * 9030 / 3600)


def test_usage_lands_in_the_hour_of_its_time(account: BillingAccount, post: Callable) -> None:
    post(
        [
            used(account, "a", at("2026-11-02 10:00:00"), "1.5"),
            used(account, "b", at("2026-11-02 10:59:59.999"), "2"),
            used(account, "c", at("2026-11-02 11:00:00"), "4", resource_id="vm-9"),
        ]
    )
    roll(account)
    assert hourly(account) == {
        ("11-02 10", "network.egress", "", "{}"): Decimal("3.5"),
        ("11-02 11", "network.egress", "vm-9", "{}"): Decimal(4),
    }


def test_a_running_resource_accrues_to_the_watermark_and_keeps_accruing(
    account: BillingAccount, post: Callable
) -> None:
    post([lifecycle(account, "s", at("2026-11-03 09:30:00"), "start")])
    roll(account, now=at("2026-11-03 11:20:00"))  # watermark 11:00
    assert {k[0]: v for k, v in hourly(account).items()} == {"11-03 09": Decimal(1), "11-03 10": Decimal(2)}
    roll(account, now=at("2026-11-03 12:05:00"))  # the watermark moved: one more hour
    assert {k[0]: v for k, v in hourly(account).items()} == {
        "11-03 09": Decimal(1),
        "11-03 10": Decimal(2),
        "11-03 11": Decimal(2),
    }
    state = ResourceState.objects.get(account_id=account.id, resource_id="vm-1")
    assert state.running and state.since == at("2026-11-03 09:30:00")


def test_a_late_event_is_placed_where_its_time_says(account: BillingAccount, post: Callable) -> None:
    post(
        [
            lifecycle(account, "s", at("2026-11-02 08:00:00"), "start"),
            lifecycle(account, "x", at("2026-11-02 12:00:00"), "stop"),
        ]
    )
    roll(account)
    assert sum(hourly(account).values()) == Decimal(8)  # 4 hours of 2 vCPU
    # A resize at 10:30 that arrives after the fact: 4 vCPU from then on.
    post([lifecycle(account, "u", at("2026-11-02 10:30:00"), "update", spec={"compute.vcpu": 4})])
    roll(account)
    assert {k[0]: v for k, v in hourly(account).items()} == {
        "11-02 08": Decimal(2),
        "11-02 09": Decimal(2),
        "11-02 10": Decimal(3),
        "11-02 11": Decimal(4),
    }


def test_start_while_running_is_an_update_and_stop_while_stopped_changes_nothing(
    account: BillingAccount, post: Callable
) -> None:
    post(
        [
            lifecycle(account, "s1", at("2026-11-02 08:00:00"), "start", spec={"compute.vcpu": 1}),
            lifecycle(account, "s2", at("2026-11-02 09:00:00"), "start", spec={"compute.vcpu": 3}),  # acts as update
            lifecycle(account, "x1", at("2026-11-02 10:00:00"), "stop"),
            lifecycle(account, "x2", at("2026-11-02 11:00:00"), "stop"),  # already stopped
            lifecycle(
                account, "u1", at("2026-11-02 11:30:00"), "update", spec={"compute.vcpu": 8}
            ),  # stopped: no accrual
        ]
    )
    roll(account)
    assert {k[0]: v for k, v in hourly(account).items()} == {"11-02 08": Decimal(1), "11-02 09": Decimal(3)}
    state = ResourceState.objects.get(account_id=account.id, resource_id="vm-1")
    assert (state.start_while_running, state.stop_while_stopped, state.update_while_stopped) == (1, 1, 1)
    assert not state.running


def test_labels_are_those_of_the_lifecycle_event_in_effect(account: BillingAccount, post: Callable) -> None:
    post(
        [
            lifecycle(account, "s", at("2026-11-02 08:00:00"), "start", labels={"project": "web"}),
            lifecycle(account, "r", at("2026-11-02 09:00:00"), "update", labels={"project": "ml"}),
            lifecycle(account, "x", at("2026-11-02 10:00:00"), "stop"),
        ]
    )
    roll(account)
    assert set(hourly(account)) == {
        ("11-02 08", "compute.vcpu", "vm-1", '{"project": "web"}'),
        ("11-02 09", "compute.vcpu", "vm-1", '{"project": "ml"}'),
    }


def test_days_follow_hours_that_a_late_event_removes_or_relabels(account: BillingAccount, post: Callable) -> None:
    post(
        [
            lifecycle(account, "s", at("2026-11-02 08:00:00"), "start", labels={"project": "web"}),
            used(account, "u", at("2026-11-02 09:10:00"), "7", resource_id="vm-1"),
        ]
    )
    roll(account)  # running to the watermark, 11-03 12:00
    assert daily(account) == days_of(hourly_rows(account))
    # Late: relabelled at 09:00 and stopped at 10:30 the same day; the next day's hours go.
    post(
        [
            lifecycle(account, "r", at("2026-11-02 09:00:00"), "update", labels={"project": "ml"}),
            lifecycle(account, "x", at("2026-11-02 10:30:00"), "stop"),
        ]
    )
    roll(account)
    assert {k[0]: v for k, v in hourly(account, "compute.vcpu").items()} == {
        "11-02 08": Decimal(2),
        "11-02 09": Decimal(2),
        "11-02 10": Decimal(1),
    }
    assert daily(account) == days_of(hourly_rows(account))
    assert monthly(account) == months_of(hourly_rows(account))
    assert {k[:2] for k in daily(account)} == {("11-02", "compute.vcpu"), ("11-02", "network.egress")}
    state = ResourceState.objects.get(account_id=account.id, resource_id="vm-1")
    assert (state.running, state.events, state.start_while_running, state.stop_while_stopped) == (False, 3, 0, 0)


# --- Order independence


def _timeline(account: BillingAccount, steps: list[tuple[int, str, int]]) -> list[dict[str, Any]]:
    base = at("2026-11-01 06:00:00")
    return [
        lifecycle(account, f"e{i}", base + dt.timedelta(minutes=minute), action, spec={"compute.vcpu": units})
        for i, (minute, action, units) in enumerate(steps)
    ]


steps_strategy = st.lists(
    st.tuples(st.integers(0, 60 * 30), st.sampled_from(["start", "update", "stop"]), st.integers(0, 16)),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=bool(os.environ.get("CI"))
)
@given(steps=steps_strategy, data=st.data())
def test_the_same_hourly_totals_whatever_the_arrival_order(
    steps: list[tuple[int, str, int]],
    data: st.DataObject,
    catalog: None,
    make_customer: Callable,
    make_account: Callable,
    post: Callable,
) -> None:
    owner = make_customer()
    in_order, shuffled = make_account(owner.user), make_account(owner.user)
    post(_timeline(in_order, steps))
    roll(in_order)

    events = data.draw(st.permutations(_timeline(shuffled, steps)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=3)))
    rollups_between = data.draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    for (start, end), roll_now in zip(zip([0, *cuts], [*cuts, len(events)], strict=True), rollups_between, strict=True):
        if end > start:
            post(events[start:end])
        if roll_now:
            roll(shuffled)
    roll(shuffled)

    def normalised(account: BillingAccount) -> dict[tuple[str, str], Decimal]:
        return {(k[0], k[1]): v for k, v in hourly(account).items()}

    assert normalised(shuffled) == normalised(in_order)
    # The days follow their hours, and the data-quality counters count the whole timeline
    # however it arrived (a late event changes what the events after it were).
    assert daily(shuffled) == daily(in_order) == days_of(hourly_rows(shuffled))
    assert monthly(shuffled) == monthly(in_order) == months_of(hourly_rows(shuffled))
    assert resource_state(shuffled) == resource_state(in_order)


# --- Crash safety and concurrency


def test_a_rollup_run_twice_changes_nothing(account: BillingAccount, post: Callable) -> None:
    post(
        [
            lifecycle(account, "s", at("2026-11-02 08:00:00"), "start"),
            used(account, "u", at("2026-11-02 09:10:00"), "7"),
        ]
    )
    roll(account)
    first = hourly(account)
    roll(account)
    assert hourly(account) == first


def test_a_rollup_killed_half_way_and_rerun_gives_identical_rows(
    catalog: None, make_customer: Callable, make_account: Callable, post: Callable
) -> None:
    owner = make_customer()
    control, victim = make_account(owner.user, currency="USD"), make_account(owner.user, currency="USD")
    while rollup.shard_of(victim.id) == rollup.shard_of(control.id):  # rolling up one must not touch the other
        victim = make_account(owner.user, currency="USD")
    for account in (control, victim):
        post([used(account, "u1", at("2026-11-02 09:10:00"), "150")])
        roll(account)
        post(
            [
                used(account, "u2", at("2026-11-02 09:20:00"), "5"),
                lifecycle(account, "s", at("2026-11-02 08:00:00"), "start"),
                lifecycle(account, "x", at("2026-11-02 10:30:00"), "stop"),
            ]
        )
    roll(control)

    shard = rollup.shard_of(victim.id)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
        "PGAPPNAME": "killed-rollup",
        "DATABASE_URL": database_url(),
    }
    with connections["default"].cursor() as cursor:
        cursor.execute("BEGIN")
        # Hold the victim's egress row: the rollup blocks in the middle of its transaction.
        cursor.execute("SELECT 1 FROM metering_hourlyusage WHERE account_id = %s FOR UPDATE", [victim.id])
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "rollup_usage", "--shard", str(shard)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            reached = wait_for(lambda: backend_waiting("killed-rollup") or worker.poll() is not None, seconds=60)
            if worker.poll() is not None or not reached:
                worker.kill()
                output = worker.communicate(timeout=10)[0].decode(errors="replace")[-2000:]
                cursor.execute(
                    "SELECT pid, state, backend_xid, backend_xmin, left(query, 80) FROM pg_stat_activity "
                    "WHERE backend_xid IS NOT NULL OR backend_xmin IS NOT NULL"
                )
                raise AssertionError(f"the rollup never reached the row lock: {output!r}; {cursor.fetchall()!r}")
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            cursor.execute("ROLLBACK")
        backend_terminate("killed-rollup")
    assert wait_for(lambda: not backend_alive("killed-rollup"))
    assert hourly(victim) == {("11-02 09", "network.egress", "", "{}"): Decimal(150)}  # nothing half-written
    roll(victim)
    assert list(hourly(victim).values()) and sorted(hourly(victim).items()) == sorted(hourly(control).items())
    assert amounts(victim, "network.egress") == amounts(control, "network.egress")


def test_two_rollups_at_once_do_not_double_count(account: BillingAccount, post: Callable) -> None:
    post(
        [used(account, f"u{i}", at("2026-11-02 09:00:00") + dt.timedelta(minutes=i), "1") for i in range(50)]
        + [lifecycle(account, "s", at("2026-11-02 08:00:00"), "start")]
    )
    reports = in_threads(2, lambda _: roll(account))
    roll(account)  # whatever a busy shard left for later
    assert [type(r) for r in reports] == [rollup.RollupReport] * 2, reports
    assert hourly(account, "network.egress") == {("11-02 09", "network.egress", "", "{}"): Decimal(50)}
    # 2 vCPU from 11-02 08:00 to the watermark, 11-03 12:00: 28 hours
    assert sum(hourly(account, "compute.vcpu").values()) == 2 * 28


# --- Rating


def test_a_price_change_mid_month(account: BillingAccount, post: Callable) -> None:
    # compute.vcpu in USD: 0.0125 until 2026-10-15, 0.0110 from then on (the catalog fixture).
    post(
        [
            lifecycle(account, "s", at("2026-10-14 22:00:00"), "start"),
            lifecycle(account, "x", at("2026-10-15 02:00:00"), "stop"),
        ]
    )
    roll(account)
    assert amounts(account, "compute.vcpu") == {
        "10-14 22": Decimal("0.025"),
        "10-14 23": Decimal("0.025"),
        "10-15 00": Decimal("0.022"),
        "10-15 01": Decimal("0.022"),
    }


def test_graduated_tiers_crossing_a_boundary_inside_an_hour(account: BillingAccount, post: Callable) -> None:
    # network.egress in USD: first 100 GB free, up to 10,240 at 0.09, beyond at 0.07.
    post([used(account, "a", at("2026-11-01 08:10:00"), "60"), used(account, "b", at("2026-11-01 09:10:00"), "70")])
    roll(account)
    assert amounts(account, "network.egress") == {"11-01 08": Decimal(0), "11-01 09": Decimal("2.7")}  # 30 GB paid
    # A late 50 GB at 07:00 pushes everything after it up the tiers.
    post([used(account, "c", at("2026-11-01 07:00:00"), "50")])
    roll(account)
    assert amounts(account, "network.egress") == {
        "11-01 07": Decimal(0),
        "11-01 08": Decimal("0.9"),
        "11-01 09": Decimal("6.3"),
    }
    # Crossing 10,240 inside one hour: 10,100 GB at 10:00 → 10,090 at 0.09 minus what is left…
    post([used(account, "d", at("2026-11-01 10:20:00"), "10100")])
    roll(account)
    # cumulative before: 180 GB; after: 10,280 GB → 10,060 GB at 0.09 and 40 GB at 0.07.
    assert amounts(account, "network.egress")["11-01 10"] == Decimal("10060") * Decimal("0.09") + Decimal(40) * Decimal(
        "0.07"
    )
    # The month starts over in December.
    post([used(account, "e", at("2026-11-02 10:20:00"), "1")])
    roll(account)
    assert amounts(account, "network.egress")["11-02 10"] == Decimal("0.07")
    # Repriced hours moved the month's spend by their differences.
    assert monthly(account) == months_of(hourly_rows(account))


def test_each_month_walks_its_own_tiers_when_one_run_touches_two(account: BillingAccount, post: Callable) -> None:
    # network.egress in USD: first 100 GB of each month free. 60 GB on Oct 31, 70 GB on Nov 1,
    # rolled up in the same run: both months stay inside their free tier.
    post([used(account, "a", at("2026-10-31 23:30:00"), "60"), used(account, "b", at("2026-11-01 00:30:00"), "70")])
    roll(account)
    assert amounts(account, "network.egress") == {"10-31 23": Decimal(0), "11-01 00": Decimal(0)}
    cum = dict(
        HourlyUsage.objects.filter(account_id=account.id, sku="network.egress").values_list(
            "hour__month", "cum_quantity"
        )
    )
    assert cum == {10: Decimal(60), 11: Decimal(70)}
    # A later run in November continues November's own total: 40 GB more crosses 100 by 10.
    post([used(account, "c", at("2026-11-01 02:30:00"), "40")])
    roll(account)
    assert amounts(account, "network.egress")["11-01 02"] == Decimal("0.9")
    # The month's spend (what the credit check reads) moved with it, and only November's.
    assert monthly(account) == months_of(hourly_rows(account)) == {"2026-11": Decimal("0.9")}


def test_usage_without_a_price_in_the_currency_has_no_amount(
    catalog: None, customer: Customer, make_account: Callable, post: Callable
) -> None:
    account = make_account(customer.user, currency="EUR")
    post([used(account, "a", at("2026-11-02 08:00:00"), "3", sku="storage.object.requests")])
    roll(account)
    assert amounts(account, "storage.object.requests") == {"11-02 08": Decimal("0.00000111")}
