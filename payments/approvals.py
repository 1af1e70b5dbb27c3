"""Four-eyes requests approved and carried out (the requests themselves are invoicing's:
``invoicing.approvals``; this app alone can reach both the refunds and invoicing's services).

``approval_approve`` claims the request for the approver (one approval wins; the requester is
refused) and then carries the action out with no transaction open (a refund calls the
gateway), through the same services as an action below the threshold, in the requester's name,
with the request's ``execution_id`` as the refund's or grant's id: carried out again (a crash
between the claim and the result, ``approval_execute`` re-run), it does the work once."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django.utils.dateparse import parse_datetime

from billing_site.common import money
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError
from billing_site.common.transactions import forbid_transaction
from invoicing import services as invoicing_services
from payments import refunds

log = logging.getLogger(__name__)


@audited
def approval_approve(*, request_id: int, actor: Actor, reason: str) -> Any:
    """A second finance user approves: claimed (``approved``), then carried out once."""
    forbid_transaction("Carrying out an approved request")
    request = invoicing_services.approval_claim(request_id=request_id, actor=actor, reason=reason)
    return approval_execute(request_id=request.id)


@audited
def approval_reject(*, request_id: int, actor: Actor, reason: str) -> Any:
    return invoicing_services.approval_reject(request_id=request_id, actor=actor, reason=reason)


def approval_execute(*, request_id: int) -> Any:
    """Carry out an approved request (anything else is returned as it stands)."""
    forbid_transaction("Carrying out an approved request")
    request = invoicing_services.approval_request_get(request_id)
    if request is None or request.status != "approved":
        return request
    requester = Actor.operator(request.requested_by_id, request.requested_by)
    approved = f"approved by {request.decided_by}: {request.decision_reason}"
    try:
        if request.kind == "refund":
            assert request.payment_id is not None
            refund = refunds.refund_issue(
                payment_id=request.payment_id,
                amount_minor=request.amount_minor,
                reason=request.reason,
                internal_note=f"{request.params.get('internal_note') or ''} [four-eyes {request.public_id} {approved}]",
                actor=requester,
                refund_id=request.execution_id,
            )
            ok, result = refund.status != "failed", f"{refund.public_id} {refund.status}"
            if refund.failure_reason:
                result += f": {refund.failure_reason}"
        elif request.kind == "credit_grant":
            expires = request.params.get("expires_at")
            grant = invoicing_services.credit_grant_create(
                account_id=request.account_id,
                kind=request.params["credit_kind"],
                amount=Decimal(money.format_minor(request.amount_minor, request.currency)),
                currency=request.currency,
                reason=f"{request.reason} ({approved})",
                actor=requester,
                expires_at=parse_datetime(expires) if expires else None,
                grant_id=request.execution_id,
            )
            ok, result = True, f"{grant.public_id} granted"
        else:
            assert request.invoice_id is not None
            invoice = invoicing_services.invoice_write_off(
                invoice_id=request.invoice_id, actor=requester, reason=f"{request.reason} ({approved})"
            )
            ok, result = True, f"{invoice.number} written off"
    except ApplicationError as exc:
        ok, result = False, exc.message
    return invoicing_services.approval_record_result(request_id=request.id, ok=ok, result=result)
