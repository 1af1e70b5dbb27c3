"""The log of raw usage events: a NATS JetStream stream, behind a synchronous API.

The ingest API publishes each accepted batch here and answers 200 only after the stream's
PubAck; sinks read the stream through one durable pull consumer and acknowledge a message
only after it is stored in the event store. This is the only module that imports ``nats``
(an import-linter contract in pyproject.toml says so).

How it works:

1. One connection per process, owned by one background thread running an asyncio loop
   (Django views and the sinks are synchronous, nats-py is asyncio). It is started on first
   use and keeps reconnecting, to any of ``METERING_LOG_URLS``, forever; every call waits for
   it at most ``METERING_LOG_ACK_TIMEOUT_SECONDS``. A forked child never touches its parent's
   loop or socket (the pid is checked on every call, and reset after ``fork``): it starts its
   own. It is closed at interpreter exit.
2. ``publish`` sends the payload with the header ``Nats-Msg-Id`` and waits for the PubAck.
   JetStream stores a message id once within the duplicate window: publishing the same id
   again answers ``duplicate=True`` with the first message's sequence. No PubAck in time (no
   server, no stream leader during an election, a lost connection) raises ``LogUnavailable``;
   success is never reported without a PubAck. A publish that timed out may still have been
   stored: retry it with the same ``msg_id`` and the stream keeps it once.
3. ``fetch`` hands out messages of the durable consumer ``METERING_LOG_CONSUMER`` (created
   or updated from the settings on first use; several processes share it, each message goes
   to one of them). ``LogMessage.ack`` waits for the server to confirm the ack; a message not
   acknowledged within ``METERING_LOG_ACK_WAIT_SECONDS`` is delivered again, without limit.

Operational caveat: the servers' ``max_payload`` must be at least
``METERING_LOG_MAX_MESSAGE_BYTES`` (nats-server's default is 1 MiB), and the duplicate
window must be longer than any producer keeps retrying a batch.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from django.conf import settings
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

log = logging.getLogger(__name__)

T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
# JetStream's error code for "message size exceeds maximum allowed".
_ERR_MESSAGE_TOO_LARGE = 10054


class LogError(Exception):
    """Something the log refused or could not do."""


class LogUnavailable(LogError):
    """The log could not acknowledge in time: nothing is known to be stored. Retry after
    ``retry_after`` seconds, with the same msg id."""

    def __init__(self, reason: str, *, retry_after: int) -> None:
        super().__init__(f"the event log is unavailable ({reason}); retry after {retry_after} s")
        self.reason = reason
        self.retry_after = retry_after


class MessageTooLarge(LogError):
    """The payload is larger than the stream (or the server) takes: retrying will not help."""


@dataclass(frozen=True)
class Published:
    seq: int  # the stream sequence of the message (the first one's, for a duplicate)
    duplicate: bool  # the msg id was already stored within the duplicate window


@dataclass(frozen=True)
class Replica:
    name: str
    current: bool
    lag: int
    offline: bool


@dataclass(frozen=True)
class StreamState:
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    leader: str | None  # the server name of the stream's leader (None on a single server)
    replicas: tuple[Replica, ...]  # the followers (not the leader)


@dataclass(frozen=True)
class ConsumerState:
    num_pending: int  # in the stream, not yet delivered to any sink
    num_ack_pending: int  # delivered, not yet acknowledged
    redelivered: int  # delivered more than once, not yet acknowledged
    leader: str | None


def _ack_timeout() -> float:
    return float(settings.METERING_LOG_ACK_TIMEOUT_SECONDS)


def _retry_after() -> int:
    return max(1, math.ceil(_ack_timeout()))


def _unavailable(reason: str, operation: str, **fields: Any) -> LogUnavailable:
    error = LogUnavailable(reason, retry_after=_retry_after())
    log.warning(
        "eventlog.unavailable",
        extra={"reason": reason, "operation": operation, "retry_after": error.retry_after, **fields},
    )
    return error


class _Connection:
    """One process's connection, on its own event-loop thread."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        self.pid = os.getpid()
        self.urls = urls
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="eventlog-loop", daemon=True)
        self.thread.start()
        self.nc = Client()
        self.connecting: asyncio.Task[None] | None = None
        self.closing = False
        self.subscriptions: dict[tuple[Any, ...], JetStreamContext.PullSubscription] = {}

    # --- on the loop

    async def _connect(self) -> None:
        max_bytes = int(settings.METERING_LOG_MAX_MESSAGE_BYTES)
        await self.nc.connect(
            servers=list(self.urls),
            name=f"billing-eventlog-{self.pid}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # forever: every call has its own deadline
            reconnect_time_wait=1,
            connect_timeout=2,
            ping_interval=10,
            max_outstanding_pings=3,
            # Publishes buffered while reconnecting; at least two of the largest messages.
            pending_size=max(2 * 1024 * 1024, 2 * max_bytes + 1024 * 1024),
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        log.info("eventlog.connected", extra={"server": self._server(), "pid": self.pid})

    def _server(self) -> str | None:
        url = self.nc.connected_url
        return f"{url.hostname}:{url.port}" if url else None

    async def _on_error(self, exc: Exception) -> None:
        # Every failed attempt to reach a server lands here: the state changes are logged below.
        log.debug("eventlog.client_error", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})

    async def _on_disconnected(self) -> None:
        if not self.closing:  # a close of our own disconnects too: logged as closed
            log.warning("eventlog.disconnected", extra={"pid": self.pid})

    async def _on_reconnected(self) -> None:
        log.info("eventlog.reconnected", extra={"server": self._server(), "pid": self.pid})

    async def _on_closed(self) -> None:
        log.info("eventlog.closed", extra={"pid": self.pid})

    async def client(self, deadline: float) -> Client:
        """The connection, once it is up (the first connect may take a while: no server yet)."""
        if self.nc.is_connected or self.nc.is_reconnecting:
            return self.nc  # while reconnecting, requests are buffered until their own timeout
        if self.connecting is None or (self.connecting.done() and not self.nc.is_connected):
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        await asyncio.wait_for(asyncio.shield(self.connecting), remaining)
        return self.nc

    async def close(self) -> None:
        self.closing = True
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        if not self.nc.is_closed:
            # A server already gone fails the final flush: on the way out, nothing to do about it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2)
        # What the client left running (its readers and subscriptions' tasks) ends here, not
        # as "Task was destroyed but it is pending" at interpreter exit.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # --- from any thread

    def run(self, make: Callable[[], Awaitable[T]], timeout: float) -> T:
        async def wrapped() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        try:
            return future.result(timeout + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.run(self.close, timeout=3)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=3)


