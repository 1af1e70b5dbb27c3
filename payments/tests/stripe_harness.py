"""What the Stripe tests run against: a real localstripe over HTTP, a fault proxy in front of it,
and the webhook signature Stripe would send. Nothing here imports ``stripe``.

- ``LocalStripe``: ``localstripe --port <free port> --from-scratch`` in a child process, with its
  own ``TMPDIR`` and working directory. (localstripe 1.15 writes its state to the fixed path
  ``/tmp/localstripe.pickle`` whatever ``TMPDIR`` says; with ``--from-scratch`` it never reads
  it back, so instances sharing that file do not see each other's objects.) With the session
  clock set (``BILLING_TEST_CLOCK``, see the root ``conftest.py``) it runs on that clock too,
  ticking, so the ``created`` times it stamps agree with ours.
- ``LocalStripeAdapter``: a threaded HTTP server in front of localstripe (what ``LocalStripe.url``
  points at) that makes up what localstripe lacks where the gateway relies on Stripe (filters
  it refuses, test cards it does not know, the intent in a decline ...; see the class), so the
  production gateway speaks Stripe only and has no emulator mode.
- ``FaultProxy``: a threaded HTTP proxy (plain sockets, one request per connection) whose
  next requests can be made to fail the ways a network fails: an answer of 500 or 429 (or any
  canned answer) without forwarding, the answer dropped after the upstream processed the
  request, the answer held past the client's timeout, the request held and never forwarded,
  a reset (RST) before or after forwarding. It records each request's method, path,
  ``Idempotency-Key``, body and arrival time.
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
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from conftest import free_port
from tests import processes

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
    """A localstripe server in a child process and its ``LocalStripeAdapter`` (``start``/``stop``).
    Once started, ``url`` is where a gateway talks to (the adapter: Stripe's API as the gateway
    sends it) and ``raw_url`` localstripe itself (what ``request`` reads behind the gateway)."""

    def __init__(self, workdir: Path, *, startup_seconds: float = 30.0) -> None:
        self.workdir = workdir
        self.startup_seconds = startup_seconds
        self.url = ""
        self.raw_url = ""
        self.adapter: LocalStripeAdapter | None = None
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
            self.process = processes.start_logged(self._command(port), self.log_path, cwd=self.workdir, env=env)
            self.raw_url = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                self.adapter = LocalStripeAdapter(self.raw_url)
                self.url = self.adapter.url
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
            self.raw_url + path, method=method, headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return bytes(response.read())

    def reset(self) -> None:
        """Forget every object (``DELETE /_config/data``)."""
        self.request("DELETE", "/_config/data")

    def stop(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
            self.adapter = None
        processes.stop(self.process, seconds=10)
        self.process = None


def localstripe_gateway(
    api_base: str, *, timeout: float = 10.0, limiter: CallRateLimiter | None = None, rate_limit_retries: int = 5
) -> StripeGateway:
    """The production ``StripeGateway`` with localstripe's test keys, no rate limit unless given,
    short back-offs; ``api_base`` is ``LocalStripe.url`` (the adapter) or a proxy in front of it
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


# --- what localstripe lacks, made up in front of it

# Stripe's test payment methods and their card numbers (https://docs.stripe.com/testing): what
# localstripe is given in their stead when it does not know the name.
TEST_CARD_NUMBERS = {
    "pm_card_visa": "4242424242424242",
    "pm_card_visa_debit": "4000056655665556",
    "pm_card_mastercard": "5555555555554444",
    "pm_card_amex": "378282246310005",
    "pm_card_chargeDeclined": "4000000000000002",
    "pm_card_visa_chargeDeclined": "4000000000000002",
    "pm_card_chargeCustomerFail": "4000000000000341",
    "pm_card_authenticationRequired": "4000002760003184",
    "pm_card_authenticationRequiredOnSetup": "4000002500003155",
    "pm_card_visa_chargeDeclinedLostCard": "4000000000009987",
    "pm_card_visa_chargeDeclinedStolenCard": "4000000000009979",
    "pm_card_visa_chargeDeclinedInsufficientFunds": "4000000000009995",
    "pm_card_visa_chargeDeclinedExpiredCard": "4000000000000069",
}
# The names localstripe resolves itself (``PaymentMethod._try_get_canonical_test_article``).
LOCALSTRIPE_TEST_PAYMENT_METHODS = frozenset(
    {"pm_card_visa", "pm_card_visa_chargeDeclined", "pm_card_chargeCustomerFail"}
)
_LIST_PAGE = 100  # localstripe's pages read by the adapter

