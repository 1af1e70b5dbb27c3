"""A charge run: many invoices charged at once (the post-issue charge of a period close, a
big batch of dunning retries) with exactly the guarantees of ``payments.charging``, at the
cost of a few statements per batch instead of a few transactions per invoice.

1. Intent first, set-based: for a chunk of invoices (``batch_size``), one durable transaction
   reads what is outstanding and each account's default card, and inserts ``pending`` payments
   with ``INSERT … ON CONFLICT DO NOTHING``, next attempt number included, with their audit
   rows. The arbiters are the same unique indexes ``charging.payment_create`` relies on:
   ``payments_payment_one_active`` (one pending/processing/unknown payment per invoice) and
   ``(invoice_id, attempt)``. An invoice whose row was not inserted is being charged by
   someone else (a customer's pay call, a dunning retry, an ``unknown`` payment waiting for
   the reconciler): the run leaves it alone. Invoices without a card (or a profile) take the
   single-invoice path, which records the failure for dunning.
2. Claim, set-based: ``pending → processing`` for ``claim_size`` payments at a time in a short
   transaction (``UPDATE … WHERE status = 'pending' RETURNING``, with the audit rows): only
   rows still pending are ours, so a payment a concurrent ``charging.payment_execute`` or the
   reconciler claimed first is not sent twice. Claims are made just ahead of the callers (a
   bounded queue), so ``sent_at`` is when the call goes out, give or take a fraction of a second.
3. Calls: a pool of ``threads`` threads calls the gateway with the same request as
   ``charging.payment_execute`` (idempotency key ``pay_<id>``, our ids in the metadata), with
   no transaction open and no lock held. Size the pool to latency x rate limit (Little's
   law: 250 ms x 100 calls/s = 25 calls in flight) plus a margin; the gateway's limiter
   (``payments.ratelimit``) spaces the calls, across processes.
4. Outcomes, batched: a recorder thread takes the answers as they come and records up to
   ``outcome_batch`` of them per durable transaction: the payments locked (by invoice), each
   outcome applied by ``charging`` 's own code (the same transitions and audit rows,
   ``invoicing.services.payment_apply`` on success, dunning on a decline, ``unknown`` when
   the answer was lost). The attempts are logged as ``GatewayCall`` rows first, as the single
   path does. If a batch fails, its outcomes are recorded one by one, each in its own
   transaction, so one bad payment cannot hold back the others.

Interrupted anywhere (the process killed, the database gone), a run leaves what the single
path leaves: ``pending`` payments never sent, ``processing`` ones whose answer was not
recorded. ``charging.payments_reconcile`` sends the first and asks the gateway about the
second once they are older than ``PAYMENTS_STALE_PROCESSING_SECONDS``; nothing charges their
invoices meanwhile (the payments are active). Running the same run again is safe.

One ``payments.charge_run.*`` line per batch and one per run, with ids and counts; each
recorded outcome logs its own ``payment.*`` lines as in ``charging``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, connections, transaction
from django.utils import timezone

from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import Conflict, NotFound
from billing_site.common.logs import ms_since
from billing_site.common.transactions import forbid_transaction
from invoicing import selectors as invoicing_selectors
from payments import charging
from payments.gateways import gateway as gateway_named
from payments.gateways.base import (
    ChargeRequest,
    ChargeResult,
    GatewayError,
    PaymentDeclined,
)
from payments.models import GatewayCall, Payment, PaymentMethod, PaymentProfile, PaymentStatus, PaymentTrigger

log = logging.getLogger(__name__)

SYSTEM = charging.SYSTEM


@dataclass
class ChargeRunReport:
    invoices: int = 0
    created: int = 0  # pending payments this run inserted
    taken: int = 0  # an active payment of someone else's (or a lost attempt-number race): left alone
    nothing_due: int = 0
    single_path: int = 0  # no card or no profile: charged (or refused) by ``charging.invoice_charge``
    claimed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # status as recorded, per payment
    not_recorded: int = 0  # the call raised something unexpected: left processing for the reconciler
    seconds: float = 0.0


# --- 1. Intent first


@dataclass(frozen=True, slots=True)
class _Intent:
    id: int
    account_id: int
    invoice_id: int
    trigger: str
    amount_minor: int
    currency: str
    gateway: str
    gateway_customer_id: str
    payment_method_id: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    sql_type: str
    value: Callable[[_Intent], Any]


# The columns a new payment takes from its intent; the rest are constants of a new payment
# (``_NEW_PAYMENT``) or derived in the statement (the attempt number).
_PAYMENT_COLUMNS = (
    _Column("id", "bigint", lambda i: i.id),
    _Column("account_id", "bigint", lambda i: i.account_id),
    _Column("invoice_id", "bigint", lambda i: i.invoice_id),
    _Column("trigger", "text", lambda i: i.trigger),
    _Column("amount_minor", "bigint", lambda i: i.amount_minor),
    _Column("currency", "text", lambda i: i.currency),
    _Column("gateway", "text", lambda i: i.gateway),
    _Column("gateway_customer_id", "text", lambda i: i.gateway_customer_id),
    _Column("payment_method_id", "bigint", lambda i: i.payment_method_id),
    _Column("idempotency_key", "text", lambda i: i.idempotency_key),
)
_NEW_PAYMENT: dict[str, Any] = {  # as ``Payment``'s field defaults say
    "status": PaymentStatus.PENDING.value,
    "gateway_intent_id": None,
    "gateway_charge_id": "",
    "decline_code": "",
    "decline_message": "",
    "retryable": True,
    "client_secret": "",
    "next_action_url": "",
    "amount_refunded_minor": 0,
    "amount_disputed_minor": 0,
    "sent_at": None,
    "completed_at": None,
}
_TRANSITION_COLUMNS = "payment_id, account_id, from_state, to_state, actor_kind, actor_name, reason, created_at"


def _insert_payments_sql() -> str:
    names = [c.name for c in _PAYMENT_COLUMNS]
    constants = list(_NEW_PAYMENT)
    return f"""
        INSERT INTO payments_payment ({", ".join(names + constants)}, attempt, created_at, updated_at)
        SELECT {", ".join(f"r.{n}" for n in names)}, {", ".join(f"%(const_{n})s" for n in constants)},
               coalesce((SELECT max(p.attempt) FROM payments_payment p WHERE p.invoice_id = r.invoice_id), 0) + 1,
               %(now)s, %(now)s
        FROM unnest({", ".join(f"%({c.name})s::{c.sql_type}[]" for c in _PAYMENT_COLUMNS)}) AS r({", ".join(names)})
        ORDER BY r.invoice_id
        ON CONFLICT DO NOTHING
        RETURNING id, invoice_id, amount_minor
    """  # noqa: S608 (names and types are ours; values are parameters)


_INSERT_PAYMENTS = _insert_payments_sql()
# After the insert: payments whose invoice owes nothing any more go (never committed), the
# others take what is owed now; then their audit rows.
_ADJUST_PAYMENTS = """
    WITH fresh AS (SELECT * FROM unnest(%(ids)s::bigint[], %(amounts)s::bigint[]) AS f(id, amount_minor)),
    gone AS (DELETE FROM payments_payment p WHERE p.id = ANY(%(created)s) AND p.id NOT IN (SELECT id FROM fresh))
    UPDATE payments_payment p SET amount_minor = f.amount_minor
    FROM fresh f WHERE p.id = f.id AND p.amount_minor <> f.amount_minor
