"""Inbound gateway webhooks: stored once, answered at once, processed by a task.

Receiving (``webhook_event_store``, called by ``webhook_views.StripeWebhookView`` once the
signature verified): one durable transaction inserts the event with ``INSERT … ON CONFLICT
(gateway, event_id) DO NOTHING`` and, only when the row is new, queues
``payments.process_webhook_event`` through the outbox in the same transaction (dedupe key
``webhook:<pk>``). A duplicate delivery stores nothing and queues nothing; a crash after the
commit loses nothing (the outbox drains it).

Processing (``webhook_event_process``), idempotent and order-independent:

1. Claim: a short transaction locks the event row (``select_for_update(skip_locked=True)``: a
   second worker skips it rather than waits) and takes a session-level PostgreSQL advisory lock
   on it, then commits. The advisory lock, not a row lock, is what keeps a second worker away
   while the first one talks to the gateway: no row lock is held across a network call, and
   the lock dies with the connection if the worker is killed. An event already ``processed``
   or ``ignored`` is left alone (``rerun`` resets it first).
2. Handle, with no transaction open: the payload says *which* object changed; its state is
   re-read from the gateway (the intent, the setup intent, the payment method) and recorded
   through the same services the API path uses, each in its own durable transaction, so an
   event delivered twice, late, or before the API call that caused it returned ends in the
   same state as one delivered once in order. Disputes are not re-read (the gateway interface
   has none, and localstripe has no disputes): the signed event is trusted, and the dispute
   functions are idempotent per gateway dispute id.
3. Record: ``processed`` or ``ignored`` (with a note in ``error`` saying why), or ``failed``
   with the error's type and message (never a secret: our gateways' errors carry none) and
   ``attempts`` incremented; ``webhook_event_rerun`` (the admin's re-run) resets it and
   processes it again. One ``webhook.processed`` line per run with the event's id, type,
   status and account.
4. ``webhook_events_process_stale`` (a periodic task) processes events still ``pending`` long
   after they arrived: the outbox hands the task over once, and a worker killed mid-way (tasks
   are acknowledged on receipt) would otherwise leave them pending.

Handled types: ``setup_intent.succeeded``, ``payment_intent.succeeded`` /
``payment_failed`` / ``requires_action``, ``charge.refunded``, ``charge.dispute.created`` /
``closed``, ``payment_method.detached``; any other is ``ignored``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from billing_site.common import ids
from billing_site.common.errors import ApplicationError, NotFound
from billing_site.common.transactions import forbid_transaction
from billing_site.outbox import services as outbox
from payments import charging, disputes, refunds, services
from payments.gateways import gateway as gateway_named
from payments.gateways.base import ChargeStatus, GatewayError, InvalidRequest
from payments.models import Payment, WebhookEvent, WebhookStatus

log = logging.getLogger(__name__)

TASK = "payments.process_webhook_event"
_ADVISORY_NAMESPACE = 0x57484B  # "WHK": the first key of the two-key advisory lock


# --- Receiving


@dataclass(frozen=True, slots=True)
class Received:
    event_pk: int
    created: bool  # False: a duplicate delivery (nothing stored, nothing queued)


def _account_hint(event: dict[str, Any]) -> int | None:
    """The account named in the object's metadata (our intents carry it), for the admin's list
    before processing; processing sets it from our own rows."""
    obj = (event.get("data") or {}).get("object") or {}
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(metadata, dict):
        return ids.decode("acc", str(metadata.get("account_id") or ""))
    return None


MAX_EVENT_DEPTH = 64  # Stripe's events nest about ten deep
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,100}")  # printable ASCII, no spaces
_EVENT_TYPE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL's text and jsonb refuse NUL; UTF-8 has no lone surrogates


def event_checked(event: Any) -> dict[str, Any]:
    """``event`` if it is an event we can store and later read, else a 400 ``invalid_event``
    naming what is wrong: an object whose ``id`` (printable ASCII, at most 100) and ``type``
    (``noun.verb``) are strings, whose ``data.object`` is an object with a string ``id`` when it
    has one, nested at most ``MAX_EVENT_DEPTH`` deep, with no NUL byte or lone surrogate in any
    key or string. Nothing of a refused event is stored."""

    def refuse(why: str) -> ApplicationError:
        return ApplicationError("invalid_event", f"The body is not a Stripe event: {why}.")

    if not isinstance(event, dict):
        raise refuse("not a JSON object")
    stack: list[tuple[Any, int, str]] = [(event, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_EVENT_DEPTH:
            raise refuse(f"nested deeper than {MAX_EVENT_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if _UNSTORABLE.search(key):
                    raise refuse(f"a key in {path or 'the event'} holds a NUL byte or a lone surrogate")
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str) and _UNSTORABLE.search(value):
            raise refuse(f"{path} holds a NUL byte or a lone surrogate")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise refuse("id must be a string of at most 100 printable characters")
    if not isinstance(event_type, str) or len(event_type) > 100 or not _EVENT_TYPE.fullmatch(event_type):
        raise refuse("type must be a string such as charge.refunded")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise refuse("data.object must be an object")
    object_id = data["object"].get("id")
    if object_id is not None and (not isinstance(object_id, str) or not _EVENT_ID.fullmatch(object_id)):
        raise refuse("data.object.id must be a string of at most 100 printable characters")
    return event


@transaction.atomic(durable=True)
def webhook_event_store(*, gateway: str, event: dict[str, Any]) -> Received:
    """Store a verified event once and queue its processing (see the module's docstring). A
    body that is not an event we can store is a 400 ``invalid_event`` (``event_checked``)."""
    event = event_checked(event)
    event_id = str(event["id"])
    event_type = str(event["type"])
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO payments_webhookevent (gateway, event_id, type, payload, status, attempts, error, account_id,
                                               received_at)
            VALUES (%s, %s, %s, %s::jsonb, %s, 0, '', %s, %s)
            ON CONFLICT (gateway, event_id) DO NOTHING
            RETURNING id
            """,
            [
                gateway,
                event_id[:100],
                event_type[:100],
                _json(event),
                WebhookStatus.PENDING,
                _account_hint(event),
                timezone.now(),
            ],
        )
        row = cursor.fetchone()
    if row is None:
        pk = WebhookEvent.objects.values_list("id", flat=True).get(gateway=gateway, event_id=event_id[:100])
        log.info(
            "webhook.duplicate",
            extra={"webhook_event": pk, "gateway": gateway, "event_id": event_id, "type": event_type},
        )
        return Received(event_pk=pk, created=False)
    pk = int(row[0])
    outbox.enqueue_task(TASK, event_id=pk, dedupe_key=f"webhook:{pk}")
    log.info(
        "webhook.received", extra={"webhook_event": pk, "gateway": gateway, "event_id": event_id, "type": event_type}
    )
    return Received(event_pk=pk, created=True)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


