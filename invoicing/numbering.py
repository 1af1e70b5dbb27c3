"""Gapless document numbers: ``INV-2026-000001``, ``CN-2026-000001``.

A number is taken in the transaction that issues the document, by one
``INSERT … ON CONFLICT DO UPDATE … RETURNING`` on the series' row for the year. The row lock
makes concurrent issuers wait for each other; a rollback returns the numbers with the rest of
the transaction. So numbers are strictly increasing and have neither gaps nor duplicates.
"""

from __future__ import annotations

from django.db import connection


def take(series: str, year: int, count: int = 1) -> list[str]:
    """The next ``count`` numbers of ``series`` for ``year``, in order. Must run inside the
    transaction that issues the documents (the lock is held until it ends)."""
    if count < 1:
        return []
    assert connection.in_atomic_block, "numbers must be taken inside the issuing transaction"
    with connection.cursor() as cur:
        cur.execute(
            """
            INSERT INTO invoicing_documentsequence (series, year, last_number) VALUES (%s, %s, %s)
            ON CONFLICT (series, year)
            DO UPDATE SET last_number = invoicing_documentsequence.last_number + EXCLUDED.last_number
            RETURNING last_number
            """,
            [series, year, count],
        )
        (last,) = cur.fetchone()
    first = last - count + 1
    return [f"{series}-{year}-{n:06d}" for n in range(first, last + 1)]
