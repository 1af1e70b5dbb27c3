"""Charging an invoice: intent first, the gateway call outside any transaction, the outcome
in a second transaction, and a reconciler for answers that were lost.

1. ``payment_create`` (one durable transaction): reads what is outstanding, picks the default
   card and inserts a ``pending`` Payment with the next attempt number. The partial unique
   index ``payments_payment_one_active`` allows one pending/processing/unknown payment per
   invoice: whoever loses the race (the customer's pay call, the post-issue charge, a dunning
   retry, a new card) gets the active payment back instead of a second charge.
2. ``payment_execute``: moves it to ``processing`` (a short transaction; only one caller wins),
   then calls the gateway with the idempotency key ``pay_<id>`` and our payment id in the
   PaymentIntent's metadata, with no transaction open and no lock held.
3. The outcome is recorded under the payment's row lock, with the state re-checked: success
   applies the money to the invoice through ``invoicing.services.payment_apply`` in the same
   transaction (an excess becomes customer credit); a decline opens or advances the invoice's
   dunning case; an authentication request keeps the client secret for the customer; a lost
   answer (timeout, reset, 5xx) leaves the payment ``unknown``.
4. ``payments_reconcile`` (beat, every minute) asks the gateway about ``unknown`` payments and
   ``processing`` ones older than ``PAYMENTS_STALE_PROCESSING_SECONDS`` (a worker killed
   mid-call): by PaymentIntent id when we have it, else by listing the customer's intents and
   matching ``metadata.payment_id``. We never rely on the gateway honouring idempotency keys
   (localstripe ignores them): while a payment is ``unknown``, nothing charges its invoice.
   A payment the gateway has no trace of was never sent (the request was reset before it got
   there, or the worker died before it left): that is our failure, not the customer's, so it
   goes back to ``pending`` and is sent again at once, the same payment with the same
   idempotency key (no decline, no dunning). A call that certainly never left
   (``GatewayUnavailable``, ``RateLimited``) does the same; ``pending`` payments are sent again
   one minute after, then after twice as long each time (``resend_delay``, up to an hour).

Every step logs one ``payment.*`` line with the payment, invoice and account ids.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, connections, transaction
from django.db.models import Q
from django.utils import timezone

from accounts import selectors as account_selectors
from antifraud import services as antifraud_services
from billing_site.common import ids, transitions
from billing_site.common.actors import Actor
from billing_site.common.copy import BulkTable
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.transactions import forbid_transaction
from billing_site.common.transitions import StateChangeRow, state_change_table
from billing_site.outbox import services as outbox
from invoicing import selectors as invoicing_selectors
from invoicing import services as invoicing_services
from payments import dunning
from payments.declines import customer_message
from payments.gateways import gateway as gateway_named
from payments.gateways.base import (
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayError,
    GatewayUnavailable,
    InvalidRequest,
    OutcomeUnknown,
    PaymentDeclined,
    RateLimited,
)
from payments.models import (
    ACTIVE_STATUSES,
    DunningCase,
    DunningCaseStatus,
    GatewayCall,
    Payment,
    PaymentMethod,
    PaymentProfile,
    PaymentStatus,
    PaymentTransition,
    PaymentTrigger,
)

log = logging.getLogger(__name__)

SYSTEM = Actor.system("payments")


# --- Rows a chunk writes set-based (COPY): described once, as ``BulkTable`` rows.


_TRANSITIONS = state_change_table(PaymentTransition)


class _CallRow(NamedTuple):
    account_id: int
    payment_id: int
    operation: str
    outcome: str
    gateway_object_id: str
    detail: str
    duration_ms: int
    created_at: dt.datetime


_CALLS = BulkTable(
    "payments_gatewaycall",
    _CallRow,
    {
        "account_id": "bigint",
        "payment_id": "bigint",
        "operation": "text",
        "outcome": "text",
        "gateway_object_id": "text",
        "detail": "text",
        "duration_ms": "integer",
        "created_at": "timestamptz",
    },
)


class _PaymentRow(NamedTuple):  # a new pending payment, as ``_new_payment`` builds it
    id: int
    account_id: int
    invoice_id: int
    attempt: int
    trigger: str
    status: str
    amount_minor: int
    currency: str
    gateway: str
    gateway_customer_id: str
    payment_method_id: int | None
    idempotency_key: str
    gateway_intent_id: str | None
    gateway_charge_id: str
    decline_code: str
    decline_message: str
    retryable: bool
    client_secret: str
    next_action_url: str
    amount_refunded_minor: int
    amount_disputed_minor: int
    created_at: dt.datetime
    updated_at: dt.datetime


_PAYMENTS = BulkTable(
    "payments_payment",
    _PaymentRow,
    {
        "id": "bigint",
        "account_id": "bigint",
        "invoice_id": "bigint",
        "attempt": "integer",
        "trigger": "text",
        "status": "text",
        "amount_minor": "bigint",
        "currency": "text",
        "gateway": "text",
        "gateway_customer_id": "text",
        "payment_method_id": "bigint",
        "idempotency_key": "text",
        "gateway_intent_id": "text",
        "gateway_charge_id": "text",
        "decline_code": "text",
        "decline_message": "text",
        "retryable": "boolean",
        "client_secret": "text",
        "next_action_url": "text",
        "amount_refunded_minor": "bigint",
        "amount_disputed_minor": "bigint",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
)


def _payments_insert(payments: list[Payment]) -> set[int]:
    """Insert new payments in one statement; the ids inserted (the unique indexes decide:
    one active payment per invoice, one payment per attempt)."""
    if not payments:
        return set()
    now = timezone.now()
    for payment in payments:
        payment.updated_at = now
    rows = [_PaymentRow(*(getattr(p, name) for name in _PaymentRow._fields)) for p in payments]
    source, params = _PAYMENTS.unnest(rows)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_PAYMENTS.name} ({_PAYMENTS.column_list}) SELECT * FROM {source} "  # noqa: S608 (our names)
            "ON CONFLICT DO NOTHING RETURNING id",
            params,
        )
        inserted = {row[0] for row in cursor.fetchall()}
    for payment in payments:
        if payment.id in inserted:
            payment._state.adding, payment._state.db = False, "default"
    return inserted


def _transitions_write(
    payments: Sequence[Payment], *, before: str, actor: Actor, reason: str = "", at: dt.datetime | None = None
) -> None:
    """The audit rows of many payments' one transition (``before`` → their status now), and
    its one log line for the chunk: ``payment.transitions`` with every payment's id, invoice
    and account (parallel lists, in the same order) instead of one ``payment.transition`` line
    each (the chunked path's batched form of the house rule)."""
    if not payments:
        return
    at = at or timezone.now()
    _TRANSITIONS.copy(
        StateChangeRow(p.id, p.account_id, before, p.status, actor.kind.value, actor.name, reason, at) for p in payments
    )
    _chunk_log("payment.transitions", payments, **{"from": before, "to": payments[0].status, "actor": actor.name})


def _moved(payment: Payment, status: str) -> None:
    """The in-memory copy of a payment a set-based statement just moved follows its row (the
    FSM field refuses assignment; this is what ``refresh_from_db`` does)."""
    payment.__dict__["status"] = status


def _chunk_log(event: str, payments: Sequence[Payment], **fields: object) -> None:
    log.info(
        event,
        extra={
            "payments": len(payments),
            "payment_ids": [ids.encode("pay", p.id) for p in payments],
            "invoice_ids": [ids.encode("inv", p.invoice_id) for p in payments],
            "account_ids": [ids.encode("acc", p.account_id) for p in payments],
            **fields,
        },
    )


@dataclass(frozen=True, slots=True)
class PaymentStart:
    payment: Payment
    created: bool  # False: an active payment of the invoice already existed (returned instead)


def _transition(payment: Payment, name: str, *, actor: Actor, reason: str = "") -> None:
    """The payment's transition through the one helper, saving every field: callers set the
    gateway's answer (ids, decline code) on the row with the transition."""
    transitions.transition(payment, name, actor=actor, reason=reason, update_fields=None)


def default_payment_method(account_id: int) -> PaymentMethod | None:
    return PaymentMethod.objects.filter(account_id=account_id, is_default=True, detached_at__isnull=True).first()


def payment_create(
    *, invoice_id: int, trigger: str, actor: Actor = SYSTEM, account_id: int | None = None
) -> PaymentStart:
    """Intent first: a ``pending`` payment of what is outstanding, committed before any call.

    ``account_id`` scopes the look-up (the customer's API: someone else's invoice → 404).
    Nothing outstanding → 409 ``nothing_due``; no card → 409 ``no_payment_method`` (and the
    invoice's dunning case records it, unless the customer asked)."""
    if trigger not in PaymentTrigger.values:
        raise ApplicationError("invalid", f"Unknown trigger {trigger!r}.", field="trigger")
    for _ in range(3):  # a lost race on the attempt number is retried with the next one
        try:
            start = _payment_create(invoice_id=invoice_id, trigger=trigger, actor=actor, account_id=account_id)
        except _AttemptTaken:
            continue
        if start is None:  # committed: the dunning case knows there is no card
            raise Conflict("no_payment_method", "No card is bound to this billing account: bind one first.")
        return start
    raise Conflict("conflict", "The invoice is being charged; try again.")


class _AttemptTaken(Exception):
    pass


def _awaiting_authentication(latest: Payment | None, method: PaymentMethod | None) -> bool:
    """Whether the invoice's latest payment waits for the customer's authentication on the
    account's default card and is recent (``PAYMENTS_AUTHENTICATION_WINDOW_SECONDS``): the
    payment under way, which the customer's pay call returns instead of canceling its intent
    and creating another. A new default card, or a later call, starts a new attempt."""
    if latest is None or method is None or latest.status != PaymentStatus.REQUIRES_ACTION:
        return False
    window = dt.timedelta(seconds=settings.PAYMENTS_AUTHENTICATION_WINDOW_SECONDS)
    return latest.created_at >= timezone.now() - window and latest.payment_method_id == method.id


# --- The rules a new payment obeys, once: for one invoice (the API, a task) or a chunk of them
# (a period close's charges). What they read is read set-based (``_facts``); ``_decide`` is
# pure, so a chunk of 500 obeys exactly what one invoice does.


@dataclass(frozen=True, slots=True)
class _Facts:
    blocked: set[int]  # accounts blocked (fraud): not charged until the fraud team decides
    methods: dict[int, PaymentMethod]  # account → its default card
    customers: dict[int, str]  # account → its customer at the gateway
    active: dict[int, Payment]  # invoice → its active (pending, processing, unknown) payment
    latest: dict[int, Payment]  # invoice → its latest attempt


def _facts(invoices: list[invoicing_selectors.PayableInvoice]) -> _Facts:
    account_ids = {i.account_id for i in invoices}
    invoice_ids = [i.invoice_id for i in invoices]
    standings = account_selectors.billing_account_standings(account_ids)
    return _Facts(
        blocked={a for a, standing in standings.items() if standing.state == "blocked"},
        methods={
            m.account_id: m
            for m in PaymentMethod.objects.filter(account_id__in=account_ids, is_default=True, detached_at__isnull=True)
        },
        customers=dict(
            PaymentProfile.objects.filter(account_id__in=account_ids).values_list("account_id", "gateway_customer_id")
        ),
        active={
            p.invoice_id: p for p in Payment.objects.filter(invoice_id__in=invoice_ids, status__in=ACTIVE_STATUSES)
        },
        latest={
            p.invoice_id: p
            for p in Payment.objects.filter(invoice_id__in=invoice_ids)
            .order_by("invoice_id", "-attempt")
            .distinct("invoice_id")
        },
    )


@dataclass(frozen=True, slots=True)
class _Decision:
    existing: Payment | None = None  # the payment under way: returned, never a second one
    refusal: str = ""  # nothing_due | account_blocked | card_already_tried | no_payment_method
    method: PaymentMethod | None = None  # else: a new payment on this card, this attempt
    attempt: int = 0


_REFUSALS = {
    "nothing_due": "Nothing is due on invoice {number}.",
    "account_blocked": "This billing account cannot be charged; contact support.",
    "card_already_tried": "Invoice {number} was charged to this card already.",
    "no_payment_method": "No card is bound to this billing account: bind one first.",
}


def _nothing_due(invoice: invoicing_selectors.PayableInvoice) -> bool:
    """Whether a card may not be charged for ``invoice``: not issued (paid, void, written off)
    or nothing outstanding. Asked when a payment is decided, when it is written, and again
    each time it is claimed to be sent."""
    return invoice.status != "issued" or invoice.outstanding_minor <= 0


def _decide(invoice: invoicing_selectors.PayableInvoice, facts: _Facts, trigger: str) -> _Decision:
    active = facts.active.get(invoice.invoice_id)
    if active is not None:
        return _Decision(existing=active)
    if _nothing_due(invoice):
        return _Decision(refusal="nothing_due")
    method = facts.methods.get(invoice.account_id)
    latest = facts.latest.get(invoice.invoice_id)
    if trigger == PaymentTrigger.CUSTOMER and _awaiting_authentication(latest, method):
        return _Decision(existing=latest)
    if invoice.account_id in facts.blocked:
        return _Decision(refusal="account_blocked")
    if trigger == PaymentTrigger.NEW_CARD and method is not None and latest and latest.payment_method_id == method.id:
        # A new default's charge, queued twice (by setting the default and by the outcome of
        # the payment it raced): the card was tried since it became the default.
        return _Decision(refusal="card_already_tried")
    if method is None:
        return _Decision(refusal="no_payment_method")
    return _Decision(method=method, attempt=(latest.attempt if latest is not None else 0) + 1)


def _new_payment(
    invoice: invoicing_selectors.PayableInvoice, decision: _Decision, facts: _Facts, trigger: str
) -> Payment:
    assert decision.method is not None
    payment_id = ids.new_id()
    return Payment(
        id=payment_id,
        account_id=invoice.account_id,
        invoice_id=invoice.invoice_id,
        attempt=decision.attempt,
        trigger=trigger,
        amount_minor=invoice.outstanding_minor,
        currency=invoice.currency,
        gateway=decision.method.gateway,
        gateway_customer_id=facts.customers.get(invoice.account_id, ""),
        payment_method=decision.method,
        idempotency_key=ids.encode("pay", payment_id),
    )


def _created_log(payment: Payment, actor: Actor) -> PaymentTransition:
    log.info(
        "payment.created",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "attempt": payment.attempt,
            "trigger": payment.trigger,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
            "gateway": payment.gateway,
        },
    )
    return PaymentTransition(
        payment=payment,
        account_id=payment.account_id,
        from_state="",
        to_state=payment.status,
        actor_kind=actor.kind.value,
        actor_name=actor.name,
        reason=f"created ({payment.trigger})",
    )


