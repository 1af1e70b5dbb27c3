"""What the Stripe tests run against: a real localstripe over HTTP, a fault proxy in front of it,
and the webhook signature Stripe would send. Nothing here imports ``stripe``.

- ``LocalStripe``: ``localstripe --port <free port> --from-scratch`` in a child process, with its
  own ``TMPDIR`` and working directory. (localstripe 1.15 writes its state to the fixed path
  ``/tmp/localstripe.pickle`` whatever ``TMPDIR`` says; with ``--from-scratch`` it never reads
  it back, so instances sharing that file do not see each other's objects.) With the session
  clock set (``BILLING_TEST_CLOCK``, see the root ``conftest.py``) it runs on that clock too,
  ticking, so the ``created`` times it stamps agree with ours.
- ``FaultProxy``: a threaded HTTP proxy (plain sockets, one request per connection) whose
  next requests can be made to fail the ways a network fails: an answer of 500 or 429 (or any
  canned answer) without forwarding, the answer dropped after the upstream processed the
  request, the answer held past the client's timeout, the request held and never forwarded,
  a reset (RST) before or after forwarding. It records each request's method, path,
  ``Idempotency-Key`` and arrival time.
- ``sign_stripe_payload``: the ``Stripe-Signature`` header for a webhook body.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from conftest import free_port

if TYPE_CHECKING:
    from payments.gateways.stripe import StripeGateway
    from payments.ratelimit import CallRateLimiter

LOCALSTRIPE_KEY = "sk_test_localstripe"
FAULT_PROXY_TIMEOUT_SECONDS = 1.5  # the client timeout of the gateway behind the fault proxy
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "host", "upgrade"}
)


def sign_stripe_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe sends with ``payload``: ``t=<timestamp>,v1=<hex>``,
    the HMAC-SHA256 of ``<timestamp>.<payload>`` keyed with the endpoint's secret."""
    signed = str(timestamp).encode() + b"." + payload
    signature = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={signature}"


# --- localstripe


class LocalStripe:
    """A localstripe server in a child process (``start``/``stop``); ``url`` once started."""

    def __init__(self, workdir: Path, *, startup_seconds: float = 30.0) -> None:
        self.workdir = workdir
        self.startup_seconds = startup_seconds
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "localstripe.log"

    def _command(self, port: int) -> list[str]:
        args = ["--port", str(port), "--from-scratch"]
        if os.environ.get("BILLING_TEST_CLOCK", "").strip():
            # The session runs on a travelled clock: so does localstripe (its `created` stamps).
            code = (
                "import sys, time_machine; time_machine.travel(sys.argv[1], tick=True).start(); "
                "sys.argv = ['localstripe', *sys.argv[2:]]; "
                "from localstripe.server import start; start()"
            )
            return [sys.executable, "-c", code, dt.datetime.now(dt.UTC).isoformat(), *args]
        return [str(Path(sys.executable).with_name("localstripe")), *args]

    def start(self) -> None:
        for _ in range(3):  # the free port may be taken between choosing and binding it
            port = free_port()
            env = {**os.environ, "TMPDIR": str(self.workdir)}
            with self.log_path.open("ab") as log_file:
                self.process = subprocess.Popen(
                    self._command(port), cwd=self.workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT
                )
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"localstripe did not start; its log:\n{self.log_path.read_text()[-3000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                self.request("GET", "/v1/customers?limit=1")
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def request(self, method: str, path: str) -> bytes:
        """A raw request to localstripe, authenticated (for tests that look behind the gateway)."""
        request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 server
            self.url + path, method=method, headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return bytes(response.read())

    def reset(self) -> None:
        """Forget every object (``DELETE /_config/data``)."""
        self.request("DELETE", "/_config/data")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def localstripe_gateway(
    api_base: str, *, timeout: float = 10.0, limiter: CallRateLimiter | None = None, rate_limit_retries: int = 5
) -> StripeGateway:
    """A ``StripeGateway`` with localstripe's test keys, no rate limit unless given, short back-offs
    (imported here, not at the top: this module itself never imports the SDK)."""
    from payments.gateways.stripe import StripeGateway

    return StripeGateway(
        secret_key=LOCALSTRIPE_KEY,
        publishable_key="pk_test_localstripe",
        api_base=api_base,
        timeout=timeout,
        limiter=limiter,
        rate_limit_retries=rate_limit_retries,
        backoff_base_seconds=0.02,
        backoff_cap_seconds=0.2,
    )


# --- the fault proxy


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    at: float  # time.time() when the whole request had arrived
    method: str
    path: str
    idempotency_key: str
    stripe_version: str
    fault: str  # "" when passed through


@dataclass(slots=True)
class Fault:
    kind: str  # "500" | "429" | "respond" | "drop_after" | "stall" | "hold" | "reset" | "reset_after"
    times: int | None  # None: every request until cleared
    status: int = 0
    body: bytes = b""


