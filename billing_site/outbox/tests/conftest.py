"""A receiver whose every run leaves a row: the outbox's tests count deliveries by what they
did in the database, not by whether a function was called.

``outbox_tests.record`` is a Celery task registered for the test only (and unregistered after,
so the project's task list stays what ``billing_site/celery.py`` declares). Each run inserts a
row into ``outbox_test_delivery`` with its Celery task id and its keyword arguments; the table
has no unique key, so a message delivered twice shows up twice. ``outbox_test_order`` is a
state change that commits together with the messages it owes. Both tables exist for the test
only (the outbox app imports no other app, so its tests bring their own state)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection, connections

RECORD = "outbox_tests.record"

TABLES = (
    "CREATE TABLE outbox_test_order (id bigint PRIMARY KEY, state text NOT NULL)",
    "CREATE TABLE outbox_test_delivery (id bigserial PRIMARY KEY, task_id text NOT NULL, payload jsonb NOT NULL)",
)


@dataclass
class Hold:
    """Makes a run of the task with ``hold=True`` wait, inside the delivery, until released."""

    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


@dataclass
class Receiver:
    hold: Hold
    registered: list[str]

    def deliveries(self) -> list[tuple[str, dict[str, Any]]]:
        """(Celery task id, keyword arguments) of every run, in the order they ran."""
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT task_id, payload FROM outbox_test_delivery ORDER BY id")
            return [
                (task_id, payload if isinstance(payload, dict) else json.loads(payload)) for task_id, payload in cursor
            ]

    def register(self, name: str) -> None:
        """Register the recording task under ``name`` too (a deploy that brings a task)."""
        from billing_site.celery import app

        hold = self.hold

        def record(task: Any, **payload: Any) -> None:
            if payload.get("hold"):
                hold.entered.set()
                assert hold.released.wait(60), "the test never released the held delivery"
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO outbox_test_delivery (task_id, payload) VALUES (%s, %s::jsonb)",
                    [task.request.id, json.dumps(payload, sort_keys=True)],
                )

        app.task(name=name, bind=True)(record)
        self.registered.append(name)


@pytest.fixture
def receiver(transactional_db: None) -> Iterator[Receiver]:
    from billing_site.celery import app

    with connection.cursor() as cursor:
        for ddl in TABLES:
            cursor.execute(ddl)
    found = Receiver(hold=Hold(), registered=[])
    try:
        found.register(RECORD)
        yield found
    finally:
        found.hold.released.set()
        for name in found.registered:
            app.tasks.unregister(name)
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS outbox_test_delivery, outbox_test_order")