@transaction.atomic(durable=True)
def _payment_create(*, invoice_id: int, trigger: str, actor: Actor, account_id: int | None) -> PaymentStart | None:
    invoice = invoicing_selectors.payable_invoice(invoice_id=invoice_id, account_id=account_id)
    if invoice is None:
        raise NotFound("No such invoice.")
    facts = _facts([invoice])
    decision = _decide(invoice, facts, trigger)
    if decision.existing is not None:
        return PaymentStart(payment=decision.existing, created=False)
    if decision.refusal == "no_payment_method" and trigger != PaymentTrigger.CUSTOMER:
        dunning.case_record_failure(invoice=invoice, decline_code="no_payment_method", retryable=True, payment=None)
        return None
    if decision.refusal:
        raise Conflict(decision.refusal, _REFUSALS[decision.refusal].format(number=invoice.number))
    payment = _new_payment(invoice, decision, facts, trigger)
    try:
        with transaction.atomic():
            payment.save(force_insert=True)
    except IntegrityError as exc:
        # Another caller's payment became active (or took this attempt number) meanwhile:
        # the constraint decided. Return theirs; never start a second one.
        active = Payment.objects.filter(invoice_id=invoice_id, status__in=ACTIVE_STATUSES).first()
        if active is not None:
            return PaymentStart(payment=active, created=False)
        raise _AttemptTaken from exc
    # What is outstanding, read again now that this payment is the invoice's active one: a
    # payment that was active before ours has recorded its outcome in the transaction that
    # made it inactive, so this read sees the money it applied (the first read may not have).
    fresh = invoicing_selectors.payable_invoice(invoice_id=invoice_id, account_id=account_id)
    if fresh is None or _nothing_due(fresh):
        raise Conflict("nothing_due", f"Nothing is due on invoice {invoice.number}.")  # rolls the insert back
    if fresh.outstanding_minor != payment.amount_minor:
        payment.amount_minor = fresh.outstanding_minor
        payment.save(update_fields=["amount_minor"])
    _created_log(payment, actor).save()
    return PaymentStart(payment=payment, created=True)


