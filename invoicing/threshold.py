"""Threshold billing: an early invoice when an account's unbilled usage (less its discounts)
plus unpaid invoices pass its credit limit, after every rollup drain."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.on_commit import queue_task
from invoicing import issuing, selectors
from invoicing.closing import ACCOUNT_ERRORS

log = logging.getLogger(__name__)


@dataclass
class ThresholdReport:
    over_limit: int = 0  # accounts whose unbilled usage and unpaid invoices exceed their limit
    waiting: int = 0  # of those, with a threshold invoice still owing (its charge under way or failed)
    issued: list[int] = field(default_factory=list)  # threshold invoices issued
    nothing_to_bill: int = 0
    unbillable: dict[int, str] = field(default_factory=dict)
    totals_minor: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.over_limit} over their credit limit, {len(self.issued)} threshold invoices issued, "
            f"{self.waiting} waiting on one, {self.nothing_to_bill} with nothing to bill, "
            f"{len(self.unbillable)} unbillable, in {self.seconds:.2f} s"
        )


THRESHOLD_ACTOR = Actor.system("invoicing.threshold")


def threshold_billing_run(*, chunk_size: int = 500, render_pdfs: bool = True) -> ThresholdReport:
    """The credit check after a rollup: every active account over its credit limit (one
    set-based read, ``selectors.credit_exposures``) with usage not billed yet and no threshold
    invoice still owing gets a threshold invoice, charged after the commit; if that charge
    fails, payments suspends the account at once. Accounts are issued in chunks, each its
    own transaction that checks its accounts again under their billing locks."""
    started = time.perf_counter()
    report = ThresholdReport()
    exposures = selectors.credit_exposures()
    report.over_limit = len(exposures)
    report.waiting = sum(1 for e in exposures if e.threshold_open)
    # Something to bill: at least a minor unit (less is left to the month's invoice, and an
    # account over its limit with nothing billable is not planned again at every check).
    due = [e.account_id for e in exposures if not e.threshold_open and money.to_minor(e.unbilled, e.currency) > 0]
    report.nothing_to_bill = report.over_limit - report.waiting - len(due)
    for start in range(0, len(due), chunk_size):
        chunk = due[start : start + chunk_size]
        try:
            result = issuing.threshold_chunk(account_ids=chunk, actor=THRESHOLD_ACTOR)
        except ACCOUNT_ERRORS as exc:  # one account's data: the others wait for the next check
            log.error(
                "invoicing.threshold_chunk_failed",
                extra={"first_account_id": ids.encode("acc", chunk[0]), "accounts": len(chunk), "error": str(exc)},
            )
            continue
        if render_pdfs and result.issued:
            queue_task("invoicing.render_documents", kind="invoice", source_ids=result.issued)
        report.issued.extend(result.issued)
        report.nothing_to_bill += result.nothing_to_bill + result.already_issued
        report.unbillable.update(result.unbillable)
        for currency, amount in result.totals_minor.items():
            report.totals_minor[currency] = report.totals_minor.get(currency, 0) + amount
    report.seconds = time.perf_counter() - started
    log.info(
        "invoicing.threshold_run",
        extra={
            "over_limit": report.over_limit,
            "issued": len(report.issued),
            "invoice_ids": [ids.encode("inv", i) for i in report.issued[:50]],
            "waiting": report.waiting,
            "nothing_to_bill": report.nothing_to_bill,
            "unbillable": len(report.unbillable),
            "totals_minor": report.totals_minor,
            "duration_ms": round(report.seconds * 1000),
        },
    )
    return report
