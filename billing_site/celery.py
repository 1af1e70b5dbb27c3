"""The Celery app. Queues, routes, time limits and the beat schedule live here, in code.

Broker: ``CELERY_BROKER_URL`` or ``REDIS_URL``. With neither, tasks run inline
(``CELERY_TASK_ALWAYS_EAGER``) so the demo works with nothing installed.

    celery -A billing_site worker              # a worker serving every queue
    celery -A billing_site worker -Q rollup    # a worker serving one queue (see README)
    celery -A billing_site beat                # the scheduler

Each task has its own queue so that a kind of work never waits behind another: 100,000
PDF renders of a period close must not hold up the every-minute rollup until its
``expires`` drops it.
"""

from __future__ import annotations

import logging.config
import os

from celery import Celery
from celery.schedules import crontab
from celery.signals import setup_logging
from django.conf import settings
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings.base")

app = Celery("billing_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.imports = ("billing_site.tasks",)

# The queues, and which worker pool each one is for (the README says how to run them).
QUEUES = {
    "rollup": "the usage rollup: short, every minute, never behind anything else",
    "invoicing": "period closes and their shards",
    "documents": "invoice and credit-note PDFs (many, slow, can wait)",
    "payments": "charges, refunds, webhook processing, reconciliation, dunning, payment-driven account transitions",
    "antifraud": "risk decisions reaching accounts (blocks), usage assessments, the credit check after rollups",
    "default": "anything else: maintenance, health checks",
}

# Every task: its queue and its (soft, hard) time limits in seconds. At the soft limit the
# task gets SoftTimeLimitExceeded (its transaction rolls back; every task is idempotent, so
# the next run redoes the work); at the hard limit its worker process is replaced. The limits
# are far above a normal run and exist to end a stuck one. A test checks that no task is
# missing here; tasks that are not (Celery's own) get the settings' defaults.
TASKS: dict[str, tuple[str, int, int]] = {
    # drains ~50 s; a pass over hours of backlog may take minutes (or use manage.py rollup_usage)
    "metering.rollup_usage": ("rollup", 1800, 1860),
    "metering.ingest_batches_prune": ("default", 600, 660),
    "metering.inactive_usage_compact": ("default", 600, 660),
    # DDL per partition, each waiting at most 10 s for its shard's rollup; a drop reads a month
    "metering.hourly_partitions_maintain": ("default", 1800, 1860),
    # one chunk's documents (500) at ~0.3 s each
    "invoicing.render_documents": ("documents", 900, 960),
    # one shard of accounts; the run rolls usage up first, then fans out
    "invoicing.close_shard": ("invoicing", 1800, 1860),
    "invoicing.close_period": ("invoicing", 3600, 3660),
    "invoicing.close_last_period": ("invoicing", 3600, 3660),
    "billing_site.worker_health": ("default", 10, 20),
    "billing_site.outbox_drain": ("default", 120, 150),
    # the ageing, a month's funnel and two months' revenue: seconds at a million accounts
    "billing_site.dashboard_finance_refresh": ("default", 100, 115),
    # one invoice's charge: a gateway call (Stripe's timeout 30 s) and two short transactions
    "payments.charge_invoice": ("payments", 120, 150),
    # a chunk of a period close's invoices (500): 16 calls in flight; a call that outlives the
    # hard limit leaves its payments to the reconciler
    "payments.charge_invoices": ("payments", 600, 660),
    "payments.reconcile": ("payments", 240, 270),
    "payments.account_activate": ("payments", 30, 60),
    "payments.account_suspend": ("payments", 30, 60),
    "payments.account_reactivate": ("payments", 30, 60),
    "payments.account_reactivated_by_staff": ("payments", 30, 60),
    "payments.process_webhook_event": ("payments", 120, 150),
    "payments.process_stale_webhook_events": ("payments", 240, 270),
    "payments.refund_execute": ("payments", 120, 150),
    "payments.refunds_reconcile": ("payments", 240, 270),
    "payments.run_dunning": ("payments", 1800, 1860),
    "antifraud.account_block": ("antifraud", 30, 60),
    "antifraud.account_transition": ("antifraud", 30, 60),
    "antifraud.usage_sweep": ("antifraud", 600, 660),
    "antifraud.account_blocked": ("antifraud", 120, 150),
    "antifraud.account_unblocked": ("antifraud", 30, 60),
    "antifraud.credit_limit_initial": ("antifraud", 30, 60),
    "antifraud.credit_limits_review": ("antifraud", 600, 660),
    "antifraud.spending_cap": ("antifraud", 30, 60),
    "antifraud.spending_cap_lift": ("antifraud", 30, 60),
    # the credit check after each rollup drain: one set-based read, then threshold invoices
    "invoicing.threshold_billing": ("antifraud", 300, 330),
}

app.conf.task_queues = [Queue(name, routing_key=name) for name in QUEUES]
app.conf.task_default_queue = "default"
app.conf.task_routes = {
    **{name: {"queue": queue} for name, (queue, _, _) in TASKS.items()},
    "payments.*": {"queue": "payments"},
}
app.conf.task_annotations = {
    name: {"soft_time_limit": soft, "time_limit": hard} for name, (_, soft, hard) in TASKS.items()
}

# A message a worker took is acknowledged when its task ends (``CELERY_TASK_ACKS_LATE``); if the
# worker dies first (SIGKILL, the machine lost), Redis hands the message to another worker once
# it has been out for the visibility timeout. That timeout must outlast the longest hard limit,
# or a task still running would be delivered a second time: one minute above it, 62 minutes
# with today's table (kombu's default, one hour, was below the period close's 61). That is how
# long a killed worker's unfinished tasks wait. Money does not wait for it: a charge commits
# its payments before any gateway call, and the every-minute reconciler sends, within minutes,
# those a dead worker claimed or never sent (``payments.charging``).
VISIBILITY_TIMEOUT_SECONDS = max(hard for _, _, hard in TASKS.values()) + 60
app.conf.broker_transport_options = {
    **(app.conf.broker_transport_options or {}),
    "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
}


@setup_logging.connect
def _log_as_the_settings_say(**_: object) -> None:
    """Workers and beat log through ``settings.LOGGING`` (``LOG_FORMAT``, ``LOG_LEVEL``) like
    every other process: a receiver of this signal stops Celery from replacing the root
    handler with its own format (so ``-l`` has no effect; ``LOG_LEVEL`` decides)."""
    logging.config.dictConfig(settings.LOGGING)


def period_close_schedule(grace_minutes: int) -> crontab:
    """When beat closes last month: ``grace_minutes`` after midnight UTC on the 1st (23:59 at
    the latest: ``invoicing.close_last_period`` itself waits out a longer grace), and again
    on the 2nd and 3rd, which retry a failed run (the close is idempotent)."""
    return crontab(
        day_of_month="1-3",
        hour=min(23, grace_minutes // 60),
        minute=grace_minutes % 60 if grace_minutes < 1440 else 59,
    )


# Schedules arrive with the work they run (usage rollup every minute, period close on the
# 1st, dunning daily); each entry sets `expires` so a backlog never runs stale copies.
app.conf.beat_schedule = {
    "metering-rollup-usage": {
        "task": "metering.rollup_usage",
        "schedule": crontab(),  # every minute; each run drains for ~50 s (see the task)
        "options": {"expires": 55},  # a backlog never runs stale copies
    },
    # Last month's invoices, on the 1st once the grace time for late events is over.
    "invoicing-close-last-period": {
        "task": "invoicing.close_last_period",
        "schedule": period_close_schedule(settings.INVOICING_GRACE_MINUTES),
        "options": {"expires": 6 * 3600},
    },
    # Side effects the outbox still holds (prompt delivery after commit is the normal path).
    "outbox-drain": {
        "task": "billing_site.outbox_drain",
        "schedule": 15.0,
        "options": {"expires": 14},
    },
    # Finance's figures on the staff home page (the page asks them itself past
    # DASHBOARD_FINANCE_MAX_AGE_SECONDS, so a stopped beat only makes one load slow).
    "dashboard-finance-refresh": {
        "task": "billing_site.dashboard_finance_refresh",
        "schedule": crontab(minute="*/2"),
        "options": {"expires": 110},
    },
    # Payments whose answer was lost, or whose worker died mid-call: ask the gateway.
    "payments-reconcile": {
        "task": "payments.reconcile",
        "schedule": crontab(),
        "options": {"expires": 55},
    },
    "payments-refunds-reconcile": {
        "task": "payments.refunds_reconcile",
        "schedule": crontab(minute="*/5"),
        "options": {"expires": 290},
    },
    # Webhook events stored but not processed (their task lost): processed again.
    "payments-stale-webhook-events": {
        "task": "payments.process_stale_webhook_events",
        "schedule": crontab(minute="*/5"),
        "options": {"expires": 290},
    },
    # Debt: retries, warnings, suspensions and write-offs the dunning policy says are due
    # (each step claimed once per case: a second run the same day does nothing).
    "payments-run-dunning": {
        "task": "payments.run_dunning",
        "schedule": crontab(hour=6, minute=0),
        "options": {"expires": 6 * 3600},
    },
    # Spend velocity of new accounts, from the rated rollups (checkpoint 4 of antifraud).
    "antifraud-usage-sweep": {
        "task": "antifraud.usage_sweep",
        "schedule": crontab(minute="*/15"),
        "options": {"expires": 14 * 60},
    },
    # Credit limits raised after invoices paid on time (antifraud's policy).
    "antifraud-credit-limits-review": {
        "task": "antifraud.credit_limits_review",
        "schedule": crontab(hour=5, minute=30),
        "options": {"expires": 6 * 3600},
    },
    # Hourly usage's monthly partitions: the next months created ahead (rows never wait in
    # DEFAULT), months past METERING_HOURLY_RETENTION_MONTHS dropped whole (metering/partitions.py).
    "metering-hourly-partitions-maintain": {
        "task": "metering.hourly_partitions_maintain",
        "schedule": crontab(hour=3, minute=41),
        "options": {"expires": 6 * 3600},
    },
    # Ingestion appends a row per batch and inactive account; fold them hourly into one per day.
    "metering-inactive-usage-compact": {
        "task": "metering.inactive_usage_compact",
        "schedule": crontab(minute=23),
        "options": {"expires": 3000},
    },
    "metering-ingest-batches-prune": {
        "task": "metering.ingest_batches_prune",
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 3600},
    },
}