def _claim(payment_id: int) -> Payment | None:
    """pending → processing, for one caller only; the payment, or None if someone else has it
    or its invoice owes nothing any more (voided, written off, paid otherwise while the payment
    waited to be sent again: canceled, never sent). An invoice that still owes less than the
    payment is charged the payment's amount with its key (a resend must be the same request),
    and the rest is kept as the customer's credit by ``payment_apply``."""
    with transaction.atomic(durable=True):
        payment = Payment.objects.select_for_update().filter(id=payment_id).first()
        if payment is None or payment.status != PaymentStatus.PENDING:
            return None
        invoice = invoicing_selectors.payable_invoice(invoice_id=payment.invoice_id)
        if invoice is None or _nothing_due(invoice):
            state = invoice.status if invoice is not None else "gone"
            _transition(payment, "cancel", actor=SYSTEM, reason=f"nothing due: the invoice is {state}")
            return None
        payment.sent_at = timezone.now()
        _transition(payment, "send", actor=SYSTEM)
        return payment


def payment_execute(*, payment_id: int) -> Payment:
    """Send a pending payment to its gateway and record the outcome (see the module's steps).
    Returns the payment as recorded; a payment already claimed by someone else is returned as
    it stands."""
    forbid_transaction("Charging a card")
    payment = _claim(payment_id)
    if payment is None:
        return Payment.objects.get(id=payment_id)
    _cancel_abandoned_authentications(payment)
    started = time.monotonic()
    result = _send(payment)
    _call_record(payment, "charge", result, started)
    return payment_record_outcome(payment_id=payment.id, result=result)


def _send(payment: Payment) -> ChargeResult | GatewayError:
    """The gateway call of a claimed payment: idempotency key ``pay_<id>``, our ids in the
    intent's metadata. No transaction open, no lock held."""
    assert payment.payment_method is not None
    request = ChargeRequest(
        customer_id=payment.gateway_customer_id,
        payment_method_id=payment.payment_method.gateway_payment_method_id,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        idempotency_key=payment.idempotency_key,
        metadata={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
        },
        description=f"Invoice {ids.encode('inv', payment.invoice_id)}",
    )
    try:
        return gateway_named(payment.gateway).charge(request)
    except GatewayError as exc:
        return exc


