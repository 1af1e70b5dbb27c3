"""Four-eyes: refunds, credit grants and write-offs above ``FOUR_EYES_THRESHOLDS`` become
requests (``ApprovalRequest``) that a second finance user approves or rejects.

- ``approval_needed``: whether an operator's action of this amount needs a second pair of eyes
  (strictly more than the currency's threshold; the system's own write-offs never do);
- ``approval_request_create``: the request, with the requester's name and reason;
- ``approval_claim``: a second finance user approves: ``pending`` → ``approved`` under the
  request's row lock, so one approval wins (a double click or a second approver gets
  ``already_decided``); the requester is refused (``self_approval``; the database's
  ``invoicing_approval_not_self`` backs it);
- ``approval_reject``: the same, to ``rejected``;
- ``approval_record_result``: ``approved`` → ``executed`` / ``failed`` once the action ran.

Carrying the action out is ``payments.services.approval_approve`` (it alone may reach both the
refunds and invoicing's services), through the same services as below the threshold, with the
request's ``execution_id`` as the new refund's or grant's id: run twice, it does the work once.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing_site.common import ids, money
from billing_site.common.actors import Actor, ActorKind
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from invoicing.credit_grants import credit_grant_check, credit_grant_create
from invoicing.invoice_life import invoice_write_off
from invoicing.models import ApprovalKind, ApprovalRequest, ApprovalStatus, CreditGrant, Invoice
from invoicing.writing import require_reason

log = logging.getLogger(__name__)


def four_eyes_threshold_minor(currency: str) -> int:
    """The largest amount (minor units) one finance user may refund, grant or write off alone."""
    configured = getattr(settings, "FOUR_EYES_THRESHOLDS", {}) or {}
    amount = configured.get(currency.upper(), getattr(settings, "FOUR_EYES_DEFAULT_THRESHOLD", "500"))
    return money.to_minor(Decimal(str(amount)), currency)


def approval_needed(*, amount_minor: int, currency: str, actor: Actor) -> bool:
    """Whether ``actor``'s action of ``amount_minor`` must be approved by a second finance user:
    an operator's above the currency's threshold (a component of ours acts on its own rules)."""
    return actor.kind == ActorKind.OPERATOR and amount_minor > four_eyes_threshold_minor(currency)


def _operator_id(actor: Actor) -> int:
    if actor.kind != ActorKind.OPERATOR or actor.user_id is None:
        raise ApplicationError("invalid", "Only a finance user can ask for or decide a four-eyes request.")
    return actor.user_id


def _log(event: str, request: ApprovalRequest, actor: Actor) -> None:
    # Who, by kind and id: never an operator's email in a log line.
    log.info(
        event,
        extra={
            "approval_id": request.public_id,
            "kind": request.kind,
            "status": request.status,
            "account_id": ids.encode("acc", request.account_id),
            "amount_minor": request.amount_minor,
            "currency": request.currency,
            "actor_kind": str(actor.kind),
            "actor_user_id": actor.user_id,
        },
    )


@audited
@transaction.atomic(durable=True)
def approval_request_create(
    *,
    kind: str,
    account_id: int,
    currency: str,
    amount_minor: int,
    reason: str,
    actor: Actor,
    invoice_id: int | None = None,
    payment_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> ApprovalRequest:
    """A pending request for a second finance user's approval."""
    if kind not in ApprovalKind.values:
        raise ApplicationError("invalid", f"kind must be one of {', '.join(ApprovalKind.values)}.", field="kind")
    if amount_minor <= 0:
        raise ApplicationError("invalid", "The amount must be positive.", field="amount")
    requester_id = _operator_id(actor)
    request = ApprovalRequest.objects.create(
        kind=kind,
        account_id=account_id,
        invoice_id=invoice_id,
        payment_id=payment_id,
        currency=currency,
        amount_minor=amount_minor,
        params=params or {},
        reason=require_reason(reason)[:1000],
        requested_by_id=requester_id,
        requested_by=actor.name[:254],
    )
    _log("approval.requested", request, actor)
    return request


def _decide(request_id: int, actor: Actor, reason: str, status: ApprovalStatus) -> ApprovalRequest:
    reason = require_reason(reason)
    decider_id = _operator_id(actor)
    request = ApprovalRequest.objects.select_for_update().filter(id=request_id).first()
    if request is None:
        raise NotFound("No such request.")
    if request.status != ApprovalStatus.PENDING:
        raise Conflict(
            "already_decided",
            f"{request.public_id} was already {request.get_status_display().lower()} by {request.decided_by}.",
        )
    if decider_id == request.requested_by_id:
        raise Conflict("self_approval", "Nobody approves or rejects their own request: a second finance user decides.")
    request.status = status
    request.decided_by_id = decider_id
    request.decided_by = actor.name[:254]
    request.decision_reason = reason[:1000]
    request.decided_at = timezone.now()
    request.save(update_fields=["status", "decided_by_id", "decided_by", "decision_reason", "decided_at"])
    _log(f"approval.{status}", request, actor)
    return request