_SETUP_CONFIRM = re.compile(r"^/v1/setup_intents/[^/]+/confirm$")
_INTENT_CONFIRM = re.compile(r"^/v1/payment_intents/[^/]+/confirm$")
_Answer = tuple[int, str, list[tuple[str, str]], bytes]
_Form = list[tuple[str, str]]


def _form_without(form: _Form, name: str) -> _Form:
    """``form`` without the parameter ``name`` (and its ``name[...]`` parts)."""
    return [(key, value) for key, value in form if key != name and not key.startswith(name + "[")]


def _form_renamed(form: _Form, old: str, new: str) -> _Form:
    return [(new + key[len(old) :] if key == old or key.startswith(old + "[") else key, value) for key, value in form]


def _form_value(form: _Form, name: str) -> str:
    return next((value for key, value in form if key == name), "")


def _json_answer(status: int, payload: Mapping[str, Any]) -> _Answer:
    return (
        status,
        http.client.responses.get(status, ""),
        [("Content-Type", "application/json")],
        json.dumps(payload).encode(),
    )


def _invalid_request(code: str, message: str) -> _Answer:
    return _json_answer(400, {"error": {"type": "invalid_request_error", "code": code, "message": message}})


class LocalStripeAdapter:
    """localstripe as the gateway sees Stripe: an HTTP server in front of it (``url``) that
    passes every request through and makes up, around the few it handles, what localstripe 1.15
    lacks, so that ``payments.gateways.stripe`` speaks Stripe only and knows of no emulator:

    - parameters it refuses with a 400: ``allowed_payment_method_types`` on a SetupIntent or a
      PaymentIntent (given as its older name, ``payment_method_types``, which it takes),
      ``description`` on a PaymentIntent, ``reason`` on a Refund (left out, and the refund's
      ``reason`` put back into the answer);
    - the PaymentIntent list's ``customer`` and ``created`` filters, which it refuses: every
      page read from localstripe, filtered, newest first as Stripe lists, and paged again by
      ``limit`` and ``starting_after``;
    - Stripe's test payment methods it does not know by name (``TEST_CARD_NUMBERS``): a card
      PaymentMethod is created from the test card's number and confirmed in its stead (it takes
      16-digit numbers only, so ``pm_card_amex`` is refused with ``test_card_unsupported``);
    - a SetupIntent that succeeded leaves its PaymentMethod attached to the customer (Stripe
      does that, localstripe does not);
    - a refund of a payment that did not succeed or beyond what is left of it is refused
      (localstripe checks neither): ``charge_not_succeeded``, ``charge_already_refunded``,
      ``amount_too_large``; refunds pass one at a time, so the check holds under concurrency;
    - a charge declined at confirmation names its PaymentIntent in the error (localstripe names
      only the charge) and is a ``card_error``, as Stripe answers.

    Not made up: idempotency keys (localstripe ignores them), decline codes beyond
    ``card_declined``, card brands (localstripe says ``visa`` for every card)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._refunds = threading.Lock()
        self._server = _HTTPServer(self._respond, name="localstripe-adapter")
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()

    def _respond(self, sock: socket.socket, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        try:
            status, reason, answer_headers, answer = self.handle(method, path, headers, body)
        except Exception as exc:  # a bug here is answered, never a hung client
            _answer(sock, 500, json.dumps({"error": {"type": "api_error", "message": f"adapter: {exc!r}"}}).encode())
            return
        _answer(sock, status, answer, reason=reason, headers=answer_headers)

    # --- one request

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        route = urlsplit(path).path
        form = parse_qsl(body.decode(), keep_blank_values=True) if method == "POST" else []
        if method == "GET" and route == "/v1/payment_intents":
            return self._intent_list(path, headers)
        if method != "POST":
            return _forward(self.upstream, method, path, headers, body)
        if route == "/v1/setup_intents":
            return self._post(
                path, headers, _form_renamed(form, "allowed_payment_method_types", "payment_method_types")
            )
        if _SETUP_CONFIRM.match(route):
            return self._setup_confirm(path, headers, form)
        if route == "/v1/payment_intents" or _INTENT_CONFIRM.match(route):
            form = _form_without(
                _form_renamed(form, "allowed_payment_method_types", "payment_method_types"), "description"
            )
            return self._intent_confirm(path, headers, form)
        if route == "/v1/refunds":
            with self._refunds:
                return self._refund(path, headers, form)
        return _forward(self.upstream, method, path, headers, body)

    # --- what localstripe is asked

    def _post(self, path: str, headers: dict[str, str], form: _Form) -> _Answer:
        forwarded = {**headers, "content-type": "application/x-www-form-urlencoded"}
        return _forward(self.upstream, "POST", path, forwarded, urlencode(form).encode())

    def _get_json(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status, _reason, _headers, payload = _forward(self.upstream, "GET", path, _auth_only(headers), b"")
        return status, dict(json.loads(payload or b"{}"))

    def _post_json(self, path: str, headers: dict[str, str], form: _Form) -> tuple[int, dict[str, Any]]:
        status, _reason, _headers, payload = self._post(path, _auth_only(headers), form)
        return status, dict(json.loads(payload or b"{}"))

    # --- the few requests completed

    def _test_payment_method(self, form: _Form, headers: dict[str, str]) -> _Form | _Answer:
        """``form`` with a test payment method localstripe does not know replaced by a card
        created from its number (or the refusal to send back)."""
        name = _form_value(form, "payment_method")
        number = TEST_CARD_NUMBERS.get(name)
        if number is None or name in LOCALSTRIPE_TEST_PAYMENT_METHODS:
            return form  # localstripe's own, a real id, or an unknown name it answers resource_missing to
        if len(number) != 16:
            return _invalid_request("test_card_unsupported", f"localstripe takes 16-digit card numbers only ({name}).")
        card = [
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", str(dt.datetime.now(dt.UTC).year + 3)),
            ("card[cvc]", "123"),
        ]
        status, created = self._post_json("/v1/payment_methods", headers, card)
        if status != 200:
            return _json_answer(status, created)
        return [(key, str(created["id"]) if key == "payment_method" else value) for key, value in form]

    def _setup_confirm(self, path: str, headers: dict[str, str], form: _Form) -> _Answer:
        replaced = self._test_payment_method(form, headers)
        if isinstance(replaced, tuple):
            return replaced
        answer = self._post(path, headers, replaced)
        intent = json.loads(answer[3] or b"{}") if answer[0] == 200 else {}
        if intent.get("status") == "succeeded" and intent.get("payment_method") and intent.get("customer"):
            status, attached = self._post_json(
                f"/v1/payment_methods/{intent['payment_method']}/attach", headers, [("customer", intent["customer"])]
            )
            if status != 200:
                return _json_answer(status, attached)
        return answer

    def _intent_confirm(self, path: str, headers: dict[str, str], form: _Form) -> _Answer:
        replaced = self._test_payment_method(form, headers)
        if isinstance(replaced, tuple):
            return replaced
        answer = self._post(path, headers, replaced)
        if answer[0] != 402:
            return answer
        body = json.loads(answer[3] or b"{}")
        error = body.get("error") or {}
        if error.get("charge") and not error.get("payment_intent"):
            _status, charge = self._get_json(f"/v1/charges/{error['charge']}", headers)
            if charge.get("payment_intent"):
                _status, intent = self._get_json(f"/v1/payment_intents/{charge['payment_intent']}", headers)
                error["payment_intent"] = intent
            error["type"] = "card_error"
        return _json_answer(402, body)

    def _refund(self, path: str, headers: dict[str, str], form: _Form) -> _Answer:
        intent_id = _form_value(form, "payment_intent")
        if intent_id:
            status, intent = self._get_json(f"/v1/payment_intents/{intent_id}?expand%5B0%5D=latest_charge", headers)
            if status != 200:
                return _json_answer(status, intent)
            charge = intent.get("latest_charge")
            if intent.get("status") != "succeeded" or not isinstance(charge, dict):
                return _invalid_request("charge_not_succeeded", "Only a succeeded payment can be refunded.")
            left = int(charge.get("amount") or 0) - int(charge.get("amount_refunded") or 0)
            amount = int(_form_value(form, "amount") or left)
            if left <= 0:
                return _invalid_request(
                    "charge_already_refunded", f"Charge {charge.get('id')} has already been refunded."
                )
            if amount > left:
                return _invalid_request("amount_too_large", f"The refund exceeds what is left of the charge ({left}).")
        reason = _form_value(form, "reason")
        answer = self._post(path, headers, _form_without(form, "reason"))
        if answer[0] != 200 or not reason:
            return answer
        return _json_answer(200, {**json.loads(answer[3]), "reason": reason})

    def _intent_list(self, path: str, headers: dict[str, str]) -> _Answer:
        query = parse_qsl(urlsplit(path).query, keep_blank_values=True)
        expand = [(key, value) for key, value in query if key.startswith("expand")]
        customer = _form_value(query, "customer")
        created = {key[len("created[") : -1]: int(value) for key, value in query if key.startswith("created[")}
        if _form_value(query, "created"):
            created["eq"] = int(_form_value(query, "created"))
        intents: list[dict[str, Any]] = []
        starting_after = ""
        while True:
            page_query = [("limit", str(_LIST_PAGE)), *expand] + (
                [("starting_after", starting_after)] if starting_after else []
            )
            status, page = self._get_json(f"/v1/payment_intents?{urlencode(page_query)}", headers)
            if status != 200:
                return _json_answer(status, page)
            data = list(page.get("data") or [])
            intents += data
            if not page.get("has_more") or not data:
                break
            starting_after = str(data[-1]["id"])
        kept = [
            intent
            for intent in reversed(intents)  # localstripe lists oldest first, Stripe newest first
            if (not customer or _id_of(intent.get("customer")) == customer)
            and _created_matches(int(intent.get("created") or 0), created)
        ]
        after = _form_value(query, "starting_after")
        if after:
            ids = [str(intent["id"]) for intent in kept]
            kept = kept[ids.index(after) + 1 :] if after in ids else []
        limit = int(_form_value(query, "limit") or 10)
        return _json_answer(
            200, {"object": "list", "url": "/v1/payment_intents", "has_more": len(kept) > limit, "data": kept[:limit]}
        )


def _created_matches(created: int, bounds: Mapping[str, int]) -> bool:
    checks = {
        "gte": created.__ge__,
        "gt": created.__gt__,
        "lte": created.__le__,
        "lt": created.__lt__,
        "eq": created.__eq__,
    }
    return all(checks[op](value) for op, value in bounds.items())


def _id_of(value: Any) -> str:
    return str(value.get("id") or "") if isinstance(value, dict) else str(value or "")


def _auth_only(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers that say who asks and in which API version (for the adapter's own requests)."""
    return {name: value for name, value in headers.items() if name in ("authorization", "stripe-version")}