"""
_AUDIT_CREATED = f"""
    INSERT INTO payments_paymenttransition ({_TRANSITION_COLUMNS})
    SELECT p.id, p.account_id, '', p.status, %(actor_kind)s, %(actor_name)s, 'created (' || p.trigger || ')', %(now)s
    FROM payments_payment p WHERE p.id = ANY(%(ids)s)
"""  # noqa: S608 (a constant; values are parameters)


def _payments_create(
    *, invoice_ids: Sequence[int], trigger: str, actor: Actor, report: ChargeRunReport
) -> tuple[list[int], list[int]]:
    """Insert the pending payments of a chunk of invoices (one durable transaction), as
    ``charging.payment_create`` does one by one. Returns the new payments' ids and the
    invoices that take the single-invoice path (no card, no profile)."""
    now = timezone.now()
    with transaction.atomic(durable=True):
        due = invoicing_selectors.payable_invoices(invoice_ids=invoice_ids)  # issued, something outstanding
        report.nothing_due += len(invoice_ids) - len(due)
        account_ids = {i.account_id for i in due}
        methods = {
            m.account_id: m
            for m in PaymentMethod.objects.filter(account_id__in=account_ids, is_default=True, detached_at__isnull=True)
        }
        customers = dict(
            PaymentProfile.objects.filter(account_id__in=account_ids).values_list("account_id", "gateway_customer_id")
        )
        intents, single = [], []
        for invoice in due:
            method = methods.get(invoice.account_id)
            if method is None or invoice.account_id not in customers:
                single.append(invoice.invoice_id)
                continue
            payment_id = ids.new_id()
            intents.append(
                _Intent(
                    id=payment_id,
                    account_id=invoice.account_id,
                    invoice_id=invoice.invoice_id,
                    trigger=trigger,
                    amount_minor=invoice.outstanding_minor,
                    currency=invoice.currency,
                    gateway=method.gateway,
                    gateway_customer_id=customers[invoice.account_id],
                    payment_method_id=method.id,
                    idempotency_key=ids.encode("pay", payment_id),
                )
            )
        if not intents:
            return [], single
        params: dict[str, Any] = {c.name: [c.value(i) for i in intents] for c in _PAYMENT_COLUMNS}
        params.update({f"const_{name}": value for name, value in _NEW_PAYMENT.items()})
        params["now"] = now
        with connection.cursor() as cursor:
            cursor.execute(_INSERT_PAYMENTS, params)
            inserted = {invoice_id: payment_id for payment_id, invoice_id, _ in cursor.fetchall()}
            # What is owed, read again now that these payments are their invoices' active ones:
            # a payment active before ours recorded its outcome in the transaction that made it
            # inactive, and the first read may not have seen the money it applied.
            owed = {
                i.invoice_id: i.outstanding_minor for i in invoicing_selectors.payable_invoices(invoice_ids=inserted)
            }
            created = [payment_id for invoice_id, payment_id in inserted.items() if invoice_id in owed]
            cursor.execute(
                _ADJUST_PAYMENTS,
                {
                    "created": list(inserted.values()),
                    "ids": created,
                    "amounts": [owed[invoice_id] for invoice_id, p in inserted.items() if invoice_id in owed],
                },
            )
            cursor.execute(
                _AUDIT_CREATED, {"ids": created, "now": now, "actor_kind": actor.kind.value, "actor_name": actor.name}
            )
    report.created += len(created)
    report.taken += len(intents) - len(inserted)
    report.nothing_due += len(inserted) - len(created)
    return created, single


# --- 2. Claim


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    account_id: int
    invoice_id: int
    amount_minor: int
    currency: str
    gateway: str
    gateway_customer_id: str
    gateway_payment_method_id: str
    idempotency_key: str
    awaiting_authentication: bool  # another payment of the invoice waits for 3-D Secure


_CLAIM = f"""
    WITH claimed AS (
        UPDATE payments_payment SET status = %(to)s, sent_at = %(now)s, updated_at = %(now)s
        WHERE id = ANY(%(ids)s) AND status = %(from)s
        RETURNING id, account_id, invoice_id, amount_minor, currency, gateway, gateway_customer_id,
                  payment_method_id, idempotency_key
    ), audit AS (
        INSERT INTO payments_paymenttransition ({_TRANSITION_COLUMNS})
        SELECT id, account_id, %(from)s, %(to)s, %(actor_kind)s, %(actor_name)s, '', %(now)s FROM claimed
    )
    SELECT c.id, c.account_id, c.invoice_id, c.amount_minor, c.currency, c.gateway, c.gateway_customer_id,
           m.gateway_payment_method_id, c.idempotency_key,
           EXISTS (SELECT 1 FROM payments_payment o WHERE o.invoice_id = c.invoice_id AND o.status = %(action)s)
    FROM claimed c JOIN payments_paymentmethod m ON m.id = c.payment_method_id
    ORDER BY c.invoice_id
