"""Disputes: money the card holder's bank takes back (a chargeback), learnt from the gateway's
signed ``charge.dispute.*`` events (``payments.webhooks``).

``dispute_opened`` and ``dispute_closed`` record the Dispute row (one per gateway dispute id: a
replay changes nothing), post the ledger entry through ``invoicing.services.dispute_post`` in
the same transaction (opened: the funds withdrawn; won: the reversal; lost: the loss), keep
``payment.amount_disputed_minor`` current, and flag the account for the fraud team: a
``dispute.opened`` warning in the log, and the Dispute rows themselves, which antifraud reads
through ``payments.selectors.disputes_for_accounts``.

The rule (issue 19): per payment, what was refunded (or may still be: refunds in flight) plus
what open and lost disputes withdrew never exceeds what was captured. A dispute that would
break it is refused (``dispute_exceeds_payment``), as is one whose ``charge`` and
``payment_intent`` name different payments (``charge_intent_mismatch``): nothing is written,
and the webhook event that carried it stays ``failed`` with the reason for finance. Two
disputes of one payment queue on the payment's row lock; the ``payments_payment_within_captured``
check backs the running totals, and ``ledger_check`` reports any payment beyond it.

A dispute is a state machine (``open`` → ``won`` / ``lost``) moved through
``billing_site.common.transitions``; its opening is audited too (from no state).
"""

from __future__ import annotations

import logging

from django.db import IntegrityError, transaction
from django.utils import timezone

from antifraud import services as antifraud_services
from billing_site.common import money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, Conflict
from billing_site.common.transitions import transition
from invoicing import services as invoicing_services
from payments.models import Dispute, DisputeStatus, Payment, PaymentStatus
from payments.refunds import refundable_minor

log = logging.getLogger(__name__)

GATEWAY_ACTOR = Actor.system("payments.gateway")


def _payment_for(gateway: str, *, charge_id: str, intent_id: str) -> Payment | None:
    """Our payment that a dispute's ``charge`` and ``payment_intent`` name, or None when neither
    is ours. When both are given they must name the same payment: a 409
    ``charge_intent_mismatch`` otherwise (never attached to whichever matched first)."""
    by_intent = Payment.objects.filter(gateway=gateway, gateway_intent_id=intent_id).first() if intent_id else None
    by_charge = (
        Payment.objects.filter(gateway=gateway, gateway_charge_id=charge_id).order_by("-created_at").first()
        if charge_id
        else None
    )
    found = by_intent or by_charge
    if found is None:
        return None
    mismatch = (
        (by_intent is not None and by_charge is not None and by_intent.id != by_charge.id)
        or (charge_id and found.gateway_charge_id and found.gateway_charge_id != charge_id)
        or (intent_id and found.gateway_intent_id and found.gateway_intent_id != intent_id)
    )
    if mismatch:
        raise Conflict(
            "charge_intent_mismatch",
            f"The dispute names charge {charge_id or '-'} and intent {intent_id or '-'}, "
            f"which are not one payment of ours ({found.public_id} is charge {found.gateway_charge_id or '-'}, "
            f"intent {found.gateway_intent_id or '-'}).",
        )
    return found


def disputable_minor(payment: Payment) -> int:
    """What a new dispute may still withdraw from ``payment`` (under its row lock): what was
    captured, less what was refunded or may still be (refunds in flight), less what open and
    lost disputes withdrew. Nothing when the payment did not capture."""
    if payment.status != PaymentStatus.SUCCEEDED:
        return 0
    return refundable_minor(payment)


def _dispute_log(event: str, dispute: Dispute, *, level: int = logging.INFO) -> None:
    log.log(
        level,
        event,
        extra={
            **dispute.log_fields(),
            "gateway": dispute.gateway,
            "reason": dispute.reason,
            "status": dispute.status,
        },
    )


