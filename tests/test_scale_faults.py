"""The scale path under faults (issue 20, "Proof, on this machine" → "Faults").

Real processes throughout, no mocks: a 3-node JetStream cluster (three ``nats-server``
processes, the stream at replicas 3); the ingest API served by ``manage.py runserver`` in a
process of its own; ``manage.py run_event_pipeline`` (sink and hourly rollup, the embedded
ClickHouse) in another; PostgreSQL. Producer threads send batches over HTTP and keep, per batch,
every answer: a 200 is final, a 503 or a broken connection means "send the same batch again
later", as a real client does.

While they send, the test SIGKILLs the stream's leader (and starts it again), SIGKILLs the
pipeline twice (and starts it again), SIGKILLs the API server, re-sends every event re-cut into
other batches, re-sends some batches byte for byte, and — the clock moved three days on, a new
API server on that clock — re-sends events again and sends some for the first time, in hours
already rolled up. At the end every event that got a 200 is counted exactly once: in the event
store, in the hour manifests, in hourly usage (per hour, to the last decimal), in the cost
breakdown and on October's invoice; every batch got its 200.

Bounded: every wait has a deadline, and every process started here is killed at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.test import override_settings

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from billing_site.common.actors import Actor
from conftest import ROOT, Customer, database_url, free_port, manage_py, wait_for
from invoicing import services as invoicing_services
from invoicing.models import Invoice, InvoiceLine
from invoicing.periods import Period
from metering import eventlog, eventstore, sharding
from metering.models import HourManifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.clock(dt.datetime(2026, 11, 1, 10, 0, tzinfo=dt.UTC)),
]

OCTOBER = Period.parse("2026-10")
FIRST_HOUR = dt.datetime(2026, 10, 30, 20, 0, tzinfo=dt.UTC)
HOURS = 8  # the events fall in 8 hours, the last ones on October 31st
PER_ACCOUNT = 240  # first sent on time, per account
LATE_PER_ACCOUNT = 20  # first sent three days late, into hours already rolled up
BATCH = 50  # the original batches (at FINGERPRINT_MIN_EVENTS: a byte-identical resend is recognised)
DEADLINE = 240.0  # seconds for anything the test waits on (a loaded machine; never reached when all is well)


@dataclass(frozen=True)
class Event:
    account: str  # public id
    account_id: int
    id: str
    time: dt.datetime
    quantity: Decimal

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account_id": self.account,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "type": "usage",
            "sku": "network.egress",
            "quantity": str(self.quantity),
        }


def batch_body(events: list[Event]) -> bytes:
    return json.dumps({"events": [event.wire() for event in events]}).encode()


@dataclass
class Batch:
    name: str
    events: list[Event]
    body: bytes = b""
    answers: list[str] = field(default_factory=list)  # "200", "503", "connection", "500" …
    result: dict[str, Any] | None = None  # the 200's body

    def __post_init__(self) -> None:
        self.body = self.body or batch_body(self.events)


class ApiServer:
    """``manage.py runserver`` in a process of its own, on the test process's clock."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(
                manage_py("runserver", "--noreload", f"127.0.0.1:{self.port}"),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        def answers() -> bool:
            assert self.process.poll() is None, "the API server exited"
            try:
                urllib.request.urlopen(f"{self.url}/api/v1/usage/events", timeout=2)  # noqa: S310
            except urllib.error.HTTPError:
                return True  # 401/405: Django is up
            except OSError:
                return False
            return True

        assert wait_for(answers, DEADLINE), "the API server did not start"


