"""Whether code runs inside a database transaction of ours.

The rule "never call a gateway (or any network service) inside a transaction" is enforced
at run time by the gateways and the outbox's deliverer. Tests wrap each test in a transaction
of Django's ``TestCase`` machinery, which is not one of ours: those blocks are ignored here, as
Django ignores them for ``atomic(durable=True)``."""

from __future__ import annotations

from django.db import connection


def in_transaction() -> bool:
    return any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def forbid_transaction(what: str) -> None:
    """Raise if called inside a transaction of ours (a network call would hold its locks)."""
    if in_transaction():
        raise RuntimeError(f"{what} is never done inside a database transaction.")


def require_transaction(what: str) -> None:
    """Raise unless called inside a transaction (the write must commit with its cause)."""
    if not connection.in_atomic_block:
        raise RuntimeError(f"{what} is written in the transaction of the change that causes it.")
