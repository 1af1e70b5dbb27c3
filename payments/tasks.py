"""Thin Celery tasks of the payments app (queue ``payments``; limits in billing_site/celery.py).
Each takes ids, calls a service, and is idempotent: the outbox delivers at least once."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="payments.charge_invoice")
def charge_invoice(*, invoice_id: int, trigger: str, account_id: int | None = None) -> str:
    from payments import services

    return services.charge_invoice_task_body(invoice_id=invoice_id, trigger=trigger)


@shared_task(name="payments.charge_invoices")
def charge_invoices(*, invoice_ids: list[int], trigger: str, account_id: int | None = None) -> dict[str, int]:
    """A chunk of invoices (a period close's, through the outbox): ``charging.invoices_charge``,
    the same rules per payment as ``charge_invoice``."""
    from payments import charging

    return dict(charging.invoices_charge(invoice_ids=invoice_ids, trigger=trigger))


@shared_task(name="payments.reconcile")
def reconcile() -> dict[str, int]:
    from payments import charging

    return charging.payments_reconcile()


@shared_task(name="payments.account_activate")
def account_activate(*, account_id: int, reason: str) -> bool:
    from payments import services

    return services.account_activate(account_id=account_id, reason=reason)


@shared_task(name="payments.account_suspend")
def account_suspend(*, account_id: int, reason: str) -> bool:
    from payments import services

    return services.account_suspend(account_id=account_id, reason=reason)


@shared_task(name="payments.account_reactivate")
def account_reactivate(*, account_id: int, reason: str) -> bool:
    from payments import services

    return services.account_reactivate(account_id=account_id, reason=reason)


@shared_task(name="payments.account_reactivated_by_staff")
def account_reactivated_by_staff(*, account_id: int, reason: str) -> int:
    """Staff reactivated a suspended account (queued by accounts, ``ACCOUNTS_REACTIVATED_BY_STAFF_TASKS``)."""
    from payments import dunning

    return dunning.cases_account_reactivated_by_staff(account_id=account_id, reason=reason)


@shared_task(name="payments.process_webhook_event")
def process_webhook_event(*, event_id: int) -> str:
    """``event_id``: our WebhookEvent row's id (queued by the webhook view through the outbox)."""
    from payments import webhooks

    return webhooks.webhook_event_process(event_id)


@shared_task(name="payments.process_stale_webhook_events")
def process_stale_webhook_events() -> dict[str, int]:
    from payments import webhooks

    return webhooks.webhook_events_process_stale()


@shared_task(name="payments.refund_execute")
def refund_execute(*, refund_id: int) -> str:
    from payments import refunds

    return str(refunds.refund_execute(refund_id=refund_id).status)


@shared_task(name="payments.refunds_reconcile")
def refunds_reconcile() -> dict[str, int]:
    from payments import refunds

    return refunds.refunds_reconcile()


@shared_task(name="payments.run_dunning")
def run_dunning() -> dict[str, int]:
    from payments import dunning

    return dunning.dunning_run()
