"""Calls per second to one gateway, across every process that shares our Redis.

``CallRateLimiter(name, per_second).acquire()`` blocks until a call is allowed. Calls are let
through evenly spaced, one every ``1 / per_second`` seconds (the generic cell rate algorithm,
with no burst): each caller reserves the next free turn and sleeps until it comes, so callers
queue instead of polling. Spaced calls keep
every window of one second, wherever it starts, at ``per_second`` or fewer: also at the
gateway, which counts them when they arrive there, a latency later (a fixed window keyed by
our second let a second at the gateway take the end of one window and the start of the next:
124 calls in a second under a limit of 100 in the benchmark). Stripe allows 100 requests a
second in live mode, 25 in test mode. The pace is 97 % of the limit (``PACE``), the margin for
latencies that differ by a few milliseconds.

A turn reserved is not yet a call let through: the caller sleeps until its turn and may wake
late (a process busy with other Python work holds the GIL; a loaded machine schedules it late),
and late callers bunch with those on time, so that the calls that actually leave in some second
exceed the limit though every turn was on time (104 in a second at the sandbox under a limit of
100, at load 10). So, on waking, the call is let through only if fewer than ``per_second``
calls left in the last second (a log of departures, shared like the schedule); otherwise it
waits until the oldest of them is a second old. ``acquire()`` returns the moment the call was
let through, on the limiter's clock (epoch seconds): the moment the request leaves.

Where the arrival time lives:

- ``REDIS_URL`` set (or a ``redis://`` Celery broker): one key per gateway,
  ``payments:gcra:<name>``, advanced by a Lua script on Redis's own clock (``TIME``), so every
  process and thread shares one schedule and the processes' clocks never matter. If Redis fails,
  the limiter logs a warning and spaces the calls of this process alone for the next 30 s before
  trying Redis again: payments keep flowing rather than stopping because the limiter's store is
  down.
- No Redis: the same schedule in the process, behind a lock, per limiter instance
  (``limiter_for`` hands out one per gateway name, so the threads of a process share it).

Both schedules run on clocks a test's frozen wall clock does not stop (Redis's, and
``time.monotonic()``), so a test with ``time-machine`` never hangs here.

``per_second <= 0`` means no limit (the test settings' ``PAYMENTS_GATEWAY_RATE_LIMIT = 0``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

_REDIS_RETRY_AFTER_SECONDS = 30.0
# Calls are paced at 97 % of the limit: a call reaches the gateway a latency after its turn, and
# latencies differ by milliseconds, so a few calls of one second can land in the next. At full
# pace the benchmark saw 102 in a second under a limit of 100; at 97 % none went over.
PACE = 0.97

# KEYS[1]: the gateway's next free turn (microseconds, Redis's clock); ARGV[1]: the interval in
# microseconds. Reserves the next turn and returns how many microseconds until it comes.
# KEYS[1]: the gateway's departures of the last second (a sorted set scored by microseconds,
# Redis's clock); ARGV[1]: the limit; ARGV[2]: a member unique to this call. Lets the call
# through (returns {0, now}) if fewer than the limit left in the last second, else returns
# {microseconds until the oldest of them is a second old, now}.
_DEPART = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 1000000)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], now, ARGV[2])
    redis.call('PEXPIRE', KEYS[1], 2000)
    return {0, now}
end
local oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
return {oldest + 1000000 - now + 1, now}
"""

_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local turn = tonumber(redis.call('GET', KEYS[1]) or '0')
if turn < now then
    turn = now
