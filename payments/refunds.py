"""Refunds: money given back on a payment.

Refunds follow the intent-first pattern of ``charging``:

1. ``refund_create`` (one durable transaction) locks the payment and checks what is left to
   refund: the amount paid, less what was refunded, less the refunds still in flight
   (``pending``, ``processing``, ``unknown``: they may have happened at the gateway), less the
   amount under dispute. Two refunds at once queue on the payment's row lock, so together they
   never exceed what was paid (and the ``payments_payment_refunds_within_amount`` check backs it).
   It inserts a ``pending`` Refund whose idempotency key is its public id (``ref_…``).
2. ``refund_execute`` moves it to ``processing`` (a short transaction: one caller wins), calls the
   gateway with no transaction open and no lock held, and records the outcome in a second durable
   transaction: succeeded → ``payment.amount_refunded_minor`` grows and
   ``invoicing.services.refund_record`` issues the credit note and posts the ledger entry in the
   same transaction; declined or refused → ``failed`` with the reason; an answer lost → ``unknown``.
3. ``refunds_reconcile`` (a periodic task) resolves ``unknown`` refunds and ``processing`` ones
   older than ``PAYMENTS_STALE_PROCESSING_SECONDS`` (a worker killed mid-call), and sends
   ``pending`` ones nobody sent. The gateway interface has no list of an intent's refunds, so it
   compares the intent's ``amount_refunded_minor`` (re-read) with what we recorded: the
   difference is the money our unresolved refunds took, assigned to them oldest first. Limits:
   when several refunds of one payment are unresolved at once and only some happened, which ones
   is decided by that order, not by the gateway (the totals, the credit notes' sum and the
   ledger are right either way); a refund the gateway still calls ``pending`` is treated as
   succeeded (card refunds are not reversed in practice; a later failure is not followed).

Refunds made outside our admin (in the Stripe dashboard) arrive as ``charge.refunded``
webhooks: ``refunds_sync_from_gateway`` records each as a Refund row (idempotent on the
gateway's refund id) with its credit note; our own refunds in the event are matched by the
``refund_id`` in their metadata or by their gateway id and never recorded twice.

Disputes (chargebacks) live in ``payments.disputes``; what they withdrew counts against what is left
to refund (``refundable_minor``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from antifraud import services as antifraud_services
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.transactions import forbid_transaction
from billing_site.common.transitions import actor_log_fields, transition
from invoicing import selectors as invoicing_selectors
from invoicing import services as invoicing_services
from payments.gateways import gateway as gateway_named
from payments.gateways.base import (
    ChargeResult,
    GatewayError,
    GatewayUnavailable,
    InvalidRequest,
    PaymentDeclined,
    RateLimited,
    RefundRequest,
    RefundResult,
)
from payments.models import (
    GatewayCall,
    Payment,
    PaymentStatus,
    Refund,
    RefundStatus,
)

log = logging.getLogger(__name__)
P = ParamSpec("P")

SYSTEM = Actor.system("payments")
GATEWAY_ACTOR = Actor.system("payments.gateway")

# Refunds that may still take money at the gateway: they count against what is left.
IN_FLIGHT = (RefundStatus.PENDING, RefundStatus.PROCESSING, RefundStatus.UNKNOWN)


def _refund_log(event: str, refund: Refund, **fields: Any) -> None:
    log.info(
        event,
        extra={
            "refund_id": refund.public_id,
            "payment_id": ids.encode("pay", refund.payment_id),
            "invoice_id": ids.encode("inv", refund.invoice_id),
            "account_id": ids.encode("acc", refund.account_id),
            "amount_minor": refund.amount_minor,
            "currency": refund.currency,
            "status": refund.status,
            **fields,
        },
    )


def refundable_minor(payment: Payment) -> int:
    """What may still be refunded on ``payment`` (call under its row lock to rely on it)."""
    in_flight = (
        Refund.objects.filter(payment_id=payment.id, status__in=IN_FLIGHT).aggregate(s=Sum("amount_minor"))["s"] or 0
    )
    return payment.amount_minor - payment.amount_refunded_minor - in_flight - payment.amount_disputed_minor


def _invoice_refundable_minor(payment: Payment) -> int:
    """What the invoice can still give back to a card: what was applied to it (an excess kept
    as customer credit is not refunded to the card here), less what went back already, less
    the refunds of its payments still in flight."""
    invoice = invoicing_selectors.invoice_get_for_account(account_id=payment.account_id, invoice_id=payment.invoice_id)
    if invoice is None:
        return 0
    in_flight = (
        Refund.objects.filter(invoice_id=payment.invoice_id, status__in=IN_FLIGHT).aggregate(s=Sum("amount_minor"))["s"]
        or 0
    )
    return invoice.amount_paid_minor - invoice.amount_refunded_minor - in_flight


def _check_refundable(payment: Payment, amount_minor: int) -> int:
    """Refused unless ``payment`` succeeded at the gateway and ``amount_minor`` is within what
    is left to refund on it and on its invoice (one rule for a refund made now and one asked
    of a second finance user); what is left, in minor units."""
    if payment.status != PaymentStatus.SUCCEEDED or not payment.gateway_intent_id:
        raise Conflict("not_refundable", f"Only a succeeded payment can be refunded (this one is {payment.status}).")
    left = min(refundable_minor(payment), _invoice_refundable_minor(payment))
    if amount_minor > left:
        raise Conflict(
            "refund_too_large",
            f"At most {money.display(max(left, 0), payment.currency)} can be refunded on {payment.public_id}.",
            field="amount",
        )
    return left


# --- Refunds we make


@audited
@transaction.atomic(durable=True)
def refund_create(
    *,
    payment_id: int,
    amount_minor: int,
    reason: str,
    actor: Actor,
    internal_note: str = "",
    refund_id: int | None = None,
) -> Refund:
    """A ``pending`` refund of ``amount_minor`` on a succeeded payment, committed before any
    gateway call. ``reason`` is the customer's (the credit note prints it, the API shows it);
    ``internal_note`` is finance's alone (the admin shows it; no document, API or log line
    does). 404 for an unknown payment; 400 ``reason_required`` / ``invalid``; 409
    ``not_refundable`` (not succeeded) or ``refund_too_large`` (more than is left).
    ``refund_id``: the id to create it under (an approved four-eyes request's): a refund that
    already exists under it is returned as it stands."""
    if refund_id is not None:
        existing = Refund.objects.filter(id=refund_id).first()
        if existing is not None:
            return existing
    reason = (reason or "").strip()
    internal_note = (internal_note or "").strip()
    if not reason:
        raise ApplicationError("reason_required", "A reason is required to refund.", field="reason")
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
        raise ApplicationError("invalid", "The amount to refund must be positive.", field="amount")
    invoice_id = Payment.objects.filter(id=payment_id).values_list("invoice_id", flat=True).first()
    if invoice_id is None:
        raise NotFound("No such payment.")
    # Every payment of the invoice, locked in id order: refunds of one invoice are serialised
    # (two at once, on one payment or on two, cannot both take the last of what was paid).
    locked = {p.id: p for p in Payment.objects.select_for_update().filter(invoice_id=invoice_id).order_by("id")}
    payment = locked[payment_id]
    left = _check_refundable(payment, amount_minor)
    refund_id = refund_id or ids.new_id()
    refund = Refund.objects.create(
        id=refund_id,
        account_id=payment.account_id,
        payment=payment,
        invoice_id=payment.invoice_id,
        amount_minor=amount_minor,
        currency=payment.currency,
        reason=reason[:300],
        internal_note=internal_note[:1000],
        idempotency_key=ids.encode("ref", refund_id),
        requested_by=actor.name[:254],
    )
    # Who asked, by kind and id: never an operator's email in a log line.
    _refund_log("refund.created", refund, **actor_log_fields(actor), refundable_minor=left - amount_minor)
    return refund


def _claim(refund_id: int) -> Refund | None:
    """pending → processing, for one caller only."""
    with transaction.atomic(durable=True):
        refund = Refund.objects.select_for_update().filter(id=refund_id).first()
        if refund is None or refund.status != RefundStatus.PENDING:
            return None
        transition(refund, "send", actor=SYSTEM, reason="sent to the gateway")
        _refund_log("refund.sent", refund)
        return refund


def refund_execute(*, refund_id: int) -> Refund:
    """Send a pending refund to the gateway and record the outcome. A refund someone else
    claimed (or already finished) is returned as it stands."""
    forbid_transaction("Refunding a card")
    refund = _claim(refund_id)
    if refund is None:
        found = Refund.objects.filter(id=refund_id).first()
        if found is None:
            raise NotFound("No such refund.")
        return found
    payment = Payment.objects.get(id=refund.payment_id)
    assert payment.gateway_intent_id
    request = RefundRequest(
        intent_id=payment.gateway_intent_id,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        idempotency_key=refund.idempotency_key,
        metadata={
            "refund_id": refund.public_id,
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", refund.invoice_id),
            "account_id": ids.encode("acc", refund.account_id),
        },
    )
    started = time.monotonic()
    try:
        result: RefundResult | GatewayError = gateway_named(payment.gateway).refund(request)
    except GatewayError as exc:
        result = exc
    _call_record(refund, "refund", result, started)
    return refund_record_outcome(refund_id=refund.id, result=result)


def _sent_at_once(create: Callable[P, Refund]) -> Callable[P, Refund]:
    """``create``'s refund, sent to the gateway as soon as its transaction committed."""

    def issue(*args: P.args, **kwargs: P.kwargs) -> Refund:
        return refund_execute(refund_id=create(*args, **kwargs).id)

    return issue


# Create the refund and send it at once (an approved four-eyes request's, or one within the
# threshold: ``refund_submit``). It takes ``refund_create``'s keywords; the sending, too, is
# written to the trail under their actor and reason.
refund_issue = audited(_sent_at_once(refund_create))


@audited
def refund_submit(
    *, payment_id: int, amount_minor: int, reason: str, actor: Actor, internal_note: str = ""
) -> Refund | Any:
    """What finance does from the admin: the refund at once up to the four-eyes threshold
    (``FOUR_EYES_THRESHOLDS``), else a request a second finance user approves
    (``invoicing.services.approval_request_create``; returned instead of a refund). The
    request is made only for a refund that could be made now (same checks, no lock)."""
    payment = Payment.objects.filter(id=payment_id).first()
    if payment is None:
        raise NotFound("No such payment.")
    if not invoicing_services.approval_needed(amount_minor=amount_minor, currency=payment.currency, actor=actor):
        return refund_issue(
            payment_id=payment_id, amount_minor=amount_minor, reason=reason, actor=actor, internal_note=internal_note
        )
    _check_refundable(payment, amount_minor)
    return invoicing_services.approval_request_create(
        kind="refund",
        account_id=payment.account_id,
        invoice_id=payment.invoice_id,
        payment_id=payment.id,
        currency=payment.currency,
        amount_minor=amount_minor,
        reason=reason,
        actor=actor,
        params={"internal_note": (internal_note or "").strip()[:1000]},
    )


def _call_record(
    refund: Refund, operation: str, result: RefundResult | ChargeResult | GatewayError, started: float
) -> None:
    if isinstance(result, RefundResult):
        outcome, object_id, detail = result.status, result.refund_id, ""
    elif isinstance(result, ChargeResult):
        outcome, object_id, detail = result.status, result.intent_id, f"amount_refunded={result.amount_refunded_minor}"
    elif isinstance(result, PaymentDeclined | InvalidRequest):
        outcome, object_id, detail = "refused", "", result.code
    else:
        outcome, object_id, detail = type(result).__name__, "", str(result)[:300]
    GatewayCall.objects.create(
        account_id=refund.account_id,
        payment_id=refund.payment_id,
        refund_id=refund.id,
        operation=operation,
        outcome=outcome[:32],
        gateway_object_id=object_id or "",
        detail=detail or "",
        duration_ms=round((time.monotonic() - started) * 1000),
    )


def refund_record_outcome(*, refund_id: int, result: RefundResult | GatewayError) -> Refund:
    """Record what the gateway said about a refund, under the payment's and the refund's row
    locks, in one durable transaction. Idempotent: a refund already finished is left alone."""
    with transaction.atomic(durable=True):
        payment_id = Refund.objects.values_list("payment_id", flat=True).get(id=refund_id)
        payment = Payment.objects.select_for_update().get(id=payment_id)
        refund = Refund.objects.select_for_update().get(id=refund_id)
        if refund.status not in (RefundStatus.PROCESSING, RefundStatus.UNKNOWN):
            return refund
        if isinstance(result, RefundResult):
            if result.status == "failed":
                _failed(refund, "declined by the gateway", gateway_refund_id=result.refund_id)
            else:  # succeeded, or pending at the gateway (accepted: see the module's limits)
                _succeeded(payment, refund, gateway_refund_id=result.refund_id)
        elif isinstance(result, PaymentDeclined | InvalidRequest):
            _failed(refund, f"{result.code}: {result.message}" if result.message != result.code else result.code)
        elif isinstance(result, GatewayUnavailable | RateLimited):
            _failed(refund, "gateway_unavailable: the refund was not sent; issue it again")
        elif refund.status == RefundStatus.PROCESSING:  # OutcomeUnknown, or any other gateway error
            refund.failure_reason = f"outcome unknown: {type(result).__name__}"[:300]
            transition(
                refund,
                "lose_track",
                actor=GATEWAY_ACTOR,
                reason=refund.failure_reason,
                update_fields=["failure_reason"],
            )
            log.warning(
                "refund.unknown",
                extra={"refund_id": refund.public_id, "account_id": ids.encode("acc", refund.account_id)},
            )
        return refund


def _failed(refund: Refund, reason: str, *, gateway_refund_id: str = "", actor: Actor = GATEWAY_ACTOR) -> None:
    """Under the refund's row lock: nothing went back."""
    refund.failure_reason = reason[:300]
    refund.completed_at = timezone.now()
    fields = ["failure_reason", "completed_at"]
    if gateway_refund_id and not refund.gateway_refund_id:
        refund.gateway_refund_id = gateway_refund_id
        fields.append("gateway_refund_id")
    transition(refund, "fail", actor=actor, reason=refund.failure_reason, update_fields=fields)
    _refund_log("refund.failed", refund, reason=refund.failure_reason)


def _succeeded(payment: Payment, refund: Refund, *, gateway_refund_id: str = "", actor: Actor = GATEWAY_ACTOR) -> None:
    """Under both row locks: the money left; the credit note and the ledger entry follow."""
    refund.completed_at = timezone.now()
    refund.failure_reason = ""
    fields = ["completed_at", "failure_reason"]
    if gateway_refund_id and not refund.gateway_refund_id:
        refund.gateway_refund_id = gateway_refund_id
        fields.append("gateway_refund_id")
    transition(refund, "succeed", actor=actor, reason="refunded at the gateway", update_fields=fields)
    payment.amount_refunded_minor += refund.amount_minor
    payment.save(update_fields=["amount_refunded_minor", "updated_at"])
    recorded = invoicing_services.refund_record(
        invoice_id=refund.invoice_id,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        reference=refund.public_id,
        reason=refund.reason,
        actor=Actor.system(f"payments.refund {refund.public_id}"),  # who asked is on the refund, not in logs
    )
    refund.credit_note_id = recorded.credit_note_id
    refund.save(update_fields=["credit_note_id", "updated_at"])
    antifraud_services.payment_outcome_record(
        account_id=refund.account_id,
        kind="refund",
        reference=refund.public_id,
        code=refund.reason[:64],
        amount_minor=refund.amount_minor,
        currency=refund.currency,
    )
    _refund_log(
        "refund.succeeded",
        refund,
        gateway_refund_id=refund.gateway_refund_id,
        credit_note_id=ids.encode("crn", refund.credit_note_id) if refund.credit_note_id else None,
    )


# --- Reconciliation


def refunds_reconcile(*, now: dt.datetime | None = None, limit: int = 500) -> dict[str, int]:
    """Resolve ``unknown`` and stale ``processing`` refunds by re-reading their payment's intent
    at the gateway, and send stale ``pending`` ones. Returns counts."""
    forbid_transaction("Reconciling refunds")
    now = now or timezone.now()
    stale_before = now - dt.timedelta(seconds=settings.PAYMENTS_STALE_PROCESSING_SECONDS)
    counts = {"checked": 0, "succeeded": 0, "failed": 0, "still_unknown": 0, "sent": 0}
    candidates = list(
        Refund.objects.filter(
            Q(status=RefundStatus.UNKNOWN)
            | Q(status=RefundStatus.PROCESSING, updated_at__lt=stale_before)
            | Q(status=RefundStatus.PENDING, created_at__lt=stale_before)
        ).order_by("created_at")[:limit]
    )
    for refund in [r for r in candidates if r.status == RefundStatus.PENDING]:
        counts["checked"] += 1
        refund_execute(refund_id=refund.id)
        counts["sent"] += 1
    for payment_id in dict.fromkeys(r.payment_id for r in candidates if r.status != RefundStatus.PENDING):
        try:
            found = _payment_refunds_reconcile(payment_id, stale_before=stale_before)
        except Exception:  # one payment's trouble (say, its invoice refuses the credit note) stops no other
            log.exception("refunds.reconcile_failed", extra={"payment_id": ids.encode("pay", payment_id)})
            found = {"still_unknown": sum(1 for r in candidates if r.payment_id == payment_id)}
        for outcome, n in found.items():
            counts[outcome] += n
            counts["checked"] += n
    log.info("refunds.reconcile", extra=counts)
    return counts


def _payment_refunds_reconcile(payment_id: int, *, stale_before: dt.datetime) -> dict[str, int]:
    payment = Payment.objects.get(id=payment_id)
    unresolved = list(
        Refund.objects.filter(payment_id=payment_id, status__in=(RefundStatus.UNKNOWN, RefundStatus.PROCESSING))
    )
    counts = {"succeeded": 0, "failed": 0, "still_unknown": 0}
    if not unresolved or not payment.gateway_intent_id:
        return counts
    started = time.monotonic()
    try:
        intent: ChargeResult | GatewayError = gateway_named(payment.gateway).payment_intent_retrieve(
            payment.gateway_intent_id
        )
    except GatewayError as exc:
        intent = exc
    _call_record(unresolved[0], "refund_reconcile", intent, started)
    if not isinstance(intent, ChargeResult):
        counts["still_unknown"] = len(unresolved)
        return counts
    with transaction.atomic(durable=True):
        payment = Payment.objects.select_for_update().get(id=payment_id)
        refunds = list(
            Refund.objects.select_for_update()
            .filter(payment_id=payment_id, status__in=(RefundStatus.UNKNOWN, RefundStatus.PROCESSING))
            .order_by("created_at", "id")
        )
        # The money the gateway refunded that no recorded refund accounts for.
        unexplained = intent.amount_refunded_minor - payment.amount_refunded_minor
        for refund in refunds:
            if refund.status == RefundStatus.PROCESSING and refund.updated_at >= stale_before:
                counts["still_unknown"] += 1  # in flight right now
                unexplained -= refund.amount_minor
                continue
            if refund.amount_minor <= unexplained:
                unexplained -= refund.amount_minor
                _succeeded(payment, refund, actor=SYSTEM)
                counts["succeeded"] += 1
            elif (refund.updated_at or refund.created_at) < stale_before:
                _failed(refund, "not_sent: the gateway has no trace of this refund", actor=SYSTEM)
                counts["failed"] += 1
            else:
                counts["still_unknown"] += 1  # too recent to be sure it is not still arriving
    return counts


# --- Refunds made at the gateway (the dashboard), learnt from charge.refunded


@dataclass(frozen=True, slots=True)
class GatewayRefund:
    """One refund as a ``charge.refunded`` event lists it."""

    refund_id: str
    amount_minor: int
    status: str
    our_refund_id: str = ""  # metadata.refund_id when we made it
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RefundSync:
    recorded: list[Refund]  # refunds made outside our admin, recorded now
    resolved: list[Refund]  # refunds of ours whose outcome this settled


def refunds_sync_from_gateway(
    *, payment_id: int, intent: ChargeResult, listed: list[GatewayRefund] | None
) -> RefundSync:
    """Bring our refunds of a payment in line with the gateway after a ``charge.refunded``.

    ``intent`` is the PaymentIntent re-read from the gateway (its ``amount_refunded_minor`` is
    the truth); ``listed`` the refunds the event carried (None when the payload has no list).
    Ours (matched by ``metadata.refund_id`` or gateway id) still unresolved are settled by what
    the gateway says. The others were made outside our admin: each is recorded once (unique on
    the gateway refund id) with its credit note — but never more than the re-read total leaves
    unexplained once our refunds in flight are counted, so a refund of ours whose answer is
    still on its way is not taken for a foreign one. Without a list, what is unexplained is
    recorded as one refund keyed by the gateway's cumulative total (idempotent as well)."""
    recorded: list[Refund] = []
    resolved: list[Refund] = []
    with transaction.atomic(durable=True):
        payment = Payment.objects.select_for_update().get(id=payment_id)
        ours = {r.id: r for r in Refund.objects.select_for_update().filter(payment_id=payment_id)}
        by_gateway_id = {r.gateway_refund_id: r for r in ours.values() if r.gateway_refund_id}
        foreign: list[GatewayRefund] = []
        for item in listed or []:
            mine = by_gateway_id.get(item.refund_id)
            if mine is None and item.our_refund_id:
                decoded = ids.decode("ref", item.our_refund_id)
                mine = ours.get(decoded) if decoded is not None else None
            if mine is None:
                foreign.append(item)
                continue
            if mine.status in (RefundStatus.PROCESSING, RefundStatus.UNKNOWN):
                if item.status in ("succeeded", "pending"):
                    _succeeded(payment, mine, gateway_refund_id=item.refund_id)
                    resolved.append(mine)
                elif item.status in ("failed", "canceled"):
                    _failed(mine, f"{item.status} at the gateway", gateway_refund_id=item.refund_id)
                    resolved.append(mine)
        in_flight = sum(r.amount_minor for r in ours.values() if r.status in IN_FLIGHT)
        unexplained = intent.amount_refunded_minor - payment.amount_refunded_minor - in_flight
        if listed is not None:
            for item in sorted(foreign, key=lambda i: i.refund_id):
                if item.status not in ("succeeded", "pending") or item.amount_minor <= 0:
                    continue
                if item.amount_minor > unexplained:
                    continue  # not (yet) confirmed by the re-read total
                refund = _foreign_refund(payment, item.refund_id, item.amount_minor, item.reason)
                if refund is not None:
                    unexplained -= item.amount_minor
                    recorded.append(refund)
        elif unexplained > 0:
            key = f"total:{intent.amount_refunded_minor}"
            refund = _foreign_refund(payment, key, unexplained, "")
            if refund is not None:
                recorded.append(refund)
    return RefundSync(recorded=recorded, resolved=resolved)


def _foreign_refund(payment: Payment, gateway_refund_id: str, amount_minor: int, reason: str) -> Refund | None:
    """Record a refund made at the gateway (under the payment's row lock); None if it was already."""
    if Refund.objects.filter(payment_id=payment.id, gateway_refund_id=gateway_refund_id).exists():
        return None
    refund_id = ids.new_id()
    try:
        with transaction.atomic():
            refund = Refund.objects.create(
                id=refund_id,
                account_id=payment.account_id,
                payment=payment,
                invoice_id=payment.invoice_id,
                amount_minor=amount_minor,
                currency=payment.currency,
                reason=(f"Refunded at the gateway ({reason})" if reason else "Refunded at the gateway")[:300],
                status=RefundStatus.PROCESSING,
                idempotency_key=f"gw:{payment.gateway}:{payment.id}:{gateway_refund_id}"[:64],
                gateway_refund_id=gateway_refund_id,
                requested_by=f"{payment.gateway} (outside our admin)",
            )
    except IntegrityError:
        return None
    _succeeded(payment, refund)
    return refund
