"""The Celery broker as on call sees it: is one configured, does it answer, how many messages
wait in each of our queues (``billing_site.celery.QUEUES``). With no broker configured
(``CELERY_BROKER_URL``/``REDIS_URL`` unset) tasks run inline and there is nothing to ask."""

from __future__ import annotations

import redis
from django.conf import settings

# kombu's Redis transport keeps a queue's messages of priority p > 0 in the list
# ``<queue>\x06\x16<p>`` beside ``<queue>`` itself (its default priority steps: 0, 3, 6, 9).
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
TIMEOUT_SECONDS = 2.0


def configured() -> bool:
    return not settings.CELERY_TASK_ALWAYS_EAGER and not settings.CELERY_BROKER_URL.startswith("memory://")


def _redis() -> redis.Redis | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS)


def ping() -> str | None:
    """None if the broker answers, else why not (for /readyz)."""
    client = _redis()
    try:
        if client is not None:
            client.ping()
            return None
        from billing_site.celery import app

        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=TIMEOUT_SECONDS)
        return None
    except Exception as exc:  # any failure to reach it is the answer
        return f"{type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            client.close()


def queue_lengths() -> dict[str, int] | None:
    """Messages waiting in each queue (all priorities), in one round trip; None without a
    configured Redis broker. Raises if the broker does not answer."""
    if not configured():
        return None
    client = _redis()
    if client is None:
        return None
    from billing_site.celery import QUEUES

    try:
        pipe = client.pipeline(transaction=False)
        for name in QUEUES:
            pipe.llen(name)
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{name}{_PRIORITY_SEP}{step}")
        counts = pipe.execute()
    finally:
        client.close()
    per = 1 + len(_PRIORITY_STEPS)
    return {name: sum(counts[i * per : (i + 1) * per]) for i, name in enumerate(QUEUES)}
