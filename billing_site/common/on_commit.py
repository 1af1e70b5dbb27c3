"""Side effects after commit, carrying ids (see docs/architecture.md: side effects after commit)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from django.db import transaction


def on_commit(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Run ``func(*args, **kwargs)`` once the current transaction commits (at once outside one).

    Pass ids, never model instances: the callback may run in another process (a Celery task)."""
    transaction.on_commit(partial(func, *args, **kwargs), robust=True)