_lock = threading.Lock()
_connection: _Connection | None = None


def _current() -> _Connection:
    """This process's connection to ``METERING_LOG_URLS``, started on first use; a new one
    after a fork (the parent's loop does not exist here) or when the URLs changed."""
    global _connection
    urls = tuple(settings.METERING_LOG_URLS)
    with _lock:
        connection = _connection
        if connection is not None and connection.pid == os.getpid() and connection.urls == urls:
            return connection
        if connection is not None and connection.pid == os.getpid():
            connection.stop()
        _connection = _Connection(urls)
        log.info("eventlog.started", extra={"pid": os.getpid(), "servers": len(urls)})
        return _connection


def _forget_after_fork() -> None:
    global _connection, _lock
    _connection = None
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_after_fork)


def close() -> None:
    """Close this process's connection (the next call opens a new one). Run at exit."""
    global _connection
    with _lock:
        connection, _connection = _connection, None
    if connection is not None and connection.pid == os.getpid():
        connection.stop()


atexit.register(close)


def _call(operation: str, work: Callable[[Client, JetStreamContext], Awaitable[T]], timeout: float) -> T:
    """Run ``work`` on the loop within ``timeout``, with the connection; failures to reach
    the log become LogUnavailable."""
    connection = _current()
    deadline = time.monotonic() + timeout

    async def step() -> T:
        try:
            nc = await connection.client(deadline)
        except TimeoutError:
            raise _unavailable("not_connected", operation) from None
        return await work(nc, nc.jetstream(timeout=max(0.1, deadline - time.monotonic())))

    try:
        return connection.run(step, timeout)
    except LogError:
        raise
    except nats.errors.MaxPayloadError as exc:
        raise MessageTooLarge(str(exc)) from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code == _ERR_MESSAGE_TOO_LARGE:
            raise MessageTooLarge(exc.description or "message too large") from exc
        reason = "no_leader" if exc.code == 503 else f"api_error_{exc.code}_{exc.err_code}"
        raise _unavailable(reason, operation, description=(exc.description or "")[:200]) from exc
    except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
        raise _unavailable("no_responders", operation) from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise _unavailable("timeout", operation) from exc
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.StaleConnectionError,
        nats.errors.ConnectionDrainingError,
        nats.errors.NoServersError,
    ) as exc:
        raise _unavailable("disconnected", operation, error=type(exc).__name__) from exc