"""  # noqa: S608 (a constant; values are parameters)


def _payments_claim(*, payment_ids: list[int], actor: Actor) -> list[_Claimed]:
    """pending → processing (the ``send`` transition) for the payments still pending: ours to send."""
    with transaction.atomic(durable=True), connection.cursor() as cursor:
        cursor.execute(
            _CLAIM,
            {
                "ids": payment_ids,
                "from": PaymentStatus.PENDING.value,
                "to": PaymentStatus.PROCESSING.value,
                "action": PaymentStatus.REQUIRES_ACTION.value,
                "now": timezone.now(),
                "actor_kind": actor.kind.value,
                "actor_name": actor.name,
            },
        )
        return [_Claimed(*row) for row in cursor.fetchall()]


# --- 3. Calls


@dataclass(frozen=True, slots=True)
class _Answer:
    payment: _Claimed
    result: ChargeResult | GatewayError | None  # None: the call raised something else (logged)
    duration_ms: int


def _send(payment: _Claimed) -> _Answer:
    """The gateway call of ``charging.payment_execute``, for a payment claimed by the run.
    Anything but the gateway's own errors (a bug, our database gone) is logged and leaves the
    payment ``processing`` for the reconciler, as a worker dying mid-call would."""
    started = time.monotonic()
    try:
        return _call(payment)
    except Exception:
        log.exception("payments.charge_run.call_failed", extra={"payment_id": ids.encode("pay", payment.id)})
        return _Answer(payment=payment, result=None, duration_ms=ms_since(started))


def _call(payment: _Claimed) -> _Answer:
    if payment.awaiting_authentication:
        charging._cancel_abandoned_authentications(Payment(id=payment.id, invoice_id=payment.invoice_id))
    request = ChargeRequest(
        customer_id=payment.gateway_customer_id,
        payment_method_id=payment.gateway_payment_method_id,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        idempotency_key=payment.idempotency_key,
        metadata={
            "payment_id": ids.encode("pay", payment.id),
            "invoice_id": ids.encode("inv", payment.invoice_id),
            "account_id": ids.encode("acc", payment.account_id),
        },
        description=f"Invoice {ids.encode('inv', payment.invoice_id)}",
    )
    started = time.monotonic()
    result: ChargeResult | GatewayError
    try:
        result = gateway_named(payment.gateway).charge(request)
    except GatewayError as exc:
        result = exc
    return _Answer(payment=payment, result=result, duration_ms=ms_since(started))


# --- 4. Outcomes


def _calls_record(answers: list[_Answer]) -> None:
    """What each call returned, as ``charging`` logs it (the admin's attempts of a payment)."""
    rows = []
    for answer in answers:
        result = answer.result
        if isinstance(result, ChargeResult):
            outcome, object_id, detail = result.status, result.intent_id, result.decline_code
        elif isinstance(result, PaymentDeclined):
            outcome, object_id, detail = "declined", result.intent_id, result.code
        else:
            outcome, object_id, detail = type(result).__name__, "", str(result)[:300]
        rows.append(
            GatewayCall(
                account_id=answer.payment.account_id,
                payment_id=answer.payment.id,
                operation="charge",
                outcome=outcome,
                gateway_object_id=object_id or "",
                detail=detail or "",
                duration_ms=answer.duration_ms,
            )
        )
    GatewayCall.objects.bulk_create(rows)


def _outcomes_record(answers: list[_Answer], *, actor: Actor) -> tuple[Counter[str], int]:
    """Record a batch of answers in one durable transaction; one by one if that fails.
    Returns the recorded statuses and how many were not recorded (left to the reconciler)."""
    missing = sum(1 for a in answers if a.result is None)
    answers = [a for a in answers if a.result is not None]
    if not answers:
        return Counter(), missing
    results = {a.payment.id: a.result for a in answers}
    _calls_record(answers)
    counts: Counter[str] = Counter()
    try:
        with transaction.atomic(durable=True):
            # Locked in invoice order, as the single path locks a payment, then its invoice.
            for payment in Payment.objects.select_for_update().filter(id__in=results).order_by("invoice_id", "id"):
                result = results[payment.id]
                assert result is not None
                charging._apply(payment, result, actor=actor)
                counts[payment.status] += 1
        return counts, missing
    except Exception as exc:  # rolled back: each outcome again in its own transaction
        log.warning(
            "payments.charge_run.batch_recorded_singly",
            extra={"payments": len(answers), "error": type(exc).__name__},
        )
    counts.clear()
    for payment_id, result in results.items():
        assert result is not None
        try:
            counts[charging.payment_record_outcome(payment_id=payment_id, result=result, actor=actor).status] += 1
        except Exception:  # left as it was: the reconciler asks the gateway again
            log.exception("payments.charge_run.outcome_failed", extra={"payment_id": ids.encode("pay", payment_id)})
            missing += 1
    return counts, missing


# --- The run


_STOP = object()


def invoices_charge(
    *,
    invoice_ids: Sequence[int],
    trigger: str = PaymentTrigger.AFTER_ISSUE,
    threads: int = 16,
    batch_size: int = 500,
    claim_size: int = 100,
    outcome_batch: int = 200,
    record_every: float = 0.05,
    actor: Actor = SYSTEM,
) -> ChargeRunReport:
    """Charge every invoice of ``invoice_ids`` with something outstanding (see the module's
    steps). Never inside a transaction. Returns what happened, by count.

    ``batch_size`` invoices get their pending payments per transaction; ``claim_size`` of
    those are claimed at a time, just ahead of the ``threads`` callers; answers are recorded
    ``outcome_batch`` at most per transaction, gathered for at most ``record_every`` seconds."""
    forbid_transaction("A charge run")
    if trigger not in PaymentTrigger.values:
        raise ValueError(f"Unknown trigger {trigger!r}")
    started = time.monotonic()
    report = ChargeRunReport(invoices=len(invoice_ids))
    calls: queue.Queue[Any] = queue.Queue(maxsize=max(threads, claim_size))
    answers: queue.Queue[Any] = queue.Queue()
    lock = threading.Lock()
    failures: list[BaseException] = []

    def caller() -> None:
        try:
            while (payment := calls.get()) is not _STOP:
                answers.put(_send(payment))
        finally:
            connections.close_all()

    def recorder() -> None:
        try:
            done = False
            while not done:
                batch = [answers.get()]
                deadline = time.monotonic() + record_every
                while len(batch) < outcome_batch:
                    try:
                        batch.append(answers.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
                if _STOP in batch:
                    done = True
                    batch = [a for a in batch if a is not _STOP]
                if not batch:
                    continue
                recorded = time.monotonic()
                counts, missing = _outcomes_record(batch, actor=actor)
                with lock:
                    report.outcomes.update(counts)
                    report.not_recorded += missing
                log.info(
                    "payments.charge_run.recorded",
                    extra={
                        "payments": len(batch),
                        "outcomes": dict(counts),
                        "not_recorded": missing,
                        "duration_ms": ms_since(recorded),
                    },
                )
        except BaseException as exc:  # the run fails; what was not recorded is the reconciler's
            failures.append(exc)
            log.exception("payments.charge_run.recorder_failed")
        finally:
            connections.close_all()

    pool = [threading.Thread(target=caller, name=f"charge-run-call-{n}", daemon=True) for n in range(threads)]
    writer = threading.Thread(target=recorder, name="charge-run-record", daemon=True)
    for thread in [*pool, writer]:
        thread.start()
    single: list[int] = []
    try:
        for lo in range(0, len(invoice_ids), batch_size):
            chunk = invoice_ids[lo : lo + batch_size]
            created, to_single = _payments_create(invoice_ids=chunk, trigger=trigger, actor=actor, report=report)
            single += to_single
            log.info(
                "payments.charge_run.created",
                extra={
                    "first_invoice_id": ids.encode("inv", chunk[0]),
                    "invoices": len(chunk),
                    "payments_created": len(created),
                    "single_path": len(to_single),
                },
            )
            for at in range(0, len(created), claim_size):
                if failures:
                    raise RuntimeError("the charge run's recorder failed") from failures[0]
                claimed = _payments_claim(payment_ids=created[at : at + claim_size], actor=actor)
                report.claimed += len(claimed)
                for payment in claimed:
                    calls.put(payment)  # blocks while the callers are busy: claims stay just ahead
    finally:
        for _ in pool:
            calls.put(_STOP)
        for thread in pool:
            thread.join()
        answers.put(_STOP)
        writer.join()
    if failures:
        raise RuntimeError("the charge run's recorder failed") from failures[0]
    for invoice_id in single:  # no card or no profile: the single path records it for dunning
        report.single_path += 1
        try:
            charged = charging.invoice_charge(invoice_id=invoice_id, trigger=trigger, actor=actor)
        except (Conflict, NotFound) as exc:
            report.outcomes[exc.code] += 1
        else:
            report.outcomes[charged.status] += 1
    report.seconds = time.monotonic() - started
    log.info(
        "payments.charge_run",
        extra={
            "trigger": trigger,
            "invoices": report.invoices,
            "payments_created": report.created,
            "taken": report.taken,
            "nothing_due": report.nothing_due,
            "single_path": report.single_path,
            "claimed": report.claimed,
            "outcomes": dict(report.outcomes),
            "not_recorded": report.not_recorded,
            "threads": threads,
            "duration_ms": round(report.seconds * 1000),
        },
    )
    return report
