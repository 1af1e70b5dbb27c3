"""The shape every "what is waiting" read returns (the outbox, webhook events, payments in a
state, the fraud queue): how many, and since when the oldest waits. The staff home page and
``/metrics`` read them through each app's selectors."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int
    oldest_at: dt.datetime | None

    def age(self, now: dt.datetime) -> dt.timedelta | None:
        """How long the oldest has waited (None when nothing waits)."""
        return None if self.oldest_at is None else max(now - self.oldest_at, dt.timedelta(0))

    @classmethod
    def of(cls, row: dict[str, object]) -> Backlog:
        """From ``aggregate(count=Count(...), oldest_at=Min(...))``."""
        count, oldest = row["count"], row["oldest_at"]
        assert isinstance(count, int) and (oldest is None or isinstance(oldest, dt.datetime))
        return cls(count=count, oldest_at=oldest)
