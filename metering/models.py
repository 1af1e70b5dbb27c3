"""The price catalog and the raw usage events.

Money here is ``Decimal`` with many places: unit prices may be 0.0000125 per request.
Rounding to the currency's minor unit happens on invoices, never in the catalog or usage.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from billing_site.common.audit import tracked


class SkuKind(models.TextChoices):
    DURATION = "duration", "Duration (units of a resource's spec x hours while it runs)"
    QUANTITY = "quantity", "Quantity (point usage reported by a producer)"


@tracked(account=None)
class Sku(models.Model):
    code = models.CharField(max_length=64, unique=True, help_text="e.g. compute.vcpu")
    name = models.CharField(max_length=200)
    unit = models.CharField(max_length=32, help_text="e.g. vcpu-hour, GB")
    kind = models.CharField(max_length=16, choices=SkuKind.choices)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "SKU"
        ordering = ["code"]

    def __str__(self) -> str:
        return self.code


@tracked(account=None)
class Price(models.Model):
    """A SKU's price in one currency from ``valid_from`` until the next price's
    ``valid_from``. Either flat (``unit_price``) or graduated (``tiers``), never both.
    Prices are immutable once loaded: a change is a new price with a later ``valid_from``."""

    sku = models.ForeignKey(Sku, on_delete=models.PROTECT, related_name="prices")
    currency = models.CharField(max_length=3)
    valid_from = models.DateTimeField()
    # Decimal with up to 18 places, per unit, in ``currency``; null for tiered prices.
    unit_price = models.DecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["sku", "currency", "valid_from"], name="metering_price_unique"),
        ]
        ordering = ["sku", "currency", "valid_from"]

    def __str__(self) -> str:
        return f"{self.sku_id} {self.currency} from {self.valid_from:%Y-%m-%d %H:%M}"

    @property
    def is_tiered(self) -> bool:
        return self.unit_price is None


@tracked(account=None)
class PriceTier(models.Model):
    """One band of a graduated price: units whose position in the account's cumulative
    monthly quantity is above the previous tier's ``up_to`` and at most this ``up_to``
    (null: no upper bound) cost ``unit_price`` each."""

    price = models.ForeignKey(Price, on_delete=models.CASCADE, related_name="tiers")
    position = models.PositiveSmallIntegerField()
    up_to = models.DecimalField(max_digits=38, decimal_places=12, null=True, blank=True)
    unit_price = models.DecimalField(max_digits=38, decimal_places=18)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["price", "position"], name="metering_pricetier_unique"),
        ]
        ordering = ["price", "position"]

    def __str__(self) -> str:
        return f"up to {self.up_to if self.up_to is not None else '∞'} at {self.unit_price}"


class UsageEvent(models.Model):
    """A raw usage or resource lifecycle event, exactly once per ``(account_id, event_id)``.

    The table is created by hand in the migration (Django cannot declare it): hash-partitioned
    by ``account_id`` into 16 partitions, primary key ``(account_id, event_id)`` (a unique
    constraint on a partitioned table must contain the partition key), ``seq`` from a cached
    sequence (roughly arrival order, for people and BRIN range scans; values are handed out
    before commit, so the rollup reads by ``txid`` instead, see migration 0004).
    Written only by ``metering.ingest`` with COPY and one set-based insert.
    """

    pk = models.CompositePrimaryKey("account_id", "event_id")
    account_id = models.BigIntegerField()
    event_id = models.TextField()
    seq = models.BigIntegerField()
    occurred_at = models.DateTimeField()
    received_at = models.DateTimeField()
    kind = models.TextField()  # "usage" | "resource"
    sku = models.TextField(null=True)
    # Decimal, up to 10^12 with 12 places.
    quantity = models.DecimalField(max_digits=25, decimal_places=12, null=True)
    resource_id = models.TextField(null=True)
    action = models.TextField(null=True)  # "start" | "update" | "stop"
    spec = models.JSONField(null=True)
    labels = models.JSONField(null=True)

    class Meta:
        managed = False
        db_table = "metering_usageevent"

    def __str__(self) -> str:
        return f"{self.account_id}/{self.event_id}"


class IngestBatch(models.Model):
    """A fingerprint of an ingested batch whose every event went in or was a duplicate.

    A client whose request timed out resends the very same bytes; its SHA-256 finds this
    row and the answer (all duplicates) comes without decoding or touching the event table.
    Written in the transaction that stored the events, so it exists only if they do. Used
    only while the batch's oldest event is inside the acceptance window (afterwards the full
    path would answer ``too_old``), and pruned daily after that."""

    digest = models.CharField(max_length=64, primary_key=True, help_text="SHA-256 of the request body, hex")
    events = models.PositiveIntegerField()
    oldest_event_at = models.DateTimeField()
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["oldest_event_at"], name="metering_ingestbatch_oldest")]

    def __str__(self) -> str:
        return self.digest[:12]


class RollupShard(models.Model):
    """Progress of the rollup for one shard (= one hash partition of the metering tables):
    events with ``txid_horizon <= txid < next horizon`` are next; open intervals of running
    resources are materialised up to ``watermark`` (an hour boundary). A worker claims a
    shard by locking its row (``FOR UPDATE SKIP LOCKED``), so two never work on one shard."""

    shard = models.PositiveSmallIntegerField(primary_key=True)
    txid_horizon = models.BigIntegerField(default=0)
    watermark = models.DateTimeField(null=True, blank=True)
    events_processed = models.BigIntegerField(default=0)
    # When the last run of this shard committed (every run writes it, idle ones too: a shard
    # whose time stands still is a rollup that does not run) and how long its transaction took.
    updated_at = models.DateTimeField(auto_now=True)
    last_duration_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["shard"]

    def __str__(self) -> str:
        return f"shard {self.shard}"


class HourlyUsage(models.Model):
    """Rated hourly usage (table ``metering_hourlyusage``, migration 0004): quantity and amount
    at full precision in the account's currency; rounding happens on invoices. A duration
    SKU's row also keeps ``unit_seconds`` (units x seconds, exact, migration 0012): its
    ``quantity`` is that / 3600 rounded to 12 places, and sums of quantities are read as
    sums of ``unit_seconds`` divided once (``metering.selectors``)."""

    pk = models.CompositePrimaryKey("account_id", "hour", "sku", "resource_id", "labels")
    account_id = models.BigIntegerField()
    hour = models.DateTimeField()
    sku = models.TextField()
    resource_id = models.TextField()
    labels = models.JSONField()
    quantity = models.DecimalField(max_digits=38, decimal_places=12)
    amount = models.DecimalField(max_digits=38, decimal_places=12, null=True)
    cum_quantity = models.DecimalField(max_digits=38, decimal_places=12, null=True)
    unit_seconds = models.DecimalField(max_digits=65, decimal_places=30, null=True)  # numeric, exact

    class Meta:
        managed = False
        db_table = "metering_hourlyusage"

    def __str__(self) -> str:
        return f"{self.account_id} {self.hour:%Y-%m-%d %H:00} {self.sku} {self.resource_id}"


class ResourceState(models.Model):
    """Where a resource's lifecycle timeline leaves it, with data-quality counters."""

    pk = models.CompositePrimaryKey("account_id", "resource_id")
    account_id = models.BigIntegerField()
    resource_id = models.TextField()
    running = models.BooleanField()
    since = models.DateTimeField(null=True)
    spec = models.JSONField(null=True)
    labels = models.JSONField()
    last_event_at = models.DateTimeField()
    events = models.IntegerField()
    start_while_running = models.IntegerField()
    stop_while_stopped = models.IntegerField()
    update_while_stopped = models.IntegerField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "metering_resourcestate"

    def __str__(self) -> str:
        return f"{self.account_id}/{self.resource_id}"


