"""Celery tasks of the metering app: thin, they call services."""

from __future__ import annotations

from celery import shared_task

from metering import services


@shared_task(name="metering.ingest_batches_prune")
def ingest_batches_prune() -> int:
    """Forget batch fingerprints whose events have left the acceptance window."""
    return services.ingest_batches_prune()


@shared_task(name="metering.rollup_usage")
def rollup_usage() -> str:
    """Every minute (beat): roll up and rate what arrived. Shards busy in another worker are
    skipped and picked up by the next run."""
    from metering import rollup

    return rollup.rollup().summary()