end
redis.call('SET', KEYS[1], turn + interval, 'PX', math.ceil((turn + interval - now) / 1000) + 1000)
return turn - now
"""


class CallRateLimiter:
    """At most ``per_second`` calls in any second for the gateway ``name``, evenly spaced."""

    def __init__(self, name: str, per_second: int, *, redis_url: str = "") -> None:
        self.name = name
        self.per_second = per_second
        self.redis_url = redis_url
        self._interval = 1.0 / (per_second * PACE) if per_second > 0 else 0.0
        self._lock = threading.Lock()
        self._next_at = 0.0  # the in-process schedule: the next free turn (monotonic)
        self.calls_local = 0  # calls let through by the in-process schedule
        self._redis: redis.Redis | None = None
        self._script: Any = None
        self._depart_script: Any = None
        self._departures: collections.deque[float] = collections.deque()  # the local log (monotonic)
        self._serial = itertools.count()
        self._redis_failed_at: float | None = None  # monotonic; for 30 s after, the local schedule

    def __repr__(self) -> str:
        store = "redis" if self.redis_url else "local"
        return f"CallRateLimiter({self.name!r}, per_second={self.per_second}, {store})"

    def acquire(self) -> float:
        """Return once the call may leave: its turn has come and fewer than ``per_second``
        calls left in the last second. Returns that moment (epoch seconds); at once when
        there is no limit."""
        if self.per_second <= 0:
            return time.time()
        wait = self._reserve()
        while True:
            if wait > 0:
                time.sleep(wait)
            wait, left_at = self._depart()
            if wait <= 0:
                return left_at

    # --- the schedules

    def _reserve(self) -> float:
        """Reserve the next free turn: how many seconds until it comes (0: now)."""
        failed_at = self._redis_failed_at
        if self.redis_url and (failed_at is None or time.monotonic() - failed_at > _REDIS_RETRY_AFTER_SECONDS):
            try:
                return self._reserve_shared()
            except Exception as exc:  # any Redis failure: limit locally rather than stop paying
                self._redis_failed_at = time.monotonic()
                log.warning("payments.rate_limit_redis_down", extra={"limiter": self.name, "error": repr(exc)[:200]})
        return self._reserve_local()

    def _depart(self) -> tuple[float, float]:
        """(0, the moment it leaves) if the call may leave now, else (seconds to wait, now)."""
        failed_at = self._redis_failed_at
        if self.redis_url and (failed_at is None or time.monotonic() - failed_at > _REDIS_RETRY_AFTER_SECONDS):
            try:
                return self._depart_shared()
            except Exception as exc:  # as _reserve: limit locally rather than stop paying
                self._redis_failed_at = time.monotonic()
                log.warning("payments.rate_limit_redis_down", extra={"limiter": self.name, "error": repr(exc)[:200]})
        return self._depart_local()

    def _depart_local(self) -> tuple[float, float]:
        with self._lock:
            now = time.monotonic()
            while self._departures and self._departures[0] <= now - 1.0:
                self._departures.popleft()
            if len(self._departures) < self.per_second:
                self._departures.append(now)
                return 0.0, time.time()
            return self._departures[0] + 1.0 - now + 1e-6, time.time()

    def _depart_shared(self) -> tuple[float, float]:
        if self._depart_script is None:
            self._depart_script = self._client().register_script(_DEPART)
        member = f"{os.getpid()}:{threading.get_ident()}:{next(self._serial)}"
        wait_us, now_us = self._depart_script(keys=[f"payments:departures:{self.name}"], args=[self.per_second, member])
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def _reserve_local(self) -> float:
        with self._lock:
            now = time.monotonic()
            turn = max(self._next_at, now)
            self._next_at = turn + self._interval
            self.calls_local += 1
            return turn - now

    def _reserve_shared(self) -> float:
        if self._script is None:
            self._script = self._client().register_script(_GCRA)
        wait_us = int(self._script(keys=[f"payments:gcra:{self.name}"], args=[round(self._interval * 1_000_000)]))
        return wait_us / 1_000_000

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
    its threads share the in-process schedule); read again on each call, so a test that changes
    the setting gets a limiter with the new limit."""
    from django.conf import settings

    return _limiter(name, int(settings.PAYMENTS_GATEWAY_RATE_LIMIT), _shared_redis_url())


@lru_cache(maxsize=64)
def _limiter(name: str, per_second: int, redis_url: str) -> CallRateLimiter:
    return CallRateLimiter(name, per_second, redis_url=redis_url)