def _call_outcome(result: ChargeResult | GatewayError | None) -> tuple[str, str, str]:
    """A ``GatewayCall``'s outcome, gateway object id and detail for what the gateway said."""
    if isinstance(result, ChargeResult):
        outcome, object_id, detail = result.status, result.intent_id, result.decline_code
    elif isinstance(result, PaymentDeclined):
        outcome, object_id, detail = "declined", result.intent_id, result.code
    else:
        outcome, object_id, detail = type(result).__name__, "", str(result)[:300]
    return outcome, object_id or "", detail or ""


def _call_record(payment: Payment, operation: str, result: ChargeResult | GatewayError, started: float) -> None:
    outcome, object_id, detail = _call_outcome(result)
    GatewayCall.objects.create(
        account_id=payment.account_id,
        payment_id=payment.id,
        operation=operation,
        outcome=outcome,
        gateway_object_id=object_id,
        detail=detail,
        duration_ms=round((time.monotonic() - started) * 1000),
    )


def payment_record_outcome(*, payment_id: int, result: ChargeResult | GatewayError, actor: Actor = SYSTEM) -> Payment:
    """Record what the gateway said (a live answer, a retrieved intent, a webhook's intent) in
    one durable transaction under the payment's row lock. Idempotent: an outcome already
    recorded is not recorded again, and a late success of a payment we had written off as
    failed is still applied (the money was taken: it is never lost)."""
    with transaction.atomic(durable=True):
        payment = Payment.objects.select_for_update().get(id=payment_id)
        _apply(payment, result, actor=actor)
        return payment


def _apply(payment: Payment, result: ChargeResult | GatewayError, *, actor: Actor) -> None:
    if isinstance(result, ChargeResult):
        if result.intent_id and not payment.gateway_intent_id:
            payment.gateway_intent_id = result.intent_id
        if result.charge_id:
            payment.gateway_charge_id = result.charge_id
        if result.status == ChargeStatus.SUCCEEDED:
            _succeeded(payment, actor=actor)
        elif result.status == ChargeStatus.REQUIRES_ACTION:
            if payment.status in (PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN):
                payment.client_secret = result.client_secret
                payment.next_action_url = result.next_action_url
                payment.decline_code = "authentication_required"
                payment.decline_message = customer_message("authentication_required")
                _transition(payment, "require_action", actor=actor)
                dunning.notify_authentication_required(payment=payment)
                _charge_new_default(payment)
                invoice = invoicing_selectors.payable_invoice(invoice_id=payment.invoice_id)
                if invoice is not None and invoice.kind == "threshold":
                    # Not paid now: the credit limit is reached, so the account stops until
                    # the customer authenticates (the payment then reactivates it).
                    dunning.case_record_failure(
                        invoice=invoice,
                        decline_code="authentication_required",
                        retryable=True,
                        payment=payment,
                        notify=False,
                    )
        elif result.status in (ChargeStatus.FAILED, ChargeStatus.CANCELED):
            if result.status == ChargeStatus.CANCELED and payment.status == PaymentStatus.REQUIRES_ACTION:
                payment.completed_at = timezone.now()
                _transition(payment, "cancel", actor=actor, reason="authentication abandoned")
            else:
                _declined(
                    payment, result.decline_code or "card_declined", result.retryable, result.decline_message, actor
                )
        else:  # processing at the gateway: ask again later
            payment.save()
        return
    if isinstance(result, PaymentDeclined):
        if result.intent_id and not payment.gateway_intent_id:
            payment.gateway_intent_id = result.intent_id
        _declined(payment, result.code, result.retryable, result.message, actor)
    elif isinstance(result, GatewayUnavailable | RateLimited):
        # Certainly not sent (the connection was never made, or the gateway kept refusing us):
        # our failure, not the customer's. The same payment is sent again (the reconciler).
        if payment.status == PaymentStatus.PROCESSING:
            _requeue(payment, actor=actor, reason=f"not sent: {result}"[:300])
    elif isinstance(result, InvalidRequest):
        # The gateway refused the request itself (a detached card, a bug): failed, retryable.
        _declined(payment, result.code, True, str(result), actor, customer_fault=False)
    elif isinstance(result, OutcomeUnknown | GatewayError) and payment.status == PaymentStatus.PROCESSING:
        _transition(payment, "lose_track", actor=actor, reason=str(result)[:300])


def _succeeded(payment: Payment, *, actor: Actor) -> None:
    if payment.status == PaymentStatus.SUCCEEDED:
        return  # recorded before (a webhook and the live answer, in any order)
    late = payment.status in (PaymentStatus.FAILED, PaymentStatus.CANCELED)
    payment.completed_at = timezone.now()
    payment.decline_code = payment.decline_message = payment.client_secret = payment.next_action_url = ""
    if late:
        # The gateway took the money after all (an authentication completed after we moved on,
        # a decline we misread): FSM states are final, so the row is corrected with an audit
        # note, and the money is applied like any other.
        before = payment.status
        Payment.objects.filter(id=payment.id).update(status=PaymentStatus.SUCCEEDED, completed_at=payment.completed_at)
        payment.refresh_from_db()
        PaymentTransition.objects.create(
            payment=payment,
            account_id=payment.account_id,
            from_state=before,
            to_state=PaymentStatus.SUCCEEDED,
            actor_kind=actor.kind.value,
            actor_name=actor.name,
            reason="the gateway reports the charge succeeded after all",
        )
        log.warning("payment.late_success", extra={"payment_id": payment.public_id, "from": before})
    else:
        _transition(payment, "succeed", actor=actor)
    applied = invoicing_services.payment_apply(
        invoice_id=payment.invoice_id,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        reference=payment.public_id,
        received_at=payment.completed_at,
    )
    log.info(
        "payment.applied",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "applied_minor": applied.applied_minor,
            "credited_minor": applied.credited_minor,
            "invoice_paid": applied.invoice_paid,
        },
    )
    if applied.invoice_paid or applied.applied_minor:
        dunning.invoice_settled(account_id=payment.account_id, invoice_id=payment.invoice_id, paid=applied.invoice_paid)


