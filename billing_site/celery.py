"""The Celery app. Queues and the beat schedule live here, in code.

Broker: ``CELERY_BROKER_URL`` or ``REDIS_URL``. With neither, tasks run inline
(``CELERY_TASK_ALWAYS_EAGER``) so the demo works with nothing installed.

    celery -A billing_site worker -l info      # a worker
    celery -A billing_site beat -l info        # the scheduler
"""

from __future__ import annotations

import logging.config
import os

from celery import Celery
from celery.schedules import crontab
from celery.signals import setup_logging
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings.base")

app = Celery("billing_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.imports = ("billing_site.tasks",)


@setup_logging.connect
def _log_as_the_settings_say(**_: object) -> None:
    """Workers and beat log through ``settings.LOGGING`` (``LOG_FORMAT``, ``LOG_LEVEL``) like
    every other process: a receiver of this signal stops Celery from replacing the root
    handler with its own format (so ``-l`` has no effect; ``LOG_LEVEL`` decides)."""
    logging.config.dictConfig(settings.LOGGING)


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
        "schedule": crontab(
            day_of_month="1-3",  # the 2nd and 3rd retry a failed run (idempotent)
            hour=min(23, settings.INVOICING_GRACE_MINUTES // 60),
            minute=settings.INVOICING_GRACE_MINUTES % 60 if settings.INVOICING_GRACE_MINUTES < 1440 else 59,
        ),
        "options": {"expires": 6 * 3600},
    },
    "metering-ingest-batches-prune": {
        "task": "metering.ingest_batches_prune",
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 3600},
    },
}
