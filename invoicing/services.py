"""The invoicing app's entry points, for the admin, the API, the tasks and other apps (payments
calls ``payment_apply``, ``refund_record``, ``dispute_post``, ``invoice_write_off``; antifraud's
demo the credit check). Each lives in the module of its one job:

- ``closing``: the period close (a month's invoices, chunk by chunk; one draft; one issue);
- ``threshold``: threshold billing at the credit limit;
- ``invoice_life``: money received, write-offs, voids;
- ``credit_notes``: credit notes by lines and for refunds;
- ``credit_grants``: credit granted by finance;
- ``approvals``: four-eyes requests for refunds, grants and write-offs above a threshold;
- ``disputes``: the payments app's disputes on the books;
- ``tax_rates`` and ``discounts``: the terms finance sets, audited;
- ``writing``: what they share. The VAT arithmetic is in ``taxes``.

Every write is keyword-only, one durable transaction per entry point (``payment_apply``,
``refund_record`` and ``dispute_post`` run inside the payments app's transaction that records
the outcome at the gateway, and refuse to run outside one), state changes through
``billing_site.common.transitions``, ledger postings in the same transaction, side effects
after the commit."""

from __future__ import annotations

from invoicing.approvals import (
    approval_claim,
    approval_needed,
    approval_record_result,
    approval_reject,
    approval_request_create,
    approval_request_get,
    approval_requests_for,
    credit_grant_submit,
    four_eyes_threshold_minor,
    invoice_write_off_submit,
)
from invoicing.closing import (
    CHUNK_ACCOUNTS,
    CloseReport,
    check_closable,
    close_chunk_isolated,
    invoice_draft_compute,
    invoice_issue,
    period_chunks,
    period_close,
    period_close_shard,
)
from invoicing.credit_grants import credit_grant_check, credit_grant_create
from invoicing.credit_notes import SETTLE_CREDIT, CreditNoteLineIn, RefundRecorded, credit_note_issue, refund_record
from invoicing.discounts import contract_discount_check, contract_discount_create, contract_discount_update
from invoicing.disputes import DISPUTE_STAGES, dispute_post
from invoicing.invoice_life import (
    PaymentApplied,
    PaymentReceived,
    invoice_record_payment,
    invoice_void,
    invoice_write_off,
    payment_apply,
    payments_apply,
)
from invoicing.tax_rates import (
    tax_rate_check,
    tax_rate_create,
    tax_rate_update,
    tax_rate_update_check,
    tax_rate_withdraw,
    tax_rate_withdraw_check,
)
from invoicing.taxes import rule_tax
from invoicing.threshold import THRESHOLD_ACTOR, ThresholdReport, threshold_billing_run

__all__ = [
    "CHUNK_ACCOUNTS",
    "DISPUTE_STAGES",
    "SETTLE_CREDIT",
    "THRESHOLD_ACTOR",
    "CloseReport",
    "CreditNoteLineIn",
    "PaymentApplied",
    "PaymentReceived",
    "RefundRecorded",
    "ThresholdReport",
    "approval_claim",
    "approval_needed",
    "approval_record_result",
    "approval_reject",
    "approval_request_create",
    "approval_request_get",
    "approval_requests_for",
    "check_closable",
    "close_chunk_isolated",
    "contract_discount_check",
    "contract_discount_create",
    "contract_discount_update",
    "credit_grant_check",
    "credit_grant_create",
    "credit_grant_submit",
    "credit_note_issue",
    "dispute_post",
    "four_eyes_threshold_minor",
    "invoice_draft_compute",
    "invoice_issue",
    "invoice_record_payment",
    "invoice_void",
    "invoice_write_off",
    "invoice_write_off_submit",
    "payment_apply",
    "payments_apply",
    "period_chunks",
    "period_close",
    "period_close_shard",
    "refund_record",
    "rule_tax",
    "tax_rate_check",
    "tax_rate_create",
    "tax_rate_update",
    "tax_rate_update_check",
    "tax_rate_withdraw",
    "tax_rate_withdraw_check",
    "threshold_billing_run",
]