FAULT_KINDS = frozenset({"500", "429", "respond", "drop_after", "stall", "hold", "reset", "reset_after"})

RATE_LIMIT_BODY = json.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Too many requests hit the API too quickly. We recommend an exponential backoff.",
        }
    }
).encode()
SERVER_ERROR_BODY = json.dumps(
    {"error": {"type": "api_error", "message": "Something went wrong on Stripe's end. (fault proxy)"}}
).encode()


@dataclass
class _State:
    upstream: tuple[str, int]
    stall_seconds: float
    requests: list[ProxiedRequest] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)

    def next_fault(self) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times is None:
                    return fault
                if fault.times > 0:
                    fault.times -= 1
                    return fault
            return None


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    state: _State


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(15)
        parsed = _read_request(sock)
        if parsed is None:
            return
        method, path, headers, body = parsed
        state = self.server.state
        fault = state.next_fault()
        with state.lock:
            state.requests.append(
                ProxiedRequest(
                    at=time.time(),
                    method=method,
                    path=path,
                    idempotency_key=headers.get("idempotency-key", ""),
                    stripe_version=headers.get("stripe-version", ""),
                    fault=fault.kind if fault else "",
                )
            )
        kind = fault.kind if fault else ""
        if kind == "500":
            _answer(sock, 500, SERVER_ERROR_BODY)
        elif kind == "429":
            _answer(sock, 429, RATE_LIMIT_BODY)
        elif kind == "respond":
            assert fault is not None
            _answer(sock, fault.status, fault.body)
        elif kind == "reset":
            _reset(sock)
        elif kind == "hold":
            state.released.wait(state.stall_seconds)  # never forwarded: the gateway never sees it
            sock.close()
        else:
            status, reason, response_headers, response_body = _forward(state.upstream, method, path, headers, body)
            if kind == "drop_after":
                sock.close()  # processed upstream; the client gets no answer (a FIN)
            elif kind == "stall":
                state.released.wait(state.stall_seconds)  # past the client's timeout
                sock.close()
            elif kind == "reset_after":
                _reset(sock)
            else:
                _answer(sock, status, response_body, reason=reason, headers=response_headers)


def _read_request(sock: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return method, path, headers, body


def _forward(
    upstream: tuple[str, int], method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    connection = http.client.HTTPConnection(*upstream, timeout=15)
    try:
        forwarded = {name: value for name, value in headers.items() if name not in _HOP_BY_HOP}
        connection.request(method, path, body=body or None, headers=forwarded)
        response = connection.getresponse()
        payload = response.read()
        kept = [(name, value) for name, value in response.getheaders() if name.lower() not in _HOP_BY_HOP]
        return response.status, response.reason, kept, payload
    finally:
        connection.close()


def _answer(
    sock: socket.socket,
    status: int,
    body: bytes,
    *,
    reason: str = "",
    headers: list[tuple[str, str]] | None = None,
) -> None:
    reason = reason or http.client.responses.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers or [("Content-Type", "application/json")]:
        lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with contextlib.suppress(OSError):
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """An HTTP proxy in front of ``upstream`` whose next requests can be made to fail.

    ``inject(kind, times=1)`` queues a fault for the next ``times`` requests (``None``: all of
    them until ``clear``); faults queued one after the other apply in order, then requests pass
    through. Kinds: ``"500"`` and ``"429"`` (a Stripe-style error, not forwarded), ``"respond"``
    (``status`` and ``body`` as given, not forwarded), ``"drop_after"`` (forwarded, processed,
    then the connection closed without an answer), ``"stall"`` (forwarded, then the answer held
    for ``stall_seconds``, longer than the client waits, and dropped), ``"hold"`` (the request
    held for ``stall_seconds`` and dropped, never forwarded: what a client killed before its
    request got through leaves behind), ``"reset"`` (RST once the request is read, not
    forwarded), ``"reset_after"`` (forwarded, processed, then RST)."""

    def __init__(self, upstream: str, *, stall_seconds: float = 5.0) -> None:
        parts = urlsplit(upstream)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(
            upstream=(parts.hostname or "127.0.0.1", parts.port or 80), stall_seconds=stall_seconds
        )
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    def inject(
        self, kind: str, *, times: int | None = 1, status: int = 0, body: bytes | Mapping[str, Any] = b""
    ) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault {kind!r}")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self._server.state.lock:
            self._server.state.faults.append(Fault(kind=kind, times=times, status=status, body=raw))

    def clear(self) -> None:
        with self._server.state.lock:
            self._server.state.faults.clear()

    def close(self) -> None:
        self._server.state.released.set()  # stalled answers give up now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class FaultyStripe:
    """What the ``fault_proxy`` fixture yields: the proxy, a gateway that goes through it (client
    timeout ``FAULT_PROXY_TIMEOUT_SECONDS``) and the localstripe behind it."""

    proxy: FaultProxy
    gateway: StripeGateway
    localstripe: LocalStripe
