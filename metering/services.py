"""Writes of the metering app (the event hot path is ``metering.ingest``)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from metering import catalog, partitions
from metering.models import IngestBatch, Price, PriceTier, Sku

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CatalogLoadResult:
    skus_created: int = 0
    skus_updated: int = 0
    skus_unchanged: int = 0
    prices_created: int = 0
    prices_unchanged: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.skus_created or self.skus_updated or self.prices_created)


def _tiers_of(price: Price) -> list[tuple[Decimal | None, Decimal]]:
    return [(t.up_to, t.unit_price) for t in price.tiers.all()]


@transaction.atomic(durable=True)
def catalog_load(*, document: catalog.CatalogDocument) -> CatalogLoadResult:
    """Load SKUs and prices; idempotent (the same document twice changes nothing).

    A SKU's name and unit may change; its kind may not (usage already recorded against it
    would change meaning). A loaded price never changes: a different amount for the same
    SKU, currency and ``valid_from`` is refused; publish a new ``valid_from`` instead.
    Any refusal rolls the whole load back.
    """
    counts = dict.fromkeys(("skus_created", "skus_updated", "skus_unchanged", "prices_created", "prices_unchanged"), 0)
    existing = {s.code: s for s in Sku.objects.select_for_update().filter(code__in=[d.code for d in document.skus])}
    for doc in document.skus:
        sku = existing.get(doc.code)
        if sku is None:
            sku = Sku.objects.create(code=doc.code, name=doc.name, unit=doc.unit, kind=doc.kind)
            counts["skus_created"] += 1
        elif sku.kind != doc.kind:
            raise catalog.CatalogError(f"{doc.code}: kind is {sku.kind}, cannot become {doc.kind}")
        elif (sku.name, sku.unit) != (doc.name, doc.unit):
            sku.name, sku.unit = doc.name, doc.unit
            sku.save(update_fields=["name", "unit", "updated_at"])
            counts["skus_updated"] += 1
        else:
            counts["skus_unchanged"] += 1

        loaded = {(p.currency, p.valid_from): p for p in sku.prices.prefetch_related("tiers")}
        for price_doc in doc.prices:
            tiers = [(t.up_to, t.unit_price) for t in price_doc.tiers or []]
            current = loaded.get((price_doc.currency, price_doc.valid_from))
            if current is not None:
                same_flat = current.unit_price == price_doc.unit_price
                if not (same_flat and _tiers_of(current) == tiers):
                    raise catalog.CatalogError(
                        f"{doc.code}: the {price_doc.currency} price from {price_doc.valid_from.isoformat()} is "
                        "already loaded with different amounts; prices never change, add one with a later valid_from"
                    )
                counts["prices_unchanged"] += 1
                continue
            price = Price.objects.create(
                sku=sku, currency=price_doc.currency, valid_from=price_doc.valid_from, unit_price=price_doc.unit_price
            )
            PriceTier.objects.bulk_create(
                PriceTier(price=price, position=i, up_to=up_to, unit_price=unit_price)
                for i, (up_to, unit_price) in enumerate(tiers)
            )
            counts["prices_created"] += 1
    return CatalogLoadResult(**counts)


def ingest_batches_prune() -> int:
    """Delete batch fingerprints that can no longer answer a resend (their oldest event is
    past the acceptance window, so the full path would say ``too_old``)."""
    cutoff = timezone.now() - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)
    deleted, _ = IngestBatch.objects.filter(oldest_event_at__lt=cutoff).delete()
    return deleted


def inactive_usage_compact(*, older_than_hours: int = 1) -> int:
    """Fold the appended inactive-account usage rows received more than ``older_than_hours``
    ago into one row per account, state and day, in one statement (so readers' sums never
    change): ingestion appends a row per batch and account, which at a cloud's batch rate
    (and many pending accounts) would grow with batches, not accounts. Returns rows removed."""
    from django.db import connection, transaction

    cutoff = timezone.now() - dt.timedelta(hours=older_than_hours)
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            """
            WITH folded AS (
                DELETE FROM metering_inactiveaccountusage
                WHERE received_at < %s AND received_at <> date_trunc('day', received_at, 'UTC')  -- not folded yet
                RETURNING account_id, account_state, events, received_at
            ), days AS (
                INSERT INTO metering_inactiveaccountusage (account_id, account_state, events, received_at)
                SELECT account_id, account_state, sum(events), date_trunc('day', received_at, 'UTC')
                FROM folded GROUP BY 1, 2, 4
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM folded) - (SELECT count(*) FROM days)
            """,
            [cutoff],
        )
        (removed,) = cur.fetchone()
    log.info("metering.inactive_usage_compacted", extra={"rows_removed": removed, "before": cutoff})
    return int(removed)


def hourly_partitions_maintain(*, now: dt.datetime | None = None, dry_run: bool = False) -> partitions.MaintainReport:
    """The hourly rollup's monthly partitions: the coming months created ahead, rows found in
    DEFAULT moved into their month's, months beyond ``METERING_HOURLY_RETENTION_MONTHS``
    dropped whole once their daily rows are checked (``metering.partitions``). One
    transaction per partition, so it is not itself atomic; idempotent."""
    return partitions.maintain(now=now, dry_run=dry_run)


def rollup_catch_up(*, patience_seconds: float = 300.0) -> None:
    """Roll usage up until every event committed before this call is in the rollups: passes
    over every shard until each shard's horizon has passed the transactions of that moment
    (a shard busy in a beat worker, or a stuck writer of events holding the event writers'
    lock, is waited for). What a period close runs first."""
    import time

    from billing_site.common.errors import ApplicationError
    from metering import rollup, selectors

    ceiling = selectors.transaction_ceiling()
    deadline = time.monotonic() + patience_seconds
    while True:
        rollup.rollup()
        if selectors.rollup_caught_up(ceiling=ceiling, shards=rollup.SHARDS):
            return
        if time.monotonic() > deadline:
            raise ApplicationError(
                "rollup_behind",
                "The usage rollup could not catch up (a shard stayed busy or a writer of events held the "
                "event writers' lock); try again.",
            )
        time.sleep(0.5)
