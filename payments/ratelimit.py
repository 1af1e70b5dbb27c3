"""Calls per second to one gateway, across every process that shares our Redis.

``CallRateLimiter(name, per_second).acquire()`` blocks until a call is allowed. The limit is
a fixed window keyed by the integer epoch second (``time.time()``): at most ``per_second``
calls are let through in any wall-clock second, which is how Stripe counts (100 requests a
second in live mode, 25 in test mode) and what a test can check by grouping timestamps by
second. A sliding window would be smoother, but needs a sorted set per gateway and a script;
the fixed window needs one counter.

Where the count lives:

- ``REDIS_URL`` set (or a ``redis://`` Celery broker): ``SET key 0 EX 2 NX`` then ``INCR key`` on
  ``payments:rate:<name>:<second>``, in one pipeline, so every process and thread shares the
  window. The key expires on its own; a call denied in a window still counts there (harmless: it
  only says the window is full). If Redis fails, the limiter logs a warning and uses the
  in-process window for the next 30 s before trying Redis again: payments keep flowing,
  limited per process, rather than stopping because the limiter's store is down.
- No Redis: an in-process window behind a lock, per limiter instance (``limiter_for`` hands out
  one per gateway name, so the threads of a process share it).

A denied caller sleeps until the next second starts (in steps of at most 0.25 s, re-reading
the clock each time) and tries again. The windows are keyed by each process's own clock:
processes whose clocks disagree by ``d`` can together exceed the limit within ``d`` of a
boundary (NTP keeps ``d`` to milliseconds).

A frozen clock (``time-machine`` with ``tick=False`` in a test) never reaches the next second.
So the wait is bounded in real time, measured with ``time.monotonic()`` (which time-machine does
not move): once ``frozen_clock_after`` seconds (1.5 s by default, longer than any real second)
have passed with the wall clock still in the same second, the clock is taken to be frozen and
the call goes through, with a warning logged once per limiter. A frozen clock has no seconds to
count; the limiter exists for production's real clock and must never hang a test.

``per_second <= 0`` means no limit (the test settings' ``PAYMENTS_GATEWAY_RATE_LIMIT = 0``).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

_MAX_SLEEP_SECONDS = 0.25
_KEY_TTL_SECONDS = 2  # a window's key outlives its second by one, then Redis drops it
_REDIS_RETRY_AFTER_SECONDS = 30.0


class CallRateLimiter:
    """At most ``per_second`` calls in any wall-clock second for the gateway ``name``."""

    def __init__(
        self,
        name: str,
        per_second: int,
        *,
        redis_url: str = "",
        frozen_clock_after: float = 1.5,
    ) -> None:
        self.name = name
        self.per_second = per_second
        self.redis_url = redis_url
        self.frozen_clock_after = frozen_clock_after
        self._lock = threading.Lock()
        self._second = -1  # the in-process window: which second, and how many calls in it
        self._count = 0
        self._redis: redis.Redis | None = None
        self._redis_failed_at: float | None = None  # monotonic; for 30 s after, use the local window
        self._warned_frozen = False

    def __repr__(self) -> str:
        store = "redis" if self.redis_url else "local"
        return f"CallRateLimiter({self.name!r}, per_second={self.per_second}, {store})"

    def acquire(self) -> None:
        """Return once a call is allowed in the current second (at once when there is no limit)."""
        if self.per_second <= 0:
            return
        waiting_since = time.monotonic()
        first_second: int | None = None
        while True:
            now = time.time()
            second = int(now)
            if self._take(second):
                return
            if first_second is None:
                first_second = second
            elif second == first_second and time.monotonic() - waiting_since >= self.frozen_clock_after:
                if not self._warned_frozen:
                    self._warned_frozen = True
                    log.warning(
                        "payments.rate_limit_frozen_clock",
                        extra={"limiter": self.name, "second": second, "per_second": self.per_second},
                    )
                return
            elif second != first_second:
                # The clock moved on (a later second that is also full): wait afresh.
                first_second, waiting_since = second, time.monotonic()
            time.sleep(min(max(second + 1 - now, 0.001), _MAX_SLEEP_SECONDS))

    # --- the windows

    def _take(self, second: int) -> bool:
        """Count one call in ``second``'s window; whether it fits under the limit."""
        failed_at = self._redis_failed_at
        if self.redis_url and (failed_at is None or time.monotonic() - failed_at > _REDIS_RETRY_AFTER_SECONDS):
            try:
                return self._take_shared(second)
            except Exception as exc:  # any Redis failure: limit locally rather than stop paying
                self._redis_failed_at = time.monotonic()
                log.warning("payments.rate_limit_redis_down", extra={"limiter": self.name, "error": repr(exc)[:200]})
        return self._take_local(second)

    def _take_local(self, second: int) -> bool:
        with self._lock:
            if second != self._second:
                self._second, self._count = second, 0
            if self._count >= self.per_second:
                return False
            self._count += 1
            return True

    def _take_shared(self, second: int) -> bool:
        client = self._client()
        key = f"payments:rate:{self.name}:{second}"
        pipe = client.pipeline(transaction=True)
        pipe.set(key, 0, ex=_KEY_TTL_SECONDS, nx=True)
        pipe.incr(key)
        _, count = pipe.execute()
        return int(count) <= self.per_second

    def _client(self) -> redis.Redis:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return self._redis


def _shared_redis_url() -> str:
    from django.conf import settings

    url = str(getattr(settings, "REDIS_URL", "") or "")
    if url:
        return url
    broker = str(getattr(settings, "CELERY_BROKER_URL", "") or "")
    return broker if broker.startswith(("redis://", "rediss://")) else ""


def limiter_for(name: str) -> CallRateLimiter:
    """The limiter of gateway ``name`` per ``PAYMENTS_GATEWAY_RATE_LIMIT``, one per process (so
    its threads share the in-process window); read again on each call, so a test that changes
    the setting gets a limiter with the new limit."""
    from django.conf import settings

    return _limiter(name, int(settings.PAYMENTS_GATEWAY_RATE_LIMIT), _shared_redis_url())


@lru_cache(maxsize=64)
def _limiter(name: str, per_second: int, redis_url: str) -> CallRateLimiter:
    return CallRateLimiter(name, per_second, redis_url=redis_url)
