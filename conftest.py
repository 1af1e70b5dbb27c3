"""Fixtures shared by every app's tests: API clients with real keys, accounts with owners."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from accounts import services
from accounts.models import BillingAccount, Membership, User
from accounts.tests.factories import BillingAccountFactory

_emails = itertools.count()


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
    """A real Redis: TEST_REDIS_URL, else 127.0.0.1:6379, else a redis-server started here
    on a free port; skipped (saying why) when there is none and it cannot be started."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    if _listening("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/15"
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs Redis: nothing on 127.0.0.1:6379 and redis-server is not installed")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(  # noqa: S603
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if _listening("127.0.0.1", port):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/15"
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