# --- Processing


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # WebhookStatus: processed | ignored
    account_id: int | None = None
    note: str = ""


def _advisory_key(event_pk: int) -> int:
    """A 32-bit key for ``pg_try_advisory_lock(namespace, key)`` from the event's id."""
    return int.from_bytes(hashlib.blake2b(str(event_pk).encode(), digest_size=4).digest(), "big", signed=True)


def _claim(event_pk: int) -> WebhookEvent | None:
    """The event, claimed by this worker (the advisory lock held), or None: another worker has
    it, it is already done, or it does not exist."""
    with transaction.atomic(durable=True):
        event = WebhookEvent.objects.select_for_update(skip_locked=True).filter(id=event_pk).first()
        if event is None or event.status in (WebhookStatus.PROCESSED, WebhookStatus.IGNORED):
            return None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [_ADVISORY_NAMESPACE, _advisory_key(event_pk)])
            row = cursor.fetchone()
        if not (row and row[0]):
            return None
        try:  # a session lock outlives a rollback: release it if the claim does not commit
            event.attempts += 1
            event.save(update_fields=["attempts"])
        except BaseException:
            _release(event_pk)
            raise
    return event


def _release(event_pk: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [_ADVISORY_NAMESPACE, _advisory_key(event_pk)])


def webhook_event_process(event_pk: int) -> str:
    """Process one stored event (the task's body). Returns its status afterwards, or ``busy``
    when another worker holds it. Never inside a transaction: it calls the gateway."""
    forbid_transaction("Processing a webhook")
    event = _claim(event_pk)
    if event is None:
        current = WebhookEvent.objects.filter(id=event_pk).values_list("status", flat=True).first()
        if current is None:
            return "missing"
        return current if current in (WebhookStatus.PROCESSED, WebhookStatus.IGNORED) else "busy"
    try:
        handler = HANDLERS.get(event.type)
        try:
            outcome = handler(event) if handler else Outcome(WebhookStatus.IGNORED, note="type not handled")
        except Exception as exc:  # recorded on the event; the admin re-runs it
            error = f"{type(exc).__name__}: {_error_text(exc)}"[:2000]
            WebhookEvent.objects.filter(id=event.id).update(
                status=WebhookStatus.FAILED, error=error, processed_at=timezone.now()
            )
            log.warning(
                "webhook.processed",
                extra={
                    "webhook_event": event.id,
                    "event_id": event.event_id,
                    "type": event.type,
                    "status": WebhookStatus.FAILED,
                    "account_id": ids.encode("acc", event.account_id) if event.account_id else None,
                    "attempts": event.attempts,
                    "error": type(exc).__name__,
                },
            )
            return WebhookStatus.FAILED
        fields: dict[str, Any] = {
            "status": outcome.status,
            "error": outcome.note[:2000],
            "processed_at": timezone.now(),
        }
        if outcome.account_id is not None:
            fields["account_id"] = outcome.account_id
        WebhookEvent.objects.filter(id=event.id).update(**fields)
        account_id = outcome.account_id or event.account_id
        log.info(
            "webhook.processed",
            extra={
                "webhook_event": event.id,
                "event_id": event.event_id,
                "type": event.type,
                "status": outcome.status,
                "account_id": ids.encode("acc", account_id) if account_id else None,
                "attempts": event.attempts,
                "note": outcome.note or None,
            },
        )
        return outcome.status
    finally:
        _release(event.id)