# --- The stream


def _stream_config() -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=settings.METERING_LOG_STREAM,
        subjects=[settings.METERING_LOG_SUBJECT],
        retention=js_api.RetentionPolicy.LIMITS,  # kept until max_age, whoever has read it
        storage=js_api.StorageType.FILE,
        num_replicas=int(settings.METERING_LOG_REPLICAS),
        duplicate_window=float(settings.METERING_LOG_DUPLICATE_WINDOW_SECONDS),
        max_age=float(settings.METERING_LOG_RETENTION_HOURS) * 3600,
        max_msg_size=int(settings.METERING_LOG_MAX_MESSAGE_BYTES),
        discard=js_api.DiscardPolicy.OLD,
    )


_STREAM_FIELDS = ("subjects", "storage", "num_replicas", "duplicate_window", "max_age", "max_msg_size")


def ensure_stream(timeout: float | None = None) -> None:
    """Create the stream from the settings, or update it to them; idempotent. Elections of a
    new stream's leader can take a few seconds: ``timeout`` defaults to 3x the ack timeout."""
    wanted = _stream_config()
    timeout = timeout if timeout is not None else 3 * _ack_timeout()

    async def work(nc: Client, js: JetStreamContext) -> str:
        assert wanted.name
        try:
            info = await js.stream_info(wanted.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(wanted)
            return "created"
        have = info.config
        if all(getattr(have, field) == getattr(wanted, field) for field in _STREAM_FIELDS):
            return "unchanged"
        await js.update_stream(wanted)
        return "updated"

    outcome = _call("ensure_stream", work, timeout)
    log.info(
        "eventlog.stream_ensured",
        extra={
            "stream": wanted.name,
            "subject": settings.METERING_LOG_SUBJECT,
            "outcome": outcome,
            "replicas": wanted.num_replicas,
        },
    )


def publish(payload: bytes, *, msg_id: str) -> Published:
    """Store ``payload`` in the stream once per ``msg_id`` (within the duplicate window) and
    return its sequence once the stream acknowledged it. Raises LogUnavailable (nothing is
    known to be stored: retry with the same msg_id) or MessageTooLarge."""
    if not msg_id:
        raise ValueError("a message id is required: it is what makes a retry safe")
    timeout = _ack_timeout()
    subject = settings.METERING_LOG_SUBJECT
    stream = settings.METERING_LOG_STREAM

    async def work(nc: Client, js: JetStreamContext) -> js_api.PubAck:
        return await js.publish(subject, payload, timeout=timeout, stream=stream, headers={MSG_ID_HEADER: msg_id})

    ack = _call("publish", work, timeout)
    return Published(seq=int(ack.seq), duplicate=bool(ack.duplicate))


def stream_info() -> StreamState:
    stream = settings.METERING_LOG_STREAM

    async def work(nc: Client, js: JetStreamContext) -> js_api.StreamInfo:
        return await js.stream_info(stream)

    info = _call("stream_info", work, _ack_timeout())
    state, cluster = info.state, info.cluster
    return StreamState(
        messages=state.messages,
        bytes=state.bytes,
        first_seq=state.first_seq,
        last_seq=state.last_seq,
        leader=cluster.leader if cluster else None,
        replicas=tuple(
            Replica(name=peer.name or "", current=bool(peer.current), lag=peer.lag or 0, offline=bool(peer.offline))
            for peer in ((cluster.replicas or []) if cluster else [])
        ),
    )


# --- The sinks' consumer


def _consumer_config() -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name=settings.METERING_LOG_CONSUMER,
        filter_subject=settings.METERING_LOG_SUBJECT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=float(settings.METERING_LOG_ACK_WAIT_SECONDS),
        max_ack_pending=int(settings.METERING_LOG_MAX_ACK_PENDING),
        max_deliver=-1,  # a message is delivered until a sink stores it
        replay_policy=js_api.ReplayPolicy.INSTANT,
    )


