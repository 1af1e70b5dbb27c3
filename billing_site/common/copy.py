"""Bulk writes with PostgreSQL's COPY: the set-based way to insert thousands of rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection


def copy_rows(table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """``COPY table (columns) FROM STDIN`` inside the current transaction. Names are ours,
    never user input; values travel as data. Errors surface as Django's (``DataError``,
    ``IntegrityError`` …), as from any other statement."""
    with (
        connection.cursor() as cursor,
        connection.wrap_database_errors,
        cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)
