"""Side effects after commit, carrying ids (see docs/architecture.md: side effects after commit)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from django.db import transaction


def on_commit(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Run ``func(*args, **kwargs)`` once the current transaction commits (at once outside one).

    Pass ids, never model instances: the callback may run in another process (a Celery task).
    A callback that fails is logged by Django and does not undo the commit or stop the others."""

    def callback() -> None:
        func(*args, **kwargs)

    # Django names a failing robust callback by its __qualname__ in the log line.
    callback.__qualname__ = getattr(func, "__qualname__", repr(func))
    transaction.on_commit(callback, robust=True)


def queue_task(name: str, /, **kwargs: Any) -> None:
    """Queue the Celery task ``name`` (``<app>.<task>``, defined in ``<app>/tasks.py``) with
    ``kwargs`` (ids) once the current transaction commits (at once outside one). By name, so
    that a service never imports the tasks that call it (no import cycle); routes, time
    limits and inline mode apply as for ``task.delay``."""
    on_commit(_send, name, kwargs)


def _send(name: str, kwargs: dict[str, Any]) -> None:
    from billing_site.celery import app

    if name not in app.tasks:  # registered when its app's tasks module is imported
        importlib.import_module(f"{name.split('.', 1)[0]}.tasks")
    app.tasks[name].apply_async(kwargs=kwargs)
