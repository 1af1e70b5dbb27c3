"""Disputes on the books: each stage of the payments app's dispute posted once to the ledger,
inside the payments app's transaction."""

from __future__ import annotations

import logging

from django.db import connection
from django.utils import timezone

from billing_site.common import ids
from billing_site.common.errors import ApplicationError, Conflict
from billing_site.common.transactions import require_transaction
from invoicing import ledger
from invoicing.models import (
    LedgerLine,
    LedgerSource,
)

log = logging.getLogger(__name__)


DISPUTE_STAGES = {
    "opened": LedgerSource.DISPUTE_OPENED,
    "won": LedgerSource.DISPUTE_WON,
    "lost": LedgerSource.DISPUTE_LOST,
}


def dispute_post(*, dispute_id: int, account_id: int, currency: str, amount_minor: int, stage: str, memo: str) -> bool:
    """Post a stage of the payments app's dispute ``dispute_id`` to the ledger, inside the
    caller's transaction; True when it posted now. Each stage posts once (the ledger's unique
    ``(source, id)``): a replay posts nothing; the same stage with another amount or currency,
    or a dispute closed both ways, is a ``dispute_conflict``.

    - ``opened``: the bank withdrew the funds: disputes debit, gateway clearing credit;
    - ``won``: they came back: gateway clearing debit, disputes credit;
    - ``lost``: they are lost: chargeback loss debit, disputes credit.

    A close learnt before the opening posts the opening first. Stages of one dispute are
    serialised by a transaction-scoped advisory lock on its id."""
    require_transaction("A dispute's ledger entry")
    source = DISPUTE_STAGES.get(stage)
    if source is None:
        raise ApplicationError("invalid", f"stage must be one of {', '.join(DISPUTE_STAGES)}.", field="stage")
    if amount_minor <= 0:
        raise ApplicationError("invalid_amount", "A dispute is a positive amount (minor units).", field="amount_minor")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"invoicing.dispute:{dispute_id}"])
    posted = {
        source_type: (entry_currency, abs(amount))
        for source_type, entry_currency, amount in LedgerLine.objects.filter(
            entry__source_type__in=list(DISPUTE_STAGES.values()),
            entry__source_id=dispute_id,
            ledger_account=ledger.DISPUTES,
        ).values_list("entry__source_type", "entry__currency", "amount_minor")
    }
    if source in posted:
        if posted[source] != (currency, amount_minor):
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} was {stage} with other amounts.")
        return False
    if source != LedgerSource.DISPUTE_OPENED:
        closed = {LedgerSource.DISPUTE_WON, LedgerSource.DISPUTE_LOST} & posted.keys()
        if closed:
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} is already closed ({closed.pop()}).")
        opened = posted.get(LedgerSource.DISPUTE_OPENED)
        if opened is not None and opened != (currency, amount_minor):
            raise Conflict("dispute_conflict", f"Dispute {dispute_id} was opened with other amounts.")
    memo = memo.strip()[:300] or f"Dispute {dispute_id} {stage}"
    entries = []
    if source != LedgerSource.DISPUTE_OPENED and LedgerSource.DISPUTE_OPENED not in posted:
        entries.append(_dispute_entry(dispute_id, "opened", account_id, currency, amount_minor, memo))
    entries.append(_dispute_entry(dispute_id, stage, account_id, currency, amount_minor, memo))
    ledger.post(entries, posted_at=timezone.now())
    log.info(
        "invoicing.dispute_posted",
        extra={
            "dispute_id": ids.encode("dsp", dispute_id),
            "account_id": ids.encode("acc", account_id),
            "stage": stage,
            "amount_minor": amount_minor,
            "entries": len(entries),
        },
    )
    return True


def _dispute_entry(dispute_id: int, stage: str, account_id: int, currency: str, amount: int, memo: str) -> ledger.Entry:
    debit, credit = {
        "opened": ((ledger.DISPUTES, account_id), (ledger.GATEWAY_CLEARING, None)),
        "won": ((ledger.GATEWAY_CLEARING, None), (ledger.DISPUTES, account_id)),
        "lost": ((ledger.CHARGEBACK_LOSS, None), (ledger.DISPUTES, account_id)),
    }[stage]
    return ledger.Entry(
        DISPUTE_STAGES[stage],
        dispute_id,
        account_id,
        currency,
        memo,
        [ledger.Posting(debit[0], amount, debit[1]), ledger.Posting(credit[0], -amount, credit[1])],
    )