def consumer_info() -> ConsumerState:
    stream, consumer = settings.METERING_LOG_STREAM, settings.METERING_LOG_CONSUMER

    async def work(nc: Client, js: JetStreamContext) -> js_api.ConsumerInfo:
        return await js.consumer_info(stream, consumer)

    info = _call("consumer_info", work, _ack_timeout())
    return ConsumerState(
        num_pending=info.num_pending or 0,
        num_ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        leader=info.cluster.leader if info.cluster else None,
    )


class LogMessage:
    """A message handed to a sink: acknowledge it only once it is stored."""

    def __init__(self, msg: Msg, connection: _Connection) -> None:
        self._msg = msg
        self._connection = connection
        self.data: bytes = msg.data
        self.seq: int = int(msg.metadata.sequence.stream)
        self.msg_id: str | None = (msg.headers or {}).get(MSG_ID_HEADER)
        self.num_delivered: int = int(msg.metadata.num_delivered or 1)

    def _reply(self, operation: str, make: Callable[[], Awaitable[Any]]) -> None:
        if self._connection is not _connection or self._connection.pid != os.getpid():
            raise _unavailable("connection_replaced", operation, seq=self.seq)
        timeout = _ack_timeout()
        try:
            self._connection.run(make, timeout)
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise _unavailable("timeout", operation, seq=self.seq) from exc
        except nats.errors.Error as exc:
            raise _unavailable("disconnected", operation, seq=self.seq, error=type(exc).__name__) from exc

    def ack(self) -> None:
        """Acknowledge, and wait until the server confirms it (else LogUnavailable: the message
        may come back, and storing it again must be harmless)."""
        timeout = _ack_timeout()
        self._reply("ack", lambda: self._msg.ack_sync(timeout=timeout))

    def nak(self, delay: float | None = None) -> None:
        """Hand it back for redelivery (after ``delay`` seconds)."""
        self._reply("nak", lambda: self._msg.nak(delay=delay))

    def in_progress(self) -> None:
        """Still working on it: the ack wait starts again."""
        self._reply("in_progress", self._msg.in_progress)

    def __repr__(self) -> str:
        return f"LogMessage(seq={self.seq}, msg_id={self.msg_id!r}, bytes={len(self.data)})"


def fetch(max_messages: int, timeout: float) -> list[LogMessage]:
    """Up to ``max_messages`` messages of the durable consumer, waiting up to ``timeout``
    seconds for the first; [] if none came. The consumer is created (or updated to the
    settings) on this process's first fetch."""
    stream = settings.METERING_LOG_STREAM
    config = _consumer_config()
    key = (stream, config.durable_name, config.filter_subject, config.ack_wait, config.max_ack_pending)
    connection = _current()

    async def work(nc: Client, js: JetStreamContext) -> list[Msg]:
        subscription = connection.subscriptions.get(key)
        if subscription is None:
            await js.add_consumer(stream, config)  # create, or update to these settings
            log.info(
                "eventlog.consumer_ensured",
                extra={"stream": stream, "consumer": config.durable_name, "ack_wait": config.ack_wait},
            )
            subscription = await js.pull_subscribe_bind(durable=config.durable_name, stream=stream)
            connection.subscriptions[key] = subscription
        try:
            return await subscription.fetch(max_messages, timeout=timeout)
        except TimeoutError:
            # nats.errors.TimeoutError, or asyncio's own from the client's inner wait_for when
            # the pull request's expiry and the wait end together: either way, nothing came.
            return []

    messages = _call("fetch", work, timeout + _ack_timeout())
    return [LogMessage(msg, connection) for msg in messages]