class Producers:
    """Threads that send the batches put on the queue until each got a 200; a 503 or a lost
    connection puts the batch back, to be sent again (the same bytes) after Retry-After."""

    def __init__(self, key: str, threads: int = 3) -> None:
        self.key = key
        self.server: ApiServer | None = None
        self.todo: queue.Queue[Batch | None] = queue.Queue()
        self.lock = threading.Lock()
        self.outstanding = 0
        self.answers: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def put(self, batches: list[Batch]) -> None:
        with self.lock:
            self.outstanding += len(batches)
        for batch in batches:
            self.todo.put(batch)

    def answered(self) -> int:
        return self.answers["200"]

    def done(self) -> bool:
        with self.lock:
            return self.outstanding == 0

    def stop(self) -> None:
        for _ in self.threads:
            self.todo.put(None)
        for thread in self.threads:
            thread.join(timeout=30)

    def _send(self, batch: Batch) -> tuple[str, float]:
        server = self.server
        if server is None:
            return "no_server", 0.2
        request = urllib.request.Request(  # noqa: S310 (a loopback URL of this test)
            f"{server.url}/api/v1/usage/events",
            data=batch.body,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                batch.result = json.load(response)
                return "200", 0.0
        except urllib.error.HTTPError as exc:
            retry_after = float(exc.headers.get("Retry-After") or 1)
            return str(exc.code), min(retry_after, 2.0)
        except (OSError, ValueError):  # refused, reset, timed out, a torn body: unknown, send again
            return "connection", 0.3

    def _run(self) -> None:
        while True:
            batch = self.todo.get()
            if batch is None:
                return
            answer, pause = self._send(batch)
            batch.answers.append(answer)
            with self.lock:
                self.answers[answer] += 1
                if answer == "200":
                    self.outstanding -= 1
            if answer != "200":
                time.sleep(pause)
                self.todo.put(batch)


class Pipeline:
    """``manage.py run_event_pipeline`` in a process of its own."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(
                manage_py("run_event_pipeline", *args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        """SIGKILL, mid-flow: it must have been running until now (a log election included)."""
        assert self.process.poll() is None, f"the pipeline had exited: {self.tail()}"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def looping(self) -> bool:
        """Past its start (Django, the store's settings): in its loop, where SIGTERM ends a pass."""
        return "event=eventlog.consumer_ensured " in self.log_path.read_text(errors="replace")

    def passes(self) -> int:
        """Sink passes it has stored and acknowledged so far."""
        return self.log_path.read_text(errors="replace").count("event=sink.pass ")


def events_for(account: BillingAccount, prefix: str, count: int, rng: random.Random) -> list[Event]:
    out = []
    for i in range(count):
        moment = FIRST_HOUR + dt.timedelta(seconds=rng.randrange(HOURS * 3600))
        quantity = Decimal(rng.randrange(1, 9_000_000)) / Decimal(1_000_000)  # 0.000001 … 8.999999 GB
        out.append(Event(account.public_id, account.id, f"{prefix}-{i:04d}", moment, quantity))
    return out


def cut(events: list[Event], size: int, name: str) -> list[Batch]:
    return [Batch(f"{name}-{n}", events[i : i + size]) for n, i in enumerate(range(0, len(events), size))]


def hour_of(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child process the test starts, killed at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_every_event_answered_200_is_counted_exactly_once_through_log_sink_and_rollup_failures(
    nats_cluster: Any,
    clustered_event_log: str,
    usage_account: BillingAccount,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
    settings: Any,
    clock: time_machine.Traveller,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    first = usage_account
    second = make_account(customer.user, currency="USD")
    while sharding.shard_of(second.id) == sharding.shard_of(first.id):  # two shards of hours
        second = make_account(customer.user, currency="USD")
    accounts = (first, second)
    key = account_services.service_key_create(name="fault-test", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw

    rng = random.Random(20)
    on_time = [e for n, a in enumerate(accounts) for e in events_for(a, f"e{n}", PER_ACCOUNT, rng)]
    late = [e for n, a in enumerate(accounts) for e in events_for(a, f"late{n}", LATE_PER_ACCOUNT, rng)]
    rng.shuffle(on_time)  # each batch mixes accounts and hours

    chdb_path = tmp_path / "eventstore"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
        "DATABASE_URL": database_url(),
        "METERING_EVENT_STORE": "clickhouse",
        "METERING_CHDB_PATH": str(chdb_path),
        "METERING_CLICKHOUSE_URL": "",
        "METERING_LOG_URLS": ",".join(nats_cluster.urls),
        "METERING_LOG_STREAM": settings.METERING_LOG_STREAM,
        "METERING_LOG_SUBJECT": settings.METERING_LOG_SUBJECT,
        "METERING_LOG_CONSUMER": settings.METERING_LOG_CONSUMER,
        "METERING_LOG_REPLICAS": "3",
        "METERING_LOG_ACK_TIMEOUT_SECONDS": "2",
        # A killed sink's messages come back this soon (a pass takes well under it).
        "METERING_LOG_ACK_WAIT_SECONDS": "10",
        "LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",  # a SIGKILLed child's last lines are in its log
    }
    env.pop("BILLING_TEST_CLOCK", None)  # the children run on this test's clock (manage_py)

    def start_pipeline(name: str, *args: str) -> Pipeline:
        pipeline = Pipeline(env, logs / f"{name}.log", "--rollup-every", "1", *args)
        processes.append(pipeline.process)
        return pipeline

    def start_server(name: str) -> ApiServer:
        server = ApiServer(env, logs / f"{name}.log")
        processes.append(server.process)
        server.wait_ready()
        return server

    def until(condition: Callable[[], bool], what: str) -> None:
        assert wait_for(condition, DEADLINE), f"{what}: not within {DEADLINE:.0f} s; answers {producers.answers}"

    batches: list[Batch] = []
    producers = Producers(key)
    try:
        server = start_server("api-1")
        producers.server = server
        pipeline = start_pipeline("pipeline-1")

        # 1. On time, in batches of 50; the stream's leader is SIGKILLed while they flow.
        originals = cut(on_time, BATCH, "original")
        batches += originals
        producers.put(originals[:3])
        until(lambda: producers.answered() >= 3 and pipeline.passes() >= 1, "the first batches stored")
        producers.put(originals[3:6])
        leader = nats_cluster.wait_stream_leader(clustered_event_log)
        leader.kill()
        producers.put(originals[6:])
        nats_cluster.wait_stream_leader(clustered_event_log, other_than=leader.name, seconds=DEADLINE)
        leader.start()

        # 2. Every event again, re-cut into other batches (and reordered), and some batches byte
        # for byte; meanwhile the pipeline (which lived through the election) is SIGKILLed and
        # started again, and so is the API server, whose successor runs three days later.
        until(lambda: producers.answered() >= len(originals) // 2, "batches after the election")
        reordered = list(on_time)
        rng.shuffle(reordered)
        recut = cut(reordered, 73, "recut")
        identical = [Batch(f"identical-{b.name}", b.events, b.body) for b in originals[:4]]
        batches += recut + identical
        producers.put(recut + identical)
        until(lambda: producers.answered() >= len(originals) + 2, "the first re-cut batches")
        pipeline.kill()
        pipeline = start_pipeline("pipeline-2")
        until(lambda: producers.answered() >= len(originals) + 4, "more re-cut batches")
        producers.server = None  # the producers see broken connections, then nothing, then the new one
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
        clock.shift(dt.timedelta(days=3))
        producers.server = start_server("api-2")

        # 3. Days late: resends, and events first sent now into hours already rolled up.
        until(lambda: pipeline.passes() >= 1, "the restarted pipeline at work")
        days_late = cut(late + on_time[::3], 61, "late")
        batches += days_late
        producers.put(days_late)
        until(lambda: producers.answered() >= len(batches) - len(days_late) + 2, "the first late batches")
        pipeline.kill()  # again, while the late batches flow
        pipeline = start_pipeline("pipeline-3")
        until(producers.done, "every batch answered 200")
        until(pipeline.looping, "the last pipeline at work")
    finally:
        producers.stop()

    # The pipeline finishes what it has in hand (SIGTERM), then one more drains until idle.
    pipeline.process.send_signal(signal.SIGTERM)
    pipeline.process.wait(timeout=DEADLINE)
    final = start_pipeline("pipeline-final", "--until-idle")
    final.process.wait(timeout=DEADLINE)
    assert final.process.returncode == 0, final.tail()

    # Every batch got a 200 that accounts for each of its events, none rejected.
    for batch in batches:
        assert batch.result is not None, (batch.name, batch.answers)
        assert batch.result["rejected"] == [], (batch.name, batch.result)
        assert batch.result["accepted"] + batch.result["duplicates"] == len(batch.events), (batch.name, batch.result)
    assert "503" in producers.answers, f"the leader's death was never seen by a producer: {producers.answers}"
    assert all(b.result == {"accepted": 0, "duplicates": BATCH, "rejected": []} for b in identical), [
        b.result for b in identical
    ]

    # What each event is: one content per id, whatever batch carried it.
    answered = {(e.account_id, e.id): e for b in batches for e in b.events}
    assert len(answered) == len(on_time) + len(late)
    expected_hourly: dict[tuple[int, dt.datetime], Decimal] = defaultdict(Decimal)
    expected_count: Counter[tuple[int, dt.datetime]] = Counter()  # (shard, hour)
    for event in answered.values():
        expected_hourly[event.account_id, hour_of(event.time)] += event.quantity
        expected_count[sharding.shard_of(event.account_id), hour_of(event.time)] += 1

    # Hourly usage in PostgreSQL: each event once, to the last decimal.
    with connection.cursor() as cur:
        cur.execute(
            "SELECT account_id, hour, sum(quantity) FROM metering_hourlyusage WHERE account_id = ANY(%s) "
            "AND sku = 'network.egress' GROUP BY 1, 2",
            [[a.id for a in accounts]],
        )
        assert {(a, h): q for a, h, q in cur.fetchall()} == dict(expected_hourly)
    # The manifests: per hour and shard, the events counted.
    manifests = {(m.shard, m.hour): m.events for m in HourManifest.objects.all()}
    assert manifests == dict(expected_count)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM metering_dirtyhour d JOIN metering_hourmanifest m USING (shard, hour) "
            "WHERE d.version > m.version"
        )
        assert cur.fetchone() == (0,)  # nothing left dirty

    # The event store, opened here now that no pipeline runs: each event once, none other.
    consumer = eventlog.consumer_info()
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
    eventstore.close_store()
    with override_settings(METERING_CHDB_PATH=str(chdb_path), METERING_CLICKHOUSE_URL=""):
        store = eventstore.get_store()
        try:
            assert store.counted_events() == len(answered)
            stored = store._run("SELECT account_id, event_id, toString(quantity) FROM usage_events FINAL").decode()
        finally:
            eventstore.close_store()
    rows = [line.split("\t") for line in stored.splitlines()]
    assert len(rows) == len(answered)
    assert {(int(a), e): Decimal(q) for a, e, q in rows} == {k: e.quantity for k, e in answered.items()}

    # Costs and October's invoice: 100 GB a month free, then 0.09 USD per GB (the catalog).
    for account in accounts:
        total = sum(e.quantity for e in answered.values() if e.account_id == account.id)
        assert Decimal(100) < total < Decimal(10240)
        expected = (total - 100) * Decimal("0.09")
        costs = customer.client.get(
            f"/api/v1/billing-accounts/{account.public_id}/costs",
            {"start": "2026-10-01", "end": "2026-11-01", "granularity": "month", "group_by": "sku"},
        )
        assert costs.status_code == 200, costs.content
        assert Decimal(costs.json()["total"]) == expected, costs.json()
        invoicing_services.period_close(
            period=OCTOBER,
            actor=Actor.system("fault-test"),
            account_ids=[account.id],
            run_rollup=False,
            render_pdfs=False,
        )
        invoice = Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)
        (line,) = InvoiceLine.objects.filter(invoice=invoice, sku="network.egress")
        assert line.quantity == total
        assert line.rated_amount == expected