Responder = Callable[[socket.socket, str, str, dict[str, str], bytes], None]


class _HTTPServer(socketserver.ThreadingTCPServer):
    """A local HTTP/1.1 test server, serving from its own thread at once and never holding up
    the test's exit: each connection's one request is read whole (a client gone first:
    nothing to do) and given to ``respond`` with the socket to answer on."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, respond: Responder, *, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _HTTPHandler)
        self.respond = respond
        self.port = int(self.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _HTTPHandler(socketserver.BaseRequestHandler):
    server: _HTTPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(15)
        parsed = _read_request(sock)
        if parsed is not None:
            self.server.respond(sock, *parsed)


# --- the fault proxy


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    at: float  # time.time() when the whole request had arrived
    method: str
    path: str
    idempotency_key: str
    stripe_version: str
    fault: str  # "" when passed through
    body: bytes = b""  # as sent (form-encoded, as the SDK sends it)

    def form(self) -> dict[str, list[str]]:
        """The parameters sent, in the query (GET) or the body (POST), by their flattened name."""
        return parse_qs(urlsplit(self.path).query or self.body.decode(), keep_blank_values=True)


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

    def respond(self, sock: socket.socket, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        """The proxy's answer: the next fault's, or upstream's."""
        fault = self.next_fault()
        with self.lock:
            self.requests.append(
                ProxiedRequest(
                    at=time.time(),
                    method=method,
                    path=path,
                    idempotency_key=headers.get("idempotency-key", ""),
                    stripe_version=headers.get("stripe-version", ""),
                    fault=fault.kind if fault else "",
                    body=body,
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
            self.released.wait(self.stall_seconds)  # never forwarded: the gateway never sees it
            sock.close()
        else:
            status, reason, response_headers, response_body = _forward(self.upstream, method, path, headers, body)
            if kind == "drop_after":
                sock.close()  # processed upstream; the client gets no answer (a FIN)
            elif kind == "stall":
                self.released.wait(self.stall_seconds)  # past the client's timeout
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
        self._state = _State(upstream=(parts.hostname or "127.0.0.1", parts.port or 80), stall_seconds=stall_seconds)
        self._server = _HTTPServer(self._state.respond, name="fault-proxy")
        self.port = self._server.port
        self.url = self._server.url

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def inject(
        self, kind: str, *, times: int | None = 1, status: int = 0, body: bytes | Mapping[str, Any] = b""
    ) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault {kind!r}")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self._state.lock:
            self._state.faults.append(Fault(kind=kind, times=times, status=status, body=raw))

    def clear(self) -> None:
        with self._state.lock:
            self._state.faults.clear()

    def close(self) -> None:
        self._state.released.set()  # stalled answers give up now
        self._server.close()

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
