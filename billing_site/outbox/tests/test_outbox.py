"""The outbox's promises, against the real PostgreSQL, with commits that really commit:

- a side effect written in a transaction that rolls back never happens;
- one committed with its state change happens even if the process dies right after COMMIT
  (the drain delivers it), and exactly once however many drains run, at once or in turn;
- a delivery that fails is kept with its error, retried by the next drain, and holds up
  nothing behind it;
- a dedupe key stores and delivers a side effect once;
- an email is rendered from its templates and carries a Message-ID that is the outbox id's.

Deliveries are counted by what they did: the receiver task (``conftest.py``) writes a row per
run, with its Celery task id, and emails land in Django's locmem outbox (one per send; the
threads of a test share it). Tasks run inline (``CELERY_TASK_ALWAYS_EAGER``): ``deliver``
sends them with ``apply_async(task_id="outbox-<id>")``, so the row carries that id.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import time_machine
from django.core import mail
from django.db import connection, connections, transaction
from django.test import override_settings
from django.utils import timezone

from billing_site.outbox import services as outbox
from billing_site.outbox.models import OutboxKind, OutboxMessage
from billing_site.outbox.tests.conftest import RECORD, Receiver
from conftest import ROOT, database_url, in_threads

# Under billing_site so that ``_send`` imports billing_site.tasks and then finds no such task:
# a message written by a newer release than the worker's, until the worker is deployed.
LATE = "billing_site.outbox_tests_late"
PAYMENT_FAILED = "payments/email/payment_failed"
FAILED_CONTEXT = {
    "account_name": "Acme BV",
    "amount": "EUR 12.34",
    "invoice_number": "INV-T-0042",
    "due_at": "the due date",
    "message": "The card was declined.",
    "will_retry": True,
    "account_id": 7001,
    "invoice_id": 42,
}


class _ProcessDied(Exception):
    pass


def _die() -> None:
    raise _ProcessDied


@contextmanager
def committed_without_delivery() -> Iterator[None]:
    """A transaction that commits and then loses its on-commit work, as a process that dies
    right after COMMIT loses it: a non-robust on-commit callback registered first raises, and
    Django runs none of the callbacks after it (the outbox's prompt delivery among them). The
    rows are committed. ``test_a_process_killed_right_after_commit_…`` kills a real process."""
    with pytest.raises(_ProcessDied), transaction.atomic(durable=True):
        transaction.on_commit(_die)
        yield


def pending() -> list[OutboxMessage]:
    return list(OutboxMessage.objects.filter(delivered_at__isnull=True).order_by("id"))


def order_create(order_id: int, state: str = "active") -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO outbox_test_order (id, state) VALUES (%s, %s)", [order_id, state])


def order_state(order_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT state FROM outbox_test_order WHERE id = %s", [order_id])
        return str(cursor.fetchone()[0])


def order_suspend(order_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE outbox_test_order SET state = 'suspended' WHERE id = %s", [order_id])


def message_ids() -> list[str]:
    return [sent.message()["Message-ID"] for sent in mail.outbox]


# --- 1. Rolled back: never delivered


@pytest.mark.django_db(transaction=True)
def test_a_side_effect_written_in_a_transaction_that_rolls_back_never_happens(receiver: Receiver) -> None:
    order_create(1)
    with pytest.raises(RuntimeError, match="the state change failed"), transaction.atomic(durable=True):
        order_suspend(1)
        outbox.enqueue_task(RECORD, order_id=1)
        outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT, account_id=1)
        raise RuntimeError("the state change failed")

    assert order_state(1) == "active"
    assert not OutboxMessage.objects.exists()
    assert outbox.drain() == 0
    assert receiver.deliveries() == []
    assert mail.outbox == []


@pytest.mark.django_db(transaction=True)
def test_a_side_effect_in_a_savepoint_that_rolls_back_never_happens_while_the_rest_commits(
    receiver: Receiver,
) -> None:
    with transaction.atomic(durable=True):
        kept = outbox.enqueue_task(RECORD, step="kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            outbox.enqueue_task(RECORD, step="undone")
            outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT)
            raise RuntimeError("this step failed")

    # The commit delivered what it kept, at once; the savepoint's messages were never written.
    assert list(OutboxMessage.objects.values_list("id", flat=True)) == [kept]
    assert receiver.deliveries() == [(f"outbox-{kept}", {"step": "kept"})]
    assert outbox.drain() == 0
    assert mail.outbox == []


@pytest.mark.django_db(transaction=True)
def test_a_committed_side_effect_is_delivered_at_once_after_commit_not_before(receiver: Receiver) -> None:
    order_create(1)
    with transaction.atomic(durable=True):
        order_suspend(1)
        message_id = outbox.enqueue_task(RECORD, order_id=1)
        assert receiver.deliveries() == []  # nothing leaves before COMMIT

    assert receiver.deliveries() == [(f"outbox-{message_id}", {"order_id": 1})]
    message = OutboxMessage.objects.get(id=message_id)
    assert (message.kind, message.name, message.attempts, message.last_error) == (OutboxKind.TASK, RECORD, 1, "")
    assert message.delivered_at is not None and message.leased_until is None
    assert outbox.drain() == 0
    assert len(receiver.deliveries()) == 1


@pytest.mark.django_db(transaction=True)
def test_the_outbox_is_written_only_in_a_transaction_and_delivered_only_outside_one(receiver: Receiver) -> None:
    with pytest.raises(RuntimeError, match="in the transaction"):
        outbox.enqueue_task(RECORD, n=1)
    with pytest.raises(RuntimeError, match="in the transaction"):
        outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT)
    with pytest.raises(RuntimeError, match="never done inside a database transaction"), transaction.atomic():
        outbox.drain()
    assert not OutboxMessage.objects.exists()


# --- 2. A crash between COMMIT and delivery: the drain delivers, once

# The child commits a state change and the two side effects it owes, in one transaction, and
# SIGKILLs itself in its first on-commit callback: after COMMIT, before the outbox's own
# on-commit delivery (registered after it) could run. Its clock is the test's.
CRASHING_CHILD = """
import os, signal, sys, time_machine
time_machine.travel(sys.argv[1], tick=False).start()
import django
django.setup()
from django.db import connection, transaction
from billing_site.outbox import services as outbox
order_id = int(sys.argv[2])
with transaction.atomic(durable=True):
    transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
    with connection.cursor() as cursor:
        cursor.execute("UPDATE outbox_test_order SET state = 'suspended' WHERE id = %s", [order_id])
    outbox.enqueue_task("outbox_tests.record", order_id=order_id, dedupe_key=f"suspend:{order_id}")
    outbox.enqueue_email(
        "payments/email/payment_failed", to="ap@crash.test", account_id=order_id,
        context={"account_name": "Crash BV", "invoice_number": "INV-T-1"}, dedupe_key=f"mail:{order_id}",
    )
sys.exit("not reached: killed right after COMMIT")
"""


@pytest.mark.django_db(transaction=True)
def test_a_process_killed_right_after_commit_loses_nothing_and_the_drain_delivers_once(
    receiver: Receiver,
) -> None:
    from billing_site.celery import app

    app.loader.import_default_modules()  # billing_site.tasks, as a worker loads it
    outbox_drain = app.tasks["billing_site.outbox_drain"]
    order_create(77)
    env = {**os.environ, "DATABASE_URL": database_url(), "DJANGO_SETTINGS_MODULE": "billing_site.settings.test"}
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, dt.datetime.now(dt.UTC).isoformat(), "77"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    # Committed together: the state change and both messages, none of them delivered.
    assert order_state(77) == "suspended"
    task, email = pending()
    assert (task.kind, task.name, task.payload, task.attempts) == (OutboxKind.TASK, RECORD, {"order_id": 77}, 0)
    assert (email.kind, email.name, email.account_id, email.attempts) == (OutboxKind.EMAIL, PAYMENT_FAILED, 77, 0)
    assert receiver.deliveries() == []
    assert mail.outbox == []

    assert outbox_drain.delay().get() == 2  # the periodic task, as beat sends it
    assert receiver.deliveries() == [(f"outbox-{task.id}", {"order_id": 77})]
    assert [sent.to for sent in mail.outbox] == [["ap@crash.test"]]
    assert message_ids()[0].startswith(f"<outbox-{email.id}@")
    assert pending() == []

    assert outbox_drain.delay().get() == 0  # nothing twice
    assert len(receiver.deliveries()) == 1
    assert len(mail.outbox) == 1


# --- 3. Drains at once: each message exactly once


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("drains", [2, 4])
def test_drains_started_together_deliver_every_message_exactly_once(receiver: Receiver, drains: int) -> None:
    with committed_without_delivery():
        tasks = outbox.enqueue_tasks(RECORD, [{"n": n} for n in range(150)])
        emails = [
            outbox.enqueue_email(PAYMENT_FAILED, to=f"ap{n}@acme.test", context=FAILED_CONTEXT) for n in range(30)
        ]
    assert len(pending()) == 180

    # Each thread has its own connection; small batches make the drains take turns leasing.
    sent = in_threads(drains, lambda _: outbox.drain(batch=7))
    assert all(isinstance(count, int) for count in sent), sent
    assert sum(sent) == 180

    runs = Counter(task_id for task_id, _ in receiver.deliveries())
    assert runs == Counter({f"outbox-{message_id}": 1 for message_id in tasks})
    mailed = Counter(message_id.partition("@")[0] for message_id in message_ids())
    assert mailed == Counter({f"<outbox-{message_id}": 1 for message_id in emails})
    assert pending() == []
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}
    assert outbox.drain() == 0


def run_in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """``work()`` in a thread with its own database connection; its result in the list."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(work())
        except Exception as exc:  # returned to the test
            result.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.django_db(transaction=True)
def test_a_drain_skips_what_another_drain_has_leased_and_is_delivering(receiver: Receiver) -> None:
    with committed_without_delivery():
        held = outbox.enqueue_task(RECORD, hold=True)
        rest = outbox.enqueue_tasks(RECORD, [{"n": n} for n in range(9)])

    # The first drain leases [held, rest[0], rest[1]] and stops inside the delivery of `held`.
    first, first_sent = run_in_thread(lambda: outbox.drain(batch=3))
    try:
        assert receiver.hold.entered.wait(30), first_sent
        assert outbox.drain(batch=3) == 7  # the second drain: everything but the leased three
        assert Counter(task_id for task_id, _ in receiver.deliveries()) == Counter(
            {f"outbox-{message_id}": 1 for message_id in rest[2:]}
        )
    finally:
        receiver.hold.released.set()
        first.join(60)
    assert first_sent == [3]

    runs = Counter(task_id for task_id, _ in receiver.deliveries())
    assert runs == Counter({f"outbox-{message_id}": 1 for message_id in [held, *rest]})
    assert pending() == []


# --- 4. A failing delivery: kept, recorded, retried, blocking nothing


@pytest.mark.django_db(transaction=True)
def test_a_failing_delivery_is_kept_with_its_error_retried_and_blocks_nothing(receiver: Receiver) -> None:
    with committed_without_delivery():
        first = outbox.enqueue_task(RECORD, n=1)
        late = outbox.enqueue_task(LATE, n=2)
        broken = outbox.enqueue_email("outbox_tests/no_such_template", to="ap@acme.test", context={})
        last = outbox.enqueue_task(RECORD, n=3)

    assert outbox.drain() == 2
    assert receiver.deliveries() == [(f"outbox-{first}", {"n": 1}), (f"outbox-{last}", {"n": 3})]
    assert mail.outbox == []
    kept = {message.id: message for message in pending()}
    assert set(kept) == {late, broken}
    assert kept[late].attempts == 1 and kept[late].last_error.startswith("NotRegistered:")
    assert LATE in kept[late].last_error
    assert kept[broken].attempts == 1
    assert kept[broken].last_error == "TemplateDoesNotExist: outbox_tests/no_such_template_subject.txt"
    assert all(message.leased_until is None for message in kept.values())  # nobody is delivering them
    start = timezone.now()
    assert all(start < message.next_attempt_at <= start + dt.timedelta(seconds=15) for message in kept.values())

    assert outbox.drain() == 0  # backing off: the next drain leaves them
    assert {message.id: message.attempts for message in pending()} == {late: 1, broken: 1}
    with time_machine.travel(start + dt.timedelta(seconds=16)):
        assert outbox.drain() == 0  # 15 s later they are tried again, and fail again
    assert {message.id: message.attempts for message in pending()} == {late: 2, broken: 2}
    with time_machine.travel(start + dt.timedelta(seconds=40)):
        assert outbox.drain() == 0  # the second wait is 30 s
    assert {message.id: message.attempts for message in pending()} == {late: 2, broken: 2}

    receiver.register(LATE)  # the release that brings the task reaches the worker
    with time_machine.travel(start + dt.timedelta(seconds=47)):
        assert outbox.drain() == 1
    delivered = OutboxMessage.objects.get(id=late)
    assert delivered.delivered_at is not None
    assert (delivered.attempts, delivered.last_error, delivered.leased_until) == (3, "", None)
    assert delivered.next_attempt_at is None
    assert receiver.deliveries()[-1] == (f"outbox-{late}", {"n": 2})
    assert [(message.id, message.attempts) for message in pending()] == [(broken, 3)]
    assert len(receiver.deliveries()) == 3


def test_the_backoff_doubles_from_one_drain_interval_up_to_an_hour() -> None:
    waits = [outbox.retry_delay(attempts).total_seconds() for attempts in (1, 2, 3, 4, 8, 9, 50, 10**6)]
    assert waits == [15, 30, 60, 120, 1920, 3600, 3600, 3600]


@pytest.mark.django_db(transaction=True)
def test_delivering_by_id_does_not_wait_for_the_backoff(receiver: Receiver) -> None:
    """The admin's "deliver now" (by id): an operator who mended the cause need not wait."""
    with committed_without_delivery():
        late = outbox.enqueue_task(LATE, n=1)
    assert outbox.drain() == 0
    receiver.register(LATE)
    assert outbox.drain() == 0  # backing off
    assert late is not None and outbox.deliver([late]) == 1
    assert receiver.deliveries() == [(f"outbox-{late}", {"n": 1})]


@pytest.mark.django_db(transaction=True)
def test_a_delivery_failing_right_after_commit_keeps_the_commit_and_the_message(receiver: Receiver) -> None:
    order_create(5)
    with transaction.atomic(durable=True):
        order_suspend(5)
        late = outbox.enqueue_task(LATE, order_id=5)
        fine = outbox.enqueue_task(RECORD, order_id=5)

    assert order_state(5) == "suspended"
    assert receiver.deliveries() == [(f"outbox-{fine}", {"order_id": 5})]
    [kept] = pending()
    assert (kept.id, kept.attempts, kept.leased_until) == (late, 1, None)
    assert kept.last_error.startswith("NotRegistered:")


@pytest.mark.django_db(transaction=True)
def test_failing_messages_filling_a_whole_batch_do_not_stop_the_drain(receiver: Receiver) -> None:
    with committed_without_delivery():
        failing = outbox.enqueue_tasks(LATE, [{"n": n} for n in range(5)])
        good = outbox.enqueue_tasks(RECORD, [{"n": n} for n in range(3)])

    # Batches of 2: the first batches fail entirely; the drain still reaches the good ones,
    # and tries each failing message once (the next drain tries them again).
    assert outbox.drain(batch=2) == 3
    assert [task_id for task_id, _ in receiver.deliveries()] == [f"outbox-{message_id}" for message_id in good]
    assert [(message.id, message.attempts) for message in pending()] == [(message_id, 1) for message_id in failing]
    with time_machine.travel(timezone.now() + dt.timedelta(seconds=16)):
        assert outbox.drain(batch=2) == 0
    assert [message.attempts for message in pending()] == [2] * 5


# --- 5. The dedupe key: stored once, delivered once


@pytest.mark.django_db(transaction=True)
def test_the_same_dedupe_key_twice_stores_one_message_and_delivers_it_once(receiver: Receiver) -> None:
    with transaction.atomic(durable=True):
        first = outbox.enqueue_task(RECORD, dedupe_key="charge:42", invoice_id=42, n=1)
    with transaction.atomic(durable=True):  # the cause replayed later
        again = outbox.enqueue_task(RECORD, dedupe_key="charge:42", invoice_id=42, n=2)
    with transaction.atomic(durable=True):  # twice in one statement, and once more in one transaction
        batch = outbox.enqueue_tasks(
            RECORD, [{"n": 3}, {"n": 4}, {"n": 5}], dedupe_keys=["charge:43", "charge:43", None]
        )
        twin = outbox.enqueue_task(RECORD, dedupe_key="charge:43", n=6)

    assert first is not None and again is None and twin is None
    assert len(batch) == 2
    assert OutboxMessage.objects.filter(dedupe_key="charge:42").count() == 1
    assert OutboxMessage.objects.filter(dedupe_key="charge:43").count() == 1
    assert OutboxMessage.objects.count() == 3
    assert outbox.drain() == 0
    assert sorted(payload["n"] for _, payload in receiver.deliveries()) == [1, 3, 5]


@pytest.mark.django_db(transaction=True)
def test_the_same_email_dedupe_key_twice_sends_one_email_and_keeps_the_transaction(receiver: Receiver) -> None:
    order_create(9)
    with transaction.atomic(durable=True):
        first = outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT, dedupe_key="f:9")
        twin = outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT, dedupe_key="f:9")
        order_suspend(9)  # the transaction goes on after the twin lost on the unique key

    assert first is not None and twin is None
    assert order_state(9) == "suspended"
    assert OutboxMessage.objects.count() == 1
    assert len(mail.outbox) == 1 and message_ids()[0].startswith(f"<outbox-{first}@")
    assert outbox.drain() == 0
    assert len(mail.outbox) == 1


