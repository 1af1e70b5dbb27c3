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
import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone
from django_fsm import can_proceed

from accounts import selectors as account_selectors
from antifraud import services as antifraud_services
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.transactions import forbid_transaction
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


@dataclass(frozen=True, slots=True)
class PaymentStart:
    payment: Payment
    created: bool  # False: an active payment of the invoice already existed (returned instead)


def _transition(payment: Payment, name: str, *, actor: Actor, reason: str = "") -> None:
    before = payment.status
    method = getattr(payment, name)
    if not can_proceed(method):
        raise Conflict("invalid_transition", f"Cannot {name.replace('_', ' ')} a payment that is {before}.")
    method()
    payment.save()
    PaymentTransition.objects.create(
        payment=payment,
        account_id=payment.account_id,
        from_state=before,
        to_state=payment.status,
        actor_kind=actor.kind.value,
        actor_name=actor.name,
        reason=reason[:1000],
    )
    log.info(
        "payment.transition",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "from": before,
            "to": payment.status,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
            "decline_code": payment.decline_code or None,
            "actor": actor.name,
        },
    )


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


def _awaiting_authentication(invoice_id: int) -> Payment | None:
    """The invoice's latest payment if it waits for the customer's authentication on the
    account's default card and is recent (``PAYMENTS_AUTHENTICATION_WINDOW_SECONDS``): the
    payment under way, which the customer's pay call returns instead of canceling its intent
    and creating another. A new default card, or a later call, starts a new attempt."""
    latest = Payment.objects.filter(invoice_id=invoice_id).order_by("-attempt").first()
    if latest is None or latest.status != PaymentStatus.REQUIRES_ACTION:
        return None
    window = dt.timedelta(seconds=settings.PAYMENTS_AUTHENTICATION_WINDOW_SECONDS)
    if latest.created_at < timezone.now() - window:
        return None
    method = default_payment_method(latest.account_id)
    return latest if method is not None and method.id == latest.payment_method_id else None


@transaction.atomic(durable=True)
def _payment_create(*, invoice_id: int, trigger: str, actor: Actor, account_id: int | None) -> PaymentStart | None:
    invoice = invoicing_selectors.payable_invoice(invoice_id=invoice_id, account_id=account_id)
    if invoice is None:
        raise NotFound("No such invoice.")
    active = Payment.objects.filter(invoice_id=invoice_id, status__in=ACTIVE_STATUSES).first()
    if active is not None:
        return PaymentStart(payment=active, created=False)
    if invoice.outstanding_minor <= 0 or invoice.status != "issued":
        raise Conflict("nothing_due", f"Nothing is due on invoice {invoice.number}.")
    if trigger == PaymentTrigger.CUSTOMER and (waiting := _awaiting_authentication(invoice_id)) is not None:
        return PaymentStart(payment=waiting, created=False)
    standing = account_selectors.billing_account_standings({invoice.account_id}).get(invoice.account_id)
    if standing is not None and standing.state == "blocked":
        # Blocked (fraud): its cards are not charged again until the fraud team decides.
        raise Conflict("account_blocked", "This billing account cannot be charged; contact support.")
    method = default_payment_method(invoice.account_id)
    if method is not None and trigger == PaymentTrigger.NEW_CARD:
        latest = Payment.objects.filter(invoice_id=invoice_id).order_by("-attempt").first()
        if latest is not None and latest.payment_method_id == method.id:
            # A new default's charge, queued twice (by setting the default and by the outcome
            # of the payment it raced): the card was tried since it became the default.
            raise Conflict("card_already_tried", f"Invoice {invoice.number} was charged to this card already.")
    if method is None:
        if trigger == PaymentTrigger.CUSTOMER:
            raise Conflict("no_payment_method", "No card is bound to this billing account: bind one first.")
        dunning.case_record_failure(invoice=invoice, decline_code="no_payment_method", retryable=True, payment=None)
        return None
    profile = PaymentProfile.objects.get(account_id=invoice.account_id)
    attempt = (Payment.objects.filter(invoice_id=invoice_id).aggregate(n=Max("attempt"))["n"] or 0) + 1
    payment_id = ids.new_id()
    payment = Payment(
        id=payment_id,
        account_id=invoice.account_id,
        invoice_id=invoice_id,
        attempt=attempt,
        trigger=trigger,
        amount_minor=invoice.outstanding_minor,
        currency=invoice.currency,
        gateway=method.gateway,
        gateway_customer_id=profile.gateway_customer_id,
        payment_method=method,
        idempotency_key=ids.encode("pay", payment_id),
    )
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
    if fresh is None or fresh.status != "issued" or fresh.outstanding_minor <= 0:
        raise Conflict("nothing_due", f"Nothing is due on invoice {invoice.number}.")  # rolls the insert back
    if fresh.outstanding_minor != payment.amount_minor:
        payment.amount_minor = fresh.outstanding_minor
        payment.save(update_fields=["amount_minor"])
    PaymentTransition.objects.create(
        payment=payment,
        account_id=payment.account_id,
        from_state="",
        to_state=payment.status,
        actor_kind=actor.kind.value,
        actor_name=actor.name,
        reason=f"created ({trigger})",
    )
    log.info(
        "payment.created",
        extra={
            "payment_id": payment.public_id,
            "invoice_id": ids.encode("inv", invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
            "attempt": attempt,
            "trigger": trigger,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
            "gateway": payment.gateway,
        },
    )
    return PaymentStart(payment=payment, created=True)


def _claim(payment_id: int) -> Payment | None:
    """pending → processing, for one caller only; the payment, or None if someone else has it."""
    with transaction.atomic(durable=True):
        payment = Payment.objects.select_for_update().filter(id=payment_id).first()
        if payment is None or payment.status != PaymentStatus.PENDING:
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
    gateway = gateway_named(payment.gateway)
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
    started = time.monotonic()
    try:
        result: ChargeResult | GatewayError = gateway.charge(request)
    except GatewayError as exc:
        result = exc
    _call_record(payment, "charge", result, started)
    return payment_record_outcome(payment_id=payment.id, result=result)


def _call_record(payment: Payment, operation: str, result: ChargeResult | GatewayError, started: float) -> None:
    if isinstance(result, ChargeResult):
        outcome, object_id, detail = result.status, result.intent_id, result.decline_code
    elif isinstance(result, PaymentDeclined):
        outcome, object_id, detail = "declined", result.intent_id, result.code
    else:
        outcome, object_id, detail = type(result).__name__, "", str(result)[:300]
    GatewayCall.objects.create(
        account_id=payment.account_id,
        payment_id=payment.id,
        operation=operation,
        outcome=outcome,
        gateway_object_id=object_id or "",
        detail=detail or "",
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
