"""Side effects run after the surrounding transaction commits, and carry ids only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db import transaction


def on_commit(func: Callable[..., Any], /, **kwargs: int | str | None) -> None:
    """Run ``func(**kwargs)`` once the current transaction commits (now, outside one).

    Keyword arguments only, and only plain values (ids), never model instances: the work
    may run in another process, after the rows have changed again.
    """
    transaction.on_commit(functools.partial(func, **kwargs), robust=False)