@transaction.atomic(durable=True)
def dispute_opened(
    *,
    gateway: str,
    gateway_dispute_id: str,
    charge_id: str = "",
    intent_id: str = "",
    amount_minor: int,
    currency: str,
    reason: str,
) -> Dispute | None:
    """A chargeback opened on one of our payments: the Dispute row (once per gateway dispute
    id: a replay returns it unchanged), the ledger entry withdrawing its funds, the payment's
    disputed amount, and the fraud team's flag. None: no payment of ours carries that charge
    or intent (the caller notes it).

    Refused (409, nothing written) when ``charge_id`` and ``intent_id`` name different
    payments (``charge_intent_mismatch``), and when it would take more than the payment has
    left (``dispute_exceeds_payment``; see the module's docstring)."""
    existing = Dispute.objects.filter(gateway=gateway, gateway_dispute_id=gateway_dispute_id).first()
    if existing is not None:
        return existing
    found = _payment_for(gateway, charge_id=charge_id, intent_id=intent_id)
    if found is None:
        return None
    payment = Payment.objects.select_for_update().get(id=found.id)
    existing = Dispute.objects.filter(gateway=gateway, gateway_dispute_id=gateway_dispute_id).first()
    if existing is not None:  # its twin recorded it while we waited for the lock
        return existing
    currency = currency.upper()
    if currency != payment.currency:
        raise ApplicationError("invalid", f"Dispute in {currency} on a payment in {payment.currency}.")
    if amount_minor <= 0:
        raise ApplicationError("invalid", f"Dispute of {amount_minor} on {payment.public_id}.")
    left = disputable_minor(payment)
    if amount_minor > left:
        raise Conflict(
            "dispute_exceeds_payment",
            f"Dispute {gateway_dispute_id} of {money.display(amount_minor, currency)} on {payment.public_id}: "
            f"only {money.display(max(left, 0), currency)} of the "
            f"{money.display(payment.amount_minor, currency)} captured is left "
            f"(refunded {money.display(payment.amount_refunded_minor, currency)}, "
            f"disputed {money.display(payment.amount_disputed_minor, currency)}).",
        )
    dispute = Dispute(
        account_id=payment.account_id,
        payment=payment,
        gateway=gateway,
        gateway_dispute_id=gateway_dispute_id,
        amount_minor=amount_minor,
        currency=currency,
        reason=(reason or "unknown")[:64],
    )
    try:
        with transaction.atomic():
            dispute.save(force_insert=True)
    except IntegrityError:  # the same dispute recorded meanwhile
        return Dispute.objects.get(gateway=gateway, gateway_dispute_id=gateway_dispute_id)
    dispute.audit_record(
        transition="open", from_state="", actor=GATEWAY_ACTOR, reason=f"opened at the gateway ({dispute.reason})"
    ).save()
    payment.amount_disputed_minor += amount_minor
    payment.save(update_fields=["amount_disputed_minor", "updated_at"])
    invoicing_services.dispute_post(
        dispute_id=dispute.id,
        account_id=dispute.account_id,
        currency=currency,
        amount_minor=amount_minor,
        stage="opened",
        memo=f"Dispute {dispute.public_id} ({dispute.reason}) on {payment.public_id}",
    )
    # The fraud team's flag: antifraud's checkpoint 3 (a dispute asks for a review), and this warning.
    antifraud_services.payment_outcome_record(
        account_id=dispute.account_id,
        kind="dispute",
        reference=dispute.public_id,
        code=dispute.reason,
        amount_minor=amount_minor,
        currency=currency,
    )
    _dispute_log("dispute.opened", dispute, level=logging.WARNING)
    return dispute


@transaction.atomic(durable=True)
def dispute_closed(*, gateway: str, gateway_dispute_id: str, status: str) -> Dispute | None:
    """A dispute closed, ``won`` (its funds come back: the reversal is posted) or ``lost`` (the
    loss is posted; the funds stay gone). A dispute already closed is returned unchanged; None
    when we never recorded it opening (the caller opens it first from the event's data)."""
    if status not in (DisputeStatus.WON, DisputeStatus.LOST):
        raise ApplicationError("invalid", f"A dispute closes won or lost, not {status!r}.", field="status")
    found = Dispute.objects.filter(gateway=gateway, gateway_dispute_id=gateway_dispute_id).first()
    if found is None:
        return None
    payment = Payment.objects.select_for_update().get(id=found.payment_id)
    dispute = Dispute.objects.select_for_update().get(id=found.id)
    if dispute.status != DisputeStatus.OPEN:
        return dispute
    dispute.closed_at = timezone.now()
    transition(
        dispute,
        "win" if status == DisputeStatus.WON else "lose",
        actor=GATEWAY_ACTOR,
        reason=f"closed {status} at the gateway",
        update_fields=["closed_at"],
    )
    if status == DisputeStatus.WON:
        payment.amount_disputed_minor = max(payment.amount_disputed_minor - dispute.amount_minor, 0)
        payment.save(update_fields=["amount_disputed_minor", "updated_at"])
    invoicing_services.dispute_post(
        dispute_id=dispute.id,
        account_id=dispute.account_id,
        currency=dispute.currency,
        amount_minor=dispute.amount_minor,
        stage=status,
        memo=f"Dispute {dispute.public_id} {status} on {payment.public_id}",
    )
    _dispute_log("dispute.closed", dispute, level=logging.WARNING if status == DisputeStatus.LOST else logging.INFO)
    return dispute