@pytest.mark.django_db(transaction=True)
def test_two_transactions_enqueueing_one_dedupe_key_at_once_deliver_once(receiver: Receiver) -> None:
    def enqueue(i: int) -> tuple[int | None, int | None]:
        with transaction.atomic(durable=True):
            task = outbox.enqueue_task(RECORD, dedupe_key="suspend:3", n=i)
            email = outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT, dedupe_key="m:3")
        return task, email

    results = in_threads(2, enqueue)
    assert all(isinstance(result, tuple) for result in results), results
    assert sorted(result[0] is None for result in results) == [False, True]
    assert OutboxMessage.objects.filter(kind=OutboxKind.TASK).count() == 1
    assert OutboxMessage.objects.filter(kind=OutboxKind.EMAIL).count() == 1
    assert outbox.drain() == 0
    assert len(receiver.deliveries()) == 1
    assert len(mail.outbox) == 1


# --- 6. Emails: rendered from their templates, with a Message-ID from the outbox id


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("from_email", ["billing@acme-billing.test", "Acme Billing <billing@acme-billing.test>"])
def test_an_email_is_rendered_from_its_templates_with_a_message_id_from_the_outbox_id(
    receiver: Receiver, from_email: str
) -> None:
    with override_settings(DEFAULT_FROM_EMAIL=from_email), transaction.atomic(durable=True):
        message_id = outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT, account_id=7001)
        other_id = outbox.enqueue_email(
            PAYMENT_FAILED, to="ap@acme.test", context={**FAILED_CONTEXT, "will_retry": False}
        )

    first, other = mail.outbox
    assert (first.from_email, first.to) == (from_email, ["ap@acme.test"])
    assert first.subject == "Payment failed for invoice INV-T-0042"
    assert "Hello Acme BV," in first.body
    assert "We could not collect EUR 12.34 for invoice INV-T-0042 (due the due date)." in first.body
    assert "The card was declined." in first.body
    assert "We will try again. To pay now" in first.body
    assert "POST /api/v1/billing-accounts/7001/invoices/42/pay" in first.body
    assert "We will try again." not in other.body
    assert first.message()["Message-ID"] == f"<outbox-{message_id}@acme-billing.test>"
    assert other.message()["Message-ID"] == f"<outbox-{other_id}@acme-billing.test>"
    assert OutboxMessage.objects.get(id=message_id).payload == {"to": "ap@acme.test", "context": FAILED_CONTEXT}


@pytest.mark.django_db(transaction=True)
def test_an_email_sent_again_after_a_lost_mark_carries_the_same_message_id(receiver: Receiver) -> None:
    with transaction.atomic(durable=True):
        message_id = outbox.enqueue_email(PAYMENT_FAILED, to="ap@acme.test", context=FAILED_CONTEXT)
    # What a deliverer that died after sending and before marking leaves (its lease since run out):
    OutboxMessage.objects.filter(id=message_id).update(delivered_at=None)

    assert outbox.drain() == 1  # at least once: sent again …
    first, again = mail.outbox
    # … as the same message, which the receiving side can recognise by its Message-ID.
    assert first.message()["Message-ID"] == again.message()["Message-ID"]
    assert first.message()["Message-ID"].startswith(f"<outbox-{message_id}@")
    assert (first.subject, first.body) == (again.subject, again.body)