def _declined(
    payment: Payment, code: str, retryable: bool, message: str, actor: Actor, *, customer_fault: bool = True
) -> None:
    if payment.status in (PaymentStatus.FAILED, PaymentStatus.SUCCEEDED, PaymentStatus.CANCELED):
        return
    payment.decline_code = code[:64]
    payment.decline_message = customer_message(code, message)[:300]
    payment.retryable = retryable
    payment.completed_at = timezone.now()
    payment.client_secret = ""
    _transition(payment, "fail", actor=actor, reason=code)
    invoice = invoicing_selectors.payable_invoice(invoice_id=payment.invoice_id)
    if invoice is not None:
        dunning.case_record_failure(
            invoice=invoice,
            decline_code=code,
            retryable=retryable,
            payment=payment,
            notify=customer_fault,
            customer_fault=customer_fault,
        )
    _charge_new_default(payment)
    if customer_fault:  # the card's decline, not our gateway's trouble: antifraud's checkpoint 3
        antifraud_services.payment_outcome_record(
            account_id=payment.account_id,
            kind="decline",
            reference=payment.public_id,
            code=code,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
        )


def _charge_new_default(payment: Payment) -> None:
    """A payment that ended without the money (declined, refused, waiting for authentication)
    on a card that is no longer the account's default: what is outstanding is charged to the
    new default (through the outbox, after this commit). A new default set while this payment
    was in flight found it active and charged nothing; this is where that charge happens.

    Under the account's profile row lock, which setting a default takes too: either the new
    default committed first and is seen here, or it commits after this outcome and its own
    charge finds no active payment. Either way the new card is charged once it is the default
    and nothing is in flight (``payment_create`` skips a new-card charge of a card the invoice's
    latest attempt already used)."""
    if payment.payment_method_id is None:
        return
    PaymentProfile.objects.select_for_update().filter(account_id=payment.account_id).first()
    method = default_payment_method(payment.account_id)
    if method is None or method.id == payment.payment_method_id:
        return
    outbox.enqueue_task(
        "payments.charge_invoice",
        invoice_id=payment.invoice_id,
        account_id=payment.account_id,
        trigger=PaymentTrigger.NEW_CARD,
        dedupe_key=f"charge-new-default-after:{payment.id}",
    )
    log.info(
        "payment.new_default_charge_queued",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "payment_method_id": method.public_id,
        },
    )


def _requeue(payment: Payment, *, actor: Actor, reason: str) -> None:
    """Never sent: back to ``pending`` with its idempotency key, for ``payments_reconcile`` to
    send again. No decline, no dunning, no email: nothing happened at the card."""
    _transition(payment, "requeue", actor=actor, reason=reason)
    log.warning(
        "payment.not_sent",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "reason": reason,
        },
    )


def _cancel_abandoned_authentications(payment: Payment) -> None:
    """Before a new attempt: cancel the invoice's intents still waiting for the customer's
    authentication, so a late authentication cannot charge twice (if one turns out to have
    succeeded, it is recorded: the new attempt then finds the excess kept as credit)."""
    stale = list(
        Payment.objects.filter(invoice_id=payment.invoice_id, status=PaymentStatus.REQUIRES_ACTION).exclude(
            id=payment.id
        )
    )
    for old in stale:
        if not old.gateway_intent_id:
            continue
        try:
            result = gateway_named(old.gateway).payment_intent_cancel(old.gateway_intent_id)
        except GatewayError:
            continue
        payment_record_outcome(payment_id=old.id, result=result)


# --- Reconciliation

# A payment that was never sent (the gateway unreachable, or no trace of it there) is sent
# again after RESEND_FIRST, then after twice as long each time, up to RESEND_MAX between sends.
RESEND_FIRST = dt.timedelta(seconds=60)
RESEND_MAX = dt.timedelta(hours=1)
# How long one reconcile run keeps sending (its task's soft limit is 240 s); the rest waits
# for the next run, a minute later.
RECONCILE_SEND_SECONDS = 120.0


def resend_delay(sends: int) -> dt.timedelta:
    """How long a ``pending`` payment sent ``sends`` times before waits to be sent again."""
    return min(RESEND_FIRST * 2 ** min(max(sends - 1, 0), 16), RESEND_MAX)


def payments_reconcile(*, now: dt.datetime | None = None, limit: int = 500) -> dict[str, int]:
    """Resolve ``unknown`` and stale ``processing`` payments by asking the gateway; send again
    at once those it has no trace of (the same payment, with its idempotency key), and the
    ``pending`` ones whose time has come (never sent, or not sent because the gateway could not
    be reached: ``resend_delay``). Returns counts by what was found."""
    forbid_transaction("Reconciling payments")
    now = now or timezone.now()
    started = time.monotonic()
    stale_before = now - dt.timedelta(seconds=settings.PAYMENTS_STALE_PROCESSING_SECONDS)
    counts = {"checked": 0, "resolved": 0, "still_unknown": 0, "not_sent": 0, "sent": 0}
    candidates = Payment.objects.filter(
        Q(status=PaymentStatus.UNKNOWN)
        | Q(status=PaymentStatus.PROCESSING, sent_at__lt=stale_before)
        | Q(status=PaymentStatus.PENDING, updated_at__lte=now - RESEND_FIRST)
    ).order_by("updated_at")[:limit]
    for payment in candidates:
        if payment.status == PaymentStatus.PENDING:
            sends = GatewayCall.objects.filter(payment_id=payment.id, operation="charge").count()
            if payment.updated_at > now - resend_delay(sends):
                continue
            if time.monotonic() - started > RECONCILE_SEND_SECONDS:
                continue  # the next run sends it
            counts["checked"] += 1
            payment_execute(payment_id=payment.id)
            counts["sent"] += 1
            continue
        counts["checked"] += 1
        outcome = payment_reconcile(payment_id=payment.id, stale_before=stale_before)
        counts[outcome] += 1
        if outcome == "not_sent":
            payment_execute(payment_id=payment.id)  # at once: it has waited long enough
            counts["sent"] += 1
    log.info("payments.reconcile", extra=counts)
    return counts


