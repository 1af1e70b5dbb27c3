"""Benchmarks (``make bench``); helpers they share."""

from __future__ import annotations

import os
import socket


def local_database_url(name: str) -> str:
    """DATABASE_URL if set, else the database ``name`` on the local PostgreSQL (127.0.0.1:5432),
    created if missing and kept between runs."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
        pass
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:5432/{name}"