class InactiveAccountUsage(models.Model):
    """Events accepted for an account that was not active when they arrived (pending,
    suspended or blocked): usage that happened and is billable, counted for the data-quality
    view. Written by ingestion, set-based, in the batch's transaction and only for newly
    stored events (a resend counts nothing): one row per batch and account, appended, so
    concurrent batches for the same account never wait on a shared counter row; readers sum.
    Folded hourly into one row per account, state and day (``services.inactive_usage_compact``)."""

    id = models.BigAutoField(primary_key=True)
    account_id = models.BigIntegerField()
    account_state = models.CharField(max_length=16)
    events = models.IntegerField()
    received_at = models.DateTimeField()

    class Meta:
        verbose_name_plural = "inactive account usage"
        indexes = [models.Index(fields=["account_id", "account_state"], name="metering_inactive_account")]

    def __str__(self) -> str:
        return f"{self.account_id} {self.account_state}: {self.events} events"


class MonthlySpend(models.Model):
    """Rated amount per account and calendar month (UTC), in the account's currency at full
    precision: the sum of the month's hourly amounts. The rollup moves it by each run's
    differences in the run's own transaction (one statement per shard), so the credit check
    after a rollup reads one row per account and month instead of the daily rows."""

    pk = models.CompositePrimaryKey("account_id", "month")
    account_id = models.BigIntegerField()
    month = models.DateField()
    amount = models.DecimalField(max_digits=38, decimal_places=12)

    class Meta:
        verbose_name_plural = "monthly spend"

    def __str__(self) -> str:
        return f"{self.account_id} {self.month:%Y-%m}: {self.amount}"


class DirtyHour(models.Model):
    """An hour of one shard whose events changed in the event store (scale path): written by
    the sinks after their insert and before they acknowledge the log, as an upsert that takes a
    new ``version`` from a sequence. The rollup recomputes the hour while its version is above
    the manifest's. Never deleted while the hour is inside the acceptance window."""

    pk = models.CompositePrimaryKey("shard", "hour")
    shard = models.PositiveSmallIntegerField()
    hour = models.DateTimeField()
    version = models.BigIntegerField()
    marked_at = models.DateTimeField()

    class Meta:
        db_table = "metering_dirtyhour"

    def __str__(self) -> str:
        return f"shard {self.shard} {self.hour:%Y-%m-%d %H:00} v{self.version}"


class HourManifest(models.Model):
    """What the hourly usage of one hour and shard was last computed from (scale path): the
    dirty version it covers, how many events counted, how many usage rows and lifecycle events
    they made, and a checksum of which events (an XOR of their hashes in the event store).
    Written in the transaction that writes the hourly usage, so the two never disagree."""

    pk = models.CompositePrimaryKey("shard", "hour")
    shard = models.PositiveSmallIntegerField()
    hour = models.DateTimeField()
    version = models.BigIntegerField()
    events = models.BigIntegerField()
    usage_rows = models.IntegerField()
    resource_events = models.IntegerField()
    checksum = models.CharField(max_length=16)
    computed_at = models.DateTimeField()

    class Meta:
        db_table = "metering_hourmanifest"
        ordering = ["-hour", "shard"]

    def __str__(self) -> str:
        return f"shard {self.shard} {self.hour:%Y-%m-%d %H:00} v{self.version}"
