"""Reads of the metering app."""

from __future__ import annotations

import threading
import time

from metering.models import Sku

_SKU_CACHE_SECONDS = 30.0
_sku_lock = threading.Lock()
_sku_kinds: dict[str, str] = {}
_sku_loaded_at = -1e9


def sku_kinds(*, refresh: bool = False) -> dict[str, str]:
    """SKU code → kind, cached per process for 30 s (the hot path asks per batch).

    ``refresh`` re-reads at once: a code missing from the cache may have just been loaded.
    It is rate-limited to one read a second so a stream of unknown codes cannot hammer the
    database."""
    global _sku_kinds, _sku_loaded_at
    age = time.monotonic() - _sku_loaded_at
    if age > _SKU_CACHE_SECONDS or (refresh and age > 1.0):
        with _sku_lock:
            _sku_kinds = dict(Sku.objects.values_list("code", "kind"))
            _sku_loaded_at = time.monotonic()
    return _sku_kinds


def sku_cache_clear() -> None:
    global _sku_loaded_at
    _sku_loaded_at = -1e9


def usage_event_count(*, account_id: int) -> int:
    from metering.models import UsageEvent

    return UsageEvent.objects.filter(account_id=account_id).count()