def payment_reconcile(*, payment_id: int, stale_before: dt.datetime | None = None) -> str:
    """Ask the gateway what became of one payment: ``resolved``, ``not_sent`` (no intent carries
    our payment id, and the call went out long enough ago: back to ``pending``, to be sent again
    with the same idempotency key) or ``still_unknown`` (the gateway could not be asked, or the
    intent is still processing). Looked up by intent id when we have it, else among the
    customer's intents (the gateway's list filtered by customer and date)."""
    payment = Payment.objects.get(id=payment_id)
    if payment.status not in (PaymentStatus.UNKNOWN, PaymentStatus.PROCESSING):
        return "resolved"
    gateway = gateway_named(payment.gateway)
    started = time.monotonic()
    try:
        if payment.gateway_intent_id:
            found: ChargeResult | None = gateway.payment_intent_retrieve(payment.gateway_intent_id)
        else:
            since = payment.created_at - dt.timedelta(minutes=5)
            matches = [
                intent
                for intent in gateway.payment_intents_for_customer(
                    customer_id=payment.gateway_customer_id, created_since=since
                )
                if intent.metadata.get("payment_id") == payment.public_id
            ]
            # Several intents for one payment (a gateway that ignored our idempotency key, a
            # retried request): a succeeded one wins; every success is applied, an excess
            # becomes credit.
            matches.sort(key=lambda i: i.status != ChargeStatus.SUCCEEDED)
            found = matches[0] if matches else None
    except GatewayError as exc:
        _call_record(payment, "reconcile", exc, started)
        return "still_unknown"
    if found is None:
        GatewayCall.objects.create(
            account_id=payment.account_id, payment_id=payment.id, operation="reconcile", outcome="not_found"
        )
        sent_at = payment.sent_at or payment.created_at
        if stale_before is not None and sent_at >= stale_before and payment.status == PaymentStatus.UNKNOWN:
            return "still_unknown"  # too recent to be sure the request is not in flight
        with transaction.atomic(durable=True):
            locked = Payment.objects.select_for_update().get(id=payment.id)
            if locked.status not in (PaymentStatus.UNKNOWN, PaymentStatus.PROCESSING):
                return "resolved"
            _requeue(locked, actor=SYSTEM, reason="not sent: the gateway has no trace of it")
        return "not_sent"
    _call_record(payment, "reconcile", found, started)
    if found.status == ChargeStatus.PROCESSING:
        return "still_unknown"
    payment_record_outcome(payment_id=payment.id, result=found)
    return "resolved"


# --- Entry points for the API and tasks


def invoice_charge(*, invoice_id: int, trigger: str, actor: Actor = SYSTEM, account_id: int | None = None) -> Payment:
    """Create (or find) the invoice's active payment and send it if it is ours to send."""
    start = payment_create(invoice_id=invoice_id, trigger=trigger, actor=actor, account_id=account_id)
    if start.created or start.payment.status == PaymentStatus.PENDING:
        return payment_execute(payment_id=start.payment.id)
    return start.payment


def account_charge_outstanding(*, account_id: int, trigger: str) -> int:
    """Queue a charge of every invoice of the account with something outstanding (a new
    default card, the customer paying the debt). Through the outbox: in the caller's transaction."""
    invoices = invoicing_selectors.payable_invoices(account_id=account_id)
    outbox.enqueue_tasks(
        "payments.charge_invoice",
        [{"invoice_id": i.invoice_id, "account_id": account_id, "trigger": trigger} for i in invoices],
    )
    return len(invoices)


# --- Many invoices at once: the same rules, a few statements per chunk


def invoices_charge(
    *,
    invoice_ids: Sequence[int],
    trigger: str = PaymentTrigger.AFTER_ISSUE,
    actor: Actor = SYSTEM,
    threads: int | None = None,
    chunk_size: int = 500,
    claim_size: int = 50,
) -> Counter[str]:
    """Charge every invoice of ``invoice_ids`` as ``invoice_charge`` charges one (what the
    ``payments.charge_invoices`` task does with a period close's chunk). Per chunk of
    ``chunk_size`` invoices, one durable transaction applies ``_decide`` to each invoice and
    inserts the new pending payments (with their audit rows) before any gateway call; then
    ``claim_size`` of them at a time are claimed (``pending → processing``, one statement) just
    ahead of ``threads`` caller threads, which call the gateway with no transaction open, and
    the outcomes are recorded as they come, those that arrived together in one durable
    transaction (successes set-based by ``_succeed_many``, the rest by ``_apply``; each alone if
    that fails): the calls never wait for the recording, so a rate-limited gateway is kept busy.
    A process killed anywhere leaves what the single path leaves: pending or processing
    payments the reconciler sends or asks about. Returns the outcomes by status or refusal
    code (``not_recorded``: a call raised something not the gateway's; left to the reconciler)."""
    forbid_transaction("Charging invoices")
    if trigger not in PaymentTrigger.values:
        raise ApplicationError("invalid", f"Unknown trigger {trigger!r}.", field="trigger")
    started = time.monotonic()
    threads = threads or settings.PAYMENTS_CHARGE_THREADS
    answers: queue.SimpleQueue[_Answer] = queue.SimpleQueue()
    calls = _callers(threads)
    # The first intents in a small transaction, so the calls start at once; the rest of the
    # task's invoices then have theirs within the next transaction, while those calls are out.
    first = min(claim_size, len(invoice_ids))
    chunks = itertools.chain(
        [invoice_ids[:first]] if first else [],
        (invoice_ids[lo : lo + chunk_size] for lo in range(first, len(invoice_ids), chunk_size)),
    )
    counts = _pipeline(chunks, calls, answers, trigger=trigger, threads=threads, claim_size=claim_size, actor=actor)
    counts = +counts  # without the zeros
    log.info(
        "payments.invoices_charged",
        extra={
            "invoices": len(invoice_ids),
            "trigger": trigger,
            "outcomes": dict(counts),
            "duration_ms": round((time.monotonic() - started) * 1000),
        },
    )
    return counts


