"""Fixtures of the payments tests.

Stripe (``payments/tests/stripe_harness.py``): ``localstripe`` (one server per session, with the
adapter that makes it answer as Stripe does), ``stripe_gateway`` (the production
``StripeGateway`` talking to it, its data wiped first) and
``fault_proxy`` (the same behind a ``FaultProxy``, with a short client timeout). None of them
needs the database. ``no_worker``: tasks are queued and nothing runs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from payments.tests.stripe_flows import on_stripe
from payments.tests.stripe_harness import (
    FAULT_PROXY_TIMEOUT_SECONDS,
    FaultProxy,
    FaultyStripe,
    LocalStripe,
    localstripe_gateway,
)

if TYPE_CHECKING:
    from payments.gateways.stripe import StripeGateway


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    """A localstripe server for the session (``.url``); tests wipe it through ``stripe_gateway``."""
    server = LocalStripe(tmp_path_factory.mktemp("localstripe"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stripe_gateway(localstripe: LocalStripe) -> StripeGateway:
    """A ``StripeGateway`` on localstripe, whose objects are wiped first."""
    localstripe.reset()
    return localstripe_gateway(localstripe.url)


@pytest.fixture
def fault_proxy(localstripe: LocalStripe) -> Iterator[FaultyStripe]:
    """A ``FaultProxy`` in front of localstripe (wiped first) and a gateway that goes through it."""
    localstripe.reset()
    with FaultProxy(localstripe.url, stall_seconds=FAULT_PROXY_TIMEOUT_SECONDS * 3) as proxy:
        gateway = localstripe_gateway(proxy.url, timeout=FAULT_PROXY_TIMEOUT_SECONDS)
        yield FaultyStripe(proxy=proxy, gateway=gateway, localstripe=localstripe)


@pytest.fixture
def no_worker() -> Iterator[None]:
    """Tasks are queued (to the in-memory broker) and nothing runs them, as with no worker up:
    the post-issue and new-card charges wait, so a test drives the charge itself."""
    from billing_site.celery import app

    saved = app.conf.task_always_eager
    app.conf.task_always_eager = False
    try:
        yield
    finally:
        app.conf.task_always_eager = saved


@pytest.fixture
def stripe(localstripe: LocalStripe, stripe_gateway: object) -> Iterator[LocalStripe]:
    """The ``stripe`` gateway on localstripe (wiped), the default for new accounts."""
    with on_stripe(localstripe.url):
        yield localstripe
