"""Billing periods: calendar months in UTC, and how far back an invoice may adjust usage."""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

from django.conf import settings

from billing_site.common.errors import ApplicationError


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar month in UTC."""

    start: dt.date

    @classmethod
    def parse(cls, text: str) -> Period:
        try:
            start = dt.datetime.strptime(text, "%Y-%m").date()
        except ValueError as exc:
            raise ApplicationError("invalid", f"'{text}' is not a month (YYYY-MM).", field="period") from exc
        return cls(start)

    @classmethod
    def containing(cls, moment: dt.datetime) -> Period:
        moment = moment.astimezone(dt.UTC)
        return cls(dt.date(moment.year, moment.month, 1))

    @property
    def end(self) -> dt.date:
        days = calendar.monthrange(self.start.year, self.start.month)[1]
        return self.start + dt.timedelta(days=days)

    @property
    def start_at(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time(), tzinfo=dt.UTC)

    @property
    def end_at(self) -> dt.datetime:
        return dt.datetime.combine(self.end, dt.time(), tzinfo=dt.UTC)

    @property
    def previous(self) -> Period:
        return Period.containing(self.start_at - dt.timedelta(days=1))

    @property
    def label(self) -> str:
        return f"{self.start:%Y-%m}"

    def __str__(self) -> str:
        return self.label


def lookback_start(period: Period) -> dt.date:
    """The first month whose late usage ``period``'s invoice may still pick up: events older
    than ``METERING_MAX_EVENT_AGE_DAYS`` are refused at ingestion, so none can be later."""
    earliest = period.start - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)
    return dt.date(earliest.year, earliest.month, 1)
