"""Bulk writes with PostgreSQL's COPY and ``unnest``: the set-based way to write thousands of rows.

A bulk-written table is described once (``BulkTable``): its columns' names and PostgreSQL
types, in the order of the fields of the ``NamedTuple`` rows written to it. The column
lists, the ``unnest`` arguments and an upsert's ``SET`` list are generated from that, so a
new column is one edit and two columns cannot be swapped by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


class BulkTable:
    """A table and the ``NamedTuple`` its rows are written as: ``types`` maps each of the
    tuple's fields, in order, to the column's PostgreSQL type. A field is written to the column
    of its name, or to the one ``columns`` names for it (a row type that several tables share,
    e.g. ``StateChangeRow``'s ``subject_id``, the ``payment_id`` or ``invoice_id`` column)."""

    def __init__(
        self,
        name: str,
        row: type[tuple[Any, ...]],
        types: Mapping[str, str],
        *,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        fields = tuple(getattr(row, "_fields", ()))
        if fields != tuple(types):
            raise TypeError(f"{name}: {row.__name__}'s fields {fields} are not the described columns {tuple(types)}")
        renamed = dict(columns or {})
        if not renamed.keys() <= set(fields):
            raise TypeError(f"{name}: {row.__name__} has no fields {sorted(renamed.keys() - set(fields))}")
        self.name = name
        self.row = row
        self.types = {renamed.get(field, field): kind for field, kind in types.items()}
        self.columns = tuple(self.types)

    @property
    def column_list(self) -> str:
        return ", ".join(self.columns)

    def copy(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """COPY the rows in (the fast path for plain inserts)."""
        copy_rows(self.name, self.columns, rows)

    def unnest(self, rows: Sequence[tuple[Any, ...]]) -> tuple[str, list[list[Any]]]:
        """``unnest(%s::type[], …) AS r(columns)`` and its parameters (one array per column),
        for an ``INSERT … SELECT … FROM`` that needs ``ON CONFLICT`` or ``RETURNING``."""
        arrays = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in self.columns]
        args = ", ".join(f"%s::{kind}[]" for kind in self.types.values())
        return f"unnest({args}) AS r({self.column_list})", arrays

    def excluded(self, columns: Iterable[str]) -> str:
        """``col = EXCLUDED.col, …`` for an upsert's ``SET`` list."""
        columns = list(columns)
        unknown = [column for column in columns if column not in self.types]
        if unknown:
            raise KeyError(f"{self.name} has no columns {unknown}")
        return ", ".join(f"{column} = EXCLUDED.{column}" for column in columns)


def copy_text(table: str, columns: Sequence[str], data: bytes) -> None:
    """``COPY table (columns) FROM STDIN`` of data already in COPY's text format (tab-separated,
    ``\\N`` for NULL, backslash escapes): what another engine's TabSeparated output is, passed
    through without a Python object per row."""
    with (
        connection.cursor() as cursor,
        connection.wrap_database_errors,
        cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        copy.write(data)
