"""How long, for people: ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h`` (staff pages)."""

from __future__ import annotations

import datetime as dt


def duration_text(delta: dt.timedelta | None) -> str:
    """A duration rounded down to what matters at its size; ``-`` for none."""
    if delta is None:
        return "-"
    seconds = max(int(delta.total_seconds()), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