def _payments_create(
    *, invoice_ids: Sequence[int], trigger: str, actor: Actor, counts: Counter[str], known: dict[int, Payment]
) -> tuple[list[int], list[int]]:
    """The chunk's new pending payments, in one durable transaction: (payments to send, the
    invoices that lost an attempt-number race). The new ones are added to ``known``."""
    with transaction.atomic(durable=True):
        invoices = invoicing_selectors.payable_invoices(invoice_ids=invoice_ids)  # issued, something owed
        counts["nothing_due"] += len(invoice_ids) - len(invoices)
        facts = _facts(invoices)
        new: list[Payment] = []
        to_send: list[int] = []
        for invoice in invoices:
            decision = _decide(invoice, facts, trigger)
            if decision.existing is not None:
                counts["under_way"] += 1
                if decision.existing.status == PaymentStatus.PENDING:
                    to_send.append(decision.existing.id)  # as invoice_charge: a pending one is sent
            elif decision.refusal:
                counts[decision.refusal] += 1
                if decision.refusal == "no_payment_method":
                    dunning.case_record_failure(
                        invoice=invoice, decline_code="no_payment_method", retryable=True, payment=None
                    )
            else:
                new.append(_new_payment(invoice, decision, facts, trigger))
        inserted = _payments_insert(new)  # the unique indexes decide
        created = [p for p in new if p.id in inserted]
        taken = [p.invoice_id for p in new if p.id not in inserted]
        raced = set(
            Payment.objects.filter(invoice_id__in=taken, status__in=ACTIVE_STATUSES).values_list(
                "invoice_id", flat=True
            )
        )
        counts["under_way"] += len(raced)
        # What is owed, read again now that these payments are their invoices' active ones (as
        # the single path does): a payment active before ours applied its money meanwhile.
        owed = {
            i.invoice_id: i.outstanding_minor
            for i in invoicing_selectors.payable_invoices(invoice_ids=[p.invoice_id for p in created])
        }
        gone = [p.id for p in created if p.invoice_id not in owed]
        if gone:
            Payment.objects.filter(id__in=gone).delete()  # never committed
            counts["nothing_due"] += len(gone)
        created = [p for p in created if p.invoice_id in owed]
        for payment in created:
            if owed[payment.invoice_id] != payment.amount_minor:
                payment.amount_minor = owed[payment.invoice_id]
                Payment.objects.filter(id=payment.id).update(amount_minor=payment.amount_minor)
        _transitions_write(created, before="", actor=actor, reason=f"created ({trigger})")
    known.update((p.id, p) for p in created)
    return [*to_send, *(p.id for p in created)], [i for i in taken if i not in raced]


def _claim_many(payment_ids: list[int], *, actor: Actor, known: dict[int, Payment]) -> list[Payment]:
    """pending → processing for those still pending (one statement): ours to send. ``known``:
    the payments this task created (in memory, their card with them), taken as they are
    rather than read again; any other is read."""
    now = timezone.now()
    with transaction.atomic(durable=True), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE payments_payment SET status = %s, sent_at = %s, updated_at = %s "
            "WHERE id = ANY(%s) AND status = %s RETURNING id",
            [PaymentStatus.PROCESSING, now, now, payment_ids, PaymentStatus.PENDING],
        )
        claimed = [row[0] for row in cursor.fetchall()]
        payments = [known.pop(i) for i in claimed if i in known]
        for payment in payments:
            _moved(payment, PaymentStatus.PROCESSING)
            payment.sent_at = payment.updated_at = now
        others = [i for i in claimed if i not in {p.id for p in payments}]
        if others:
            payments += Payment.objects.filter(id__in=others).select_related("payment_method")
        payments.sort(key=lambda p: p.invoice_id)
        _transitions_write(payments, before=PaymentStatus.PENDING, actor=actor, at=now)
    return payments


@dataclass(frozen=True, slots=True)
class _Answer:
    payment: Payment
    result: ChargeResult | GatewayError | None  # None: the call raised something else (logged)
    duration_ms: int


_Call = tuple[Payment, "queue.SimpleQueue[_Answer]"]
_calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
_pool: list[threading.Thread] = []
_pool_lock = threading.Lock()


def _callers(threads: int) -> queue.SimpleQueue[_Call]:
    """The process's caller threads (at least ``threads``; started once and kept, so a task
    does not pay for starting threads and their connections): each takes a claimed payment
    and the queue its answer goes to. Daemons: a worker process that ends takes them along."""
    with _pool_lock:
        _pool[:] = [t for t in _pool if t.is_alive()]
        while len(_pool) < threads:
            thread = threading.Thread(target=_caller, name=f"charge-{len(_pool)}", daemon=True)
            thread.start()
            _pool.append(thread)
    return _calls


# A caller thread closes its connection once no call came for this long (between tasks): not
# after every call that emptied the queue (the callers often outrun the recording, and each
# reconnect cost a connection's setup).
_CALLER_IDLE_SECONDS = 0.5


def _caller() -> None:
    """A caller thread: each claimed payment's gateway call; one answer per payment, always
    (result ``None`` when the call raised something not the gateway's: it stays processing)."""
    fresh = True
    while True:
        try:
            payment, answers = _calls.get(timeout=_CALLER_IDLE_SECONDS)
        except queue.Empty:  # idle: no connection is held between tasks (or by a test's end)
            connections.close_all()
            payment, answers = _calls.get()
            fresh = True
        if fresh:  # after a pause or a failed call: a connection the database dropped is replaced
            close_old_connections()  # (not per call: with health checks on, a ping each)
        answer = _call(payment)
        fresh = answer.result is None
        answers.put(answer)


def _call(payment: Payment) -> _Answer:
    """One claimed payment's gateway call (its abandoned authentications canceled first)."""
    started = time.monotonic()
    result: ChargeResult | GatewayError | None
    try:
        if getattr(payment, "_awaiting_authentication", False):
            _cancel_abandoned_authentications(payment)
        result = _send(payment)
    except Exception:
        log.exception("payments.call_failed", extra={"payment_id": payment.public_id})
        result = None
    return _Answer(payment, result, round((time.monotonic() - started) * 1000))


def _pipeline(
    chunks: Iterator[Sequence[int]],
    calls: queue.SimpleQueue[_Call],
    answers: queue.SimpleQueue[_Answer],
    *,
    trigger: str,
    threads: int,
    claim_size: int,
    actor: Actor,
) -> Counter[str]:
    """Keep the callers busy and record what comes back: the next chunk's intents are written
    while the last calls of the one before are out, payments are claimed just ahead of the
    callers (at most ``3 x threads`` or ``2 x claim_size`` queued or out), and the answers are
    recorded in batches of about ``claim_size`` (fewer when the callers need feeding first).
    No timeouts (a test's clock may be frozen): every payment put to the callers gets exactly
    one answer, so a blocking wait always ends."""
    counts: Counter[str] = Counter()
    todo: list[int] = []
    known: dict[int, Payment] = {}  # created by this task, not claimed yet
    out = 0
    limit = max(3 * threads, 2 * claim_size)
    more = True
    while True:
        while todo and out < limit:
            group = [todo.pop() for _ in range(min(claim_size, len(todo), limit - out))]
            claimed = _claim_many(group, actor=actor, known=known)
            waiting = set(
                Payment.objects.filter(
                    invoice_id__in=[p.invoice_id for p in claimed], status=PaymentStatus.REQUIRES_ACTION
                ).values_list("invoice_id", flat=True)
            )
            for payment in claimed:
                payment._awaiting_authentication = payment.invoice_id in waiting  # type: ignore[attr-defined]
                if connection.in_atomic_block:
                    # Only a test's transaction can be open here (forbid_transaction): the
                    # callers' own connections could not see its rows, so the call is made here.
                    answers.put(_call(payment))
                else:
                    calls.put((payment, answers))
                out += 1
        if more and len(todo) < limit:  # the next intents are written while these calls are out
            chunk = next(chunks, None)
            if chunk is None:
                more = False
            else:
                to_send, single = _payments_create(
                    invoice_ids=chunk, trigger=trigger, actor=actor, counts=counts, known=known
                )
                todo[:0] = reversed(to_send)  # popped from the end: in order, after what is left
                for invoice_id in single:  # lost an attempt-number race: the single path sorts it out
                    try:
                        counts[invoice_charge(invoice_id=invoice_id, trigger=trigger, actor=actor).status] += 1
                    except (Conflict, NotFound) as exc:
                        counts[exc.code] += 1
                continue
        if not out:
            if todo or more:
                continue
            return counts
        wanted = min(out, max(threads, claim_size))
        batch = [answers.get()]
        while len(batch) < wanted:
            try:
                batch.append(answers.get_nowait())
            except queue.Empty:
                if todo and out - len(batch) < limit - claim_size:
                    break  # the callers run short: feed them first
                batch.append(answers.get())
        out -= len(batch)
        counts["not_recorded"] += sum(1 for a in batch if a.result is None)
        counts.update(_record_many([a for a in batch if a.result is not None], actor=actor))