def webhook_event_rerun(event_pk: int) -> str:
    """The admin's re-run: reset the event to ``pending`` and process it again now."""
    forbid_transaction("Re-running a webhook")
    updated = WebhookEvent.objects.filter(id=event_pk).update(status=WebhookStatus.PENDING, error="", processed_at=None)
    if not updated:
        raise NotFound("No such webhook event.")
    log.info("webhook.rerun", extra={"webhook_event": event_pk})
    return webhook_event_process(event_pk)


def webhook_events_process_stale(*, now: dt.datetime | None = None, limit: int = 500) -> dict[str, int]:
    """Process events still ``pending`` long after they arrived (``PAYMENTS_STALE_PROCESSING_SECONDS``):
    the worker that ran their task died mid-way (tasks are acknowledged on receipt), so nothing
    else would. Failed events are left to the admin's re-run. Returns counts by status."""
    forbid_transaction("Processing webhooks")
    now = now or timezone.now()
    stale_before = now - dt.timedelta(seconds=settings.PAYMENTS_STALE_PROCESSING_SECONDS)
    counts: dict[str, int] = {}
    pending = WebhookEvent.objects.filter(status=WebhookStatus.PENDING, received_at__lt=stale_before)
    for pk in pending.order_by("received_at").values_list("id", flat=True)[:limit]:
        status = webhook_event_process(pk)
        counts[status] = counts.get(status, 0) + 1
    log.info("webhooks.process_stale", extra={"counts": counts})
    return counts


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ApplicationError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, GatewayError):
        return getattr(exc, "code", "") or exc.message or type(exc).__name__
    return str(exc)


# --- Handlers: each reads the object id from the payload, re-reads its state, records it.


