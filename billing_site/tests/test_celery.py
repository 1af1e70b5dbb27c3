"""The beat schedule of the period close: last month is closed on the 1st once
``INVOICING_GRACE_MINUTES`` after midnight UTC have passed, and retried on the 2nd and 3rd;
a grace longer than the day is waited out by the task. Times are frozen; Celery's own
``remaining_estimate`` and ``is_due`` say when the entry fires."""

from __future__ import annotations

import datetime as dt

import pytest
import time_machine
from celery.schedules import crontab
from django.conf import settings

from billing_site.celery import app, period_close_schedule
from invoicing.tasks import close_last_period

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def next_run(schedule: crontab, last_run_at: dt.datetime) -> dt.datetime:
    """When beat runs the entry next after a run at ``last_run_at``, asked at that moment."""
    with time_machine.travel(last_run_at, tick=False):
        return last_run_at + schedule.remaining_estimate(last_run_at)


def test_the_beat_entry_is_the_period_close_schedule_of_the_setting_in_utc() -> None:
    entry = app.conf.beat_schedule["invoicing-close-last-period"]
    assert entry["task"] == "invoicing.close_last_period"
    assert entry["schedule"] == period_close_schedule(settings.INVOICING_GRACE_MINUTES)
    assert entry["options"]["expires"] > 0
    assert str(app.timezone) == "UTC" and str(entry["schedule"].tz) == "UTC"  # midnight is UTC's


@pytest.mark.parametrize(
    ("grace", "fires_at"),
    [
        (0, "00:00"),  # at midnight
        (1, "00:01"),
        (59, "00:59"),
        (60, "01:00"),
        (120, "02:00"),  # the default
        (1439, "23:59"),  # the last minute of the day
        (1440, "23:59"),  # a day or more: the 1st's last minute, the task waits out the rest
        (4000, "23:59"),
    ],
)
@pytest.mark.parametrize(
    ("start", "days"),
    [
        ("2026-11-15 12:00:00", ["2026-12-01", "2026-12-02", "2026-12-03", "2027-01-01"]),  # across a year end
        ("2028-02-29 00:00:00", ["2028-03-01", "2028-03-02", "2028-03-03", "2028-04-01"]),  # from a leap day
        ("2027-01-31 23:59:59", ["2027-02-01", "2027-02-02", "2027-02-03", "2027-03-01"]),
    ],
)
def test_the_close_fires_on_the_1st_to_the_3rd_at_the_grace_after_midnight(
    grace: int, fires_at: str, start: str, days: list[str]
) -> None:
    schedule = period_close_schedule(grace)
    runs, moment = [], at(start)
    for _ in days:
        moment = next_run(schedule, moment)
        runs.append(moment)
    assert runs == [at(f"{day} {fires_at}:00") for day in days]


@pytest.mark.parametrize(
    ("grace", "last_run_at", "moment", "due"),
    [
        (120, "2026-11-03 02:00:00", "2026-12-01 00:00:00", False),  # midnight: the grace has just begun
        (120, "2026-11-03 02:00:00", "2026-12-01 01:59:59", False),
        (120, "2026-11-03 02:00:00", "2026-12-01 02:00:00", True),
        (120, "2026-11-03 02:00:00", "2026-12-01 02:00:59", True),
        (120, "2026-12-02 02:00:00", "2026-12-03 02:00:00", True),  # the last retry
        (120, "2026-12-03 02:00:00", "2026-12-04 02:00:00", False),  # no fourth day
        (0, "2026-11-03 00:00:00", "2026-11-30 23:59:59", False),  # the month is not over yet
        (0, "2026-11-03 00:00:00", "2026-12-01 00:00:00", True),
        (1439, "2026-11-03 23:59:00", "2026-12-01 23:58:59", False),
        (1439, "2026-11-03 23:59:00", "2026-12-01 23:59:00", True),
        (1440, "2026-11-03 23:59:00", "2026-12-01 23:59:00", True),
    ],
)
def test_is_due_at_the_edges_of_the_grace(grace: int, last_run_at: str, moment: str, due: bool) -> None:
    schedule, now = period_close_schedule(grace), at(moment)
    with time_machine.travel(now, tick=False):
        state = schedule.is_due(at(last_run_at))
    assert state.is_due is due
    if not due:  # beat looks again exactly when the entry is due, not later
        assert state.next == (next_run(schedule, at(last_run_at)) - now).total_seconds()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("grace", "moment", "closes"),
    [
        (120, "2026-12-01 01:59:59", False),  # run by hand before the grace is over: it waits
        (120, "2026-12-01 02:00:00", True),
        (0, "2026-12-01 00:00:00", True),
        (1440, "2026-12-01 23:59:00", False),  # beat's first run of a day's grace: too early
        (1440, "2026-12-02 23:59:00", True),  # the retry on the 2nd closes it
        (2880, "2026-12-03 23:59:00", True),  # two days: the last retry
    ],
)
def test_the_task_closes_last_month_only_once_the_grace_is_over(
    settings: object, grace: int, moment: str, closes: bool
) -> None:
    settings.INVOICING_GRACE_MINUTES = grace  # type: ignore[attr-defined]
    with time_machine.travel(at(moment), tick=False):
        summary = close_last_period()
    assert summary.startswith("2026-11: ")
    if closes:  # the close ran (inline in the tests; queued by shard with a broker)
        assert "grace time" not in summary and ("issued" in summary or "queued" in summary), summary
    else:
        grace_over = at("2026-12-01 00:00:00") + dt.timedelta(minutes=grace)
        assert summary == f"2026-11: grace time runs until {grace_over.isoformat()}"