def _record_many(answers: list[_Answer], *, actor: Actor) -> Counter[str]:
    """The outcomes, as ``payment_record_outcome`` records each, in one durable transaction
    (each in its own if that fails); the attempts first, as ``GatewayCall`` rows."""
    counts: Counter[str] = Counter()
    if not answers:
        return counts
    now = timezone.now()
    calls = []
    for answer in answers:
        payment = answer.payment
        outcome, object_id, detail = _call_outcome(answer.result)
        calls.append(
            _CallRow(payment.account_id, payment.id, "charge", outcome, object_id, detail, answer.duration_ms, now)
        )
    with transaction.atomic(durable=True):
        _CALLS.copy(calls)
    results = {a.payment.id: a.result for a in answers if a.result is not None}
    sent = {a.payment.id: a.payment for a in answers}
    try:
        with transaction.atomic(durable=True):
            with connection.cursor() as cursor:  # the row locks, in the single path's order
                cursor.execute(
                    "SELECT id, status FROM payments_payment WHERE id = ANY(%s) ORDER BY invoice_id, id FOR UPDATE",
                    [list(results)],
                )
                statuses = dict(cursor.fetchall())
            # A success of a payment still processing is recorded set-based from the payment as
            # it was sent (its amount is what the gateway charged); the rest as the single path.
            charged = [
                sent[i]
                for i, status in statuses.items()
                if status == PaymentStatus.PROCESSING
                and isinstance(result := results[i], ChargeResult)
                and result.status == ChargeStatus.SUCCEEDED
            ]
            counts["succeeded"] += _succeed_many(charged, results, actor=actor)
            done = {p.id for p in charged}
            rest = [i for i in statuses if i not in done]
            if rest:
                for payment in Payment.objects.filter(id__in=rest).order_by("invoice_id", "id"):
                    _apply(payment, results[payment.id], actor=actor)
                    counts[payment.status] += 1
        return counts
    except Exception as exc:  # rolled back: each outcome again in its own transaction
        log.warning("payments.outcomes_recorded_singly", extra={"payments": len(answers), "error": type(exc).__name__})
    counts.clear()
    for payment_id, result in results.items():
        try:
            counts[payment_record_outcome(payment_id=payment_id, result=result, actor=actor).status] += 1
        except Exception:  # left processing: the reconciler asks the gateway
            log.exception("payments.outcome_not_recorded", extra={"payment_id": ids.encode("pay", payment_id)})
            counts["not_recorded"] += 1
    return counts


def _succeed_many(payments: list[Payment], results: dict[int, ChargeResult | GatewayError], *, actor: Actor) -> int:
    """``_succeeded`` for many ``processing`` payments the gateway charged, under their row
    locks in the caller's transaction: one UPDATE of the payments, their audit rows in one
    insert, the money applied by ``invoicing.services.payments_apply`` (set-based), dunning
    told only about the invoices that have a case open. What each payment ends as, and every
    row written, is what ``_succeeded`` writes for one."""
    if not payments:
        return 0
    now = timezone.now()
    charges = {p.id: results[p.id] for p in payments}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE payments_payment p
            SET status = %s, gateway_intent_id = coalesce(p.gateway_intent_id, nullif(u.intent_id, '')),
                gateway_charge_id = CASE WHEN u.charge_id <> '' THEN u.charge_id ELSE p.gateway_charge_id END,
                completed_at = %s, updated_at = %s, decline_code = '', decline_message = '', client_secret = '',
                next_action_url = ''
            FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS u(id, intent_id, charge_id)
            WHERE p.id = u.id
            """,
            [
                PaymentStatus.SUCCEEDED.value,
                now,
                now,
                [p.id for p in payments],
                [getattr(charges[p.id], "intent_id", "") for p in payments],
                [getattr(charges[p.id], "charge_id", "") for p in payments],
            ],
        )
    for payment in payments:
        _moved(payment, PaymentStatus.SUCCEEDED)
        payment.completed_at = payment.updated_at = now
    applied = invoicing_services.payments_apply(
        [
            invoicing_services.PaymentReceived(
                invoice_id=p.invoice_id, amount_minor=p.amount_minor, currency=p.currency, reference=p.public_id
            )
            for p in payments
        ]
    )
    # One audit row per payment; one line for the chunk: the transition with what each
    # payment applied to its invoice (and kept as credit), in the order of its ids.
    _transitions_write(
        payments,
        before=PaymentStatus.PROCESSING,
        actor=actor,
        at=now,
    )
    _chunk_log(
        "payment.applied",
        payments,
        applied_minor=[money.applied_minor for money in applied],
        credited_minor=[money.credited_minor for money in applied],
        invoices_paid=sum(1 for money in applied if money.invoice_paid),
    )
    settled = {p.invoice_id: p for p, money in zip(payments, applied, strict=True) if money.invoice_paid}
    with_case = DunningCase.objects.filter(invoice_id__in=settled, status=DunningCaseStatus.OPEN).values_list(
        "invoice_id", flat=True
    )
    for invoice_id in with_case:
        dunning.invoice_settled(account_id=settled[invoice_id].account_id, invoice_id=invoice_id, paid=True)
    return len(payments)