def _object(event: WebhookEvent) -> dict[str, Any]:
    obj = (event.payload.get("data") or {}).get("object") or {}
    if not isinstance(obj, dict) or not obj.get("id"):
        raise ValueError("the event carries no object id")
    return obj


def _id_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return str(value or "")


def _setup_intent_succeeded(event: WebhookEvent) -> Outcome:
    intent_id = str(_object(event)["id"])
    try:
        method = services.binding_complete(account_id=None, setup_intent_id=intent_id, gateway_name=event.gateway)
    except NotFound:
        return Outcome(WebhookStatus.IGNORED, note=f"no card binding of ours for {intent_id}")
    return Outcome(WebhookStatus.PROCESSED, account_id=method.account_id)


def _payment_for_intent(gateway: str, obj: dict[str, Any]) -> Payment | None:
    intent_id = str(obj["id"])
    payment = Payment.objects.filter(gateway=gateway, gateway_intent_id=intent_id).first()
    if payment is not None:
        return payment
    metadata = obj.get("metadata") or {}
    payment_id = ids.decode("pay", str(metadata.get("payment_id") or "")) if isinstance(metadata, dict) else None
    if payment_id is None:
        return None
    return Payment.objects.filter(id=payment_id, gateway=gateway).first()


def _payment_intent_changed(event: WebhookEvent) -> Outcome:
    obj = _object(event)
    payment = _payment_for_intent(event.gateway, obj)
    if payment is None:
        return Outcome(WebhookStatus.IGNORED, note=f"no payment of ours for intent {obj['id']}")
    intent = gateway_named(event.gateway).payment_intent_retrieve(str(obj["id"]))
    if not payment.gateway_intent_id and intent.metadata.get("payment_id") != payment.public_id:
        return Outcome(WebhookStatus.IGNORED, note=f"intent {intent.intent_id} does not carry {payment.public_id}")
    if payment.gateway_intent_id and payment.gateway_intent_id != intent.intent_id:
        # A second intent carrying our payment id (a gateway that ignored our idempotency key):
        # recording it would overwrite nothing and apply nothing; a success is money someone
        # must look at, so it is said loudly and left on the event for finance.
        if intent.status == ChargeStatus.SUCCEEDED:
            log.warning(
                "payment.extra_intent",
                extra={
                    "payment_id": payment.public_id,
                    "intent": intent.intent_id,
                    "recorded": payment.gateway_intent_id,
                },
            )
        return Outcome(
            WebhookStatus.IGNORED,
            account_id=payment.account_id,
            note=f"intent {intent.intent_id} ({intent.status}) is not the one recorded on {payment.public_id}",
        )
    if intent.status == ChargeStatus.PROCESSING:
        # The gateway has not decided: a later event (or the reconciler) will tell.
        charging.payment_record_outcome(payment_id=payment.id, result=intent)
        return Outcome(WebhookStatus.PROCESSED, account_id=payment.account_id, note="still processing at the gateway")
    recorded = charging.payment_record_outcome(payment_id=payment.id, result=intent)
    return Outcome(WebhookStatus.PROCESSED, account_id=recorded.account_id)


def _charge_refunded(event: WebhookEvent) -> Outcome:
    charge = _object(event)
    intent_id = _id_of(charge.get("payment_intent"))
    payment = (
        Payment.objects.filter(gateway=event.gateway, gateway_intent_id=intent_id).first() if intent_id else None
    ) or Payment.objects.filter(gateway=event.gateway, gateway_charge_id=str(charge["id"])).first()
    if payment is None:
        return Outcome(WebhookStatus.IGNORED, note=f"no payment of ours for charge {charge['id']}")
    if not payment.gateway_intent_id:
        raise ValueError(f"{payment.public_id} has no intent id yet; re-run once it is recorded")
    intent = gateway_named(event.gateway).payment_intent_retrieve(payment.gateway_intent_id)
    synced = refunds.refunds_sync_from_gateway(payment_id=payment.id, intent=intent, listed=_listed_refunds(charge))
    note = ""
    if synced.recorded or synced.resolved:
        note = f"recorded {len(synced.recorded)} refund(s) made at the gateway; settled {len(synced.resolved)} of ours"
    return Outcome(WebhookStatus.PROCESSED, account_id=payment.account_id, note=note)