@audited
@transaction.atomic(durable=True)
def approval_claim(*, request_id: int, actor: Actor, reason: str) -> ApprovalRequest:
    """Approve: ``pending`` → ``approved`` (to be carried out), by someone other than the requester."""
    return _decide(request_id, actor, reason, ApprovalStatus.APPROVED)


@audited
@transaction.atomic(durable=True)
def approval_reject(*, request_id: int, actor: Actor, reason: str) -> ApprovalRequest:
    """Reject: ``pending`` → ``rejected``; nothing is done."""
    return _decide(request_id, actor, reason, ApprovalStatus.REJECTED)


@transaction.atomic(durable=True)
def approval_record_result(*, request_id: int, ok: bool, result: str) -> ApprovalRequest:
    """An approved request carried out (``executed``) or not (``failed``, with why). Idempotent:
    a request no longer ``approved`` is left as it is."""
    request = ApprovalRequest.objects.select_for_update().get(id=request_id)
    if request.status != ApprovalStatus.APPROVED:
        return request
    request.status = ApprovalStatus.EXECUTED if ok else ApprovalStatus.FAILED
    request.result = result[:300]
    request.executed_at = timezone.now()
    request.save(update_fields=["status", "result", "executed_at"])
    _log(f"approval.{request.status}", request, Actor.system("invoicing.approvals"))
    return request


# --- The staff entry points: at once below the threshold, a request above it


@audited
def credit_grant_submit(
    *,
    account_id: int,
    kind: str,
    amount: Decimal,
    currency: str,
    reason: str,
    actor: Actor,
    expires_at: Any = None,
) -> CreditGrant | ApprovalRequest:
    """Finance grants credit: granted at once up to the threshold, else a request (the grant
    is checked first, so a request is only made for a grant that could be written)."""
    amount_minor = credit_grant_check(
        account_id=account_id, kind=kind, amount=amount, currency=currency, expires_at=expires_at
    )
    if not approval_needed(amount_minor=amount_minor, currency=currency, actor=actor):
        return credit_grant_create(
            account_id=account_id,
            kind=kind,
            amount=amount,
            currency=currency,
            reason=reason,
            actor=actor,
            expires_at=expires_at,
        )
    return approval_request_create(
        kind=ApprovalKind.CREDIT_GRANT,
        account_id=account_id,
        currency=currency,
        amount_minor=amount_minor,
        reason=reason,
        actor=actor,
        params={"credit_kind": kind, "expires_at": expires_at.isoformat() if expires_at else None},
    )


@audited
def invoice_write_off_submit(*, invoice_id: int, reason: str, actor: Actor) -> Invoice | ApprovalRequest:
    """Finance writes an invoice off: at once when what is outstanding is within the
    threshold, else a request (the write-off then takes what is outstanding when approved)."""
    invoice = Invoice.objects.filter(id=invoice_id).first()
    if invoice is None:
        raise NotFound("No such invoice.")
    if not invoice.can_write_off():
        raise Conflict(
            "invalid_transition", f"Only an issued invoice can be written off; this one is {invoice.status}."
        )
    outstanding = invoice.amount_outstanding_minor
    if not approval_needed(amount_minor=outstanding, currency=invoice.currency, actor=actor):
        return invoice_write_off(invoice_id=invoice_id, reason=reason, actor=actor)
    return approval_request_create(
        kind=ApprovalKind.WRITE_OFF,
        account_id=invoice.account_id,
        invoice_id=invoice.id,
        currency=invoice.currency,
        amount_minor=outstanding,
        reason=reason,
        actor=actor,
        params={"number": invoice.number},
    )


def approval_request_get(request_id: int) -> ApprovalRequest | None:
    return ApprovalRequest.objects.filter(id=request_id).first()


def approval_requests_for(*, invoice_id: int | None = None, payment_id: int | None = None) -> list[ApprovalRequest]:
    """The four-eyes requests about an invoice or a payment, newest first (for their pages)."""
    queryset = ApprovalRequest.objects.all()
    if invoice_id is not None:
        queryset = queryset.filter(invoice_id=invoice_id)
    if payment_id is not None:
        queryset = queryset.filter(payment_id=payment_id)
    return list(queryset.order_by("-requested_at"))