def _listed_refunds(charge: dict[str, Any]) -> list[refunds.GatewayRefund] | None:
    """The refunds a charge object lists (``refunds.data``), or None when it lists none (recent
    API versions leave ``refunds`` out of the charge unless expanded)."""
    listed = charge.get("refunds")
    data = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(data, list):
        return None
    found = []
    for item in data:
        if not isinstance(item, dict) or not item.get("id"):
            continue
        metadata = item.get("metadata") or {}
        found.append(
            refunds.GatewayRefund(
                refund_id=str(item["id"]),
                amount_minor=int(item.get("amount") or 0),
                status=str(item.get("status") or "succeeded"),
                our_refund_id=str(metadata.get("refund_id") or "") if isinstance(metadata, dict) else "",
                reason=str(item.get("reason") or ""),
            )
        )
    return found


def _dispute_open(event: WebhookEvent, dispute: dict[str, Any]) -> Any:
    return disputes.dispute_opened(
        gateway=event.gateway,
        gateway_dispute_id=str(dispute["id"]),
        charge_id=_id_of(dispute.get("charge")),
        intent_id=_id_of(dispute.get("payment_intent")),
        amount_minor=int(dispute.get("amount") or 0),
        currency=str(dispute.get("currency") or ""),
        reason=str(dispute.get("reason") or ""),
    )


def _dispute_created(event: WebhookEvent) -> Outcome:
    dispute = _object(event)
    opened = _dispute_open(event, dispute)
    if opened is None:
        return Outcome(WebhookStatus.IGNORED, note=f"no payment of ours for dispute {dispute['id']}")
    return Outcome(WebhookStatus.PROCESSED, account_id=opened.account_id)


# Stripe's closing statuses: won and lost; an inquiry closed without a chargeback gives the
# funds back as a win does.
_CLOSED = {"won": "won", "warning_closed": "won", "lost": "lost"}


def _dispute_closed(event: WebhookEvent) -> Outcome:
    dispute = _object(event)
    status = _CLOSED.get(str(dispute.get("status") or ""))
    if status is None:
        return Outcome(WebhookStatus.IGNORED, note=f"dispute status {dispute.get('status')!r} is not a closing one")
    # Order-independent: a close that arrives before the opening records the opening first.
    opened = _dispute_open(event, dispute)
    if opened is None:
        return Outcome(WebhookStatus.IGNORED, note=f"no payment of ours for dispute {dispute['id']}")
    closed = disputes.dispute_closed(gateway=event.gateway, gateway_dispute_id=str(dispute["id"]), status=status)
    assert closed is not None
    return Outcome(WebhookStatus.PROCESSED, account_id=closed.account_id)


def _payment_method_detached(event: WebhookEvent) -> Outcome:
    method_id = str(_object(event)["id"])
    try:
        info = gateway_named(event.gateway).payment_method_retrieve(method_id)
    except InvalidRequest as exc:
        if exc.code != "resource_missing":
            raise
        attached = False  # gone at the gateway: certainly detached
    else:
        attached = bool(info.customer_id)
    if attached:
        return Outcome(WebhookStatus.IGNORED, note=f"{method_id} is attached again at the gateway")
    method = services.payment_method_detached(gateway_name=event.gateway, gateway_payment_method_id=method_id)
    if method is None:
        return Outcome(WebhookStatus.IGNORED, note=f"no card of ours is {method_id}")
    return Outcome(WebhookStatus.PROCESSED, account_id=method.account_id)


HANDLERS: dict[str, Callable[[WebhookEvent], Outcome]] = {
    "setup_intent.succeeded": _setup_intent_succeeded,
    "payment_intent.succeeded": _payment_intent_changed,
    "payment_intent.payment_failed": _payment_intent_changed,
    "payment_intent.requires_action": _payment_intent_changed,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
    "payment_method.detached": _payment_method_detached,
}
