"""Gateways' customers, payment methods, payments and their attempts at the gateway, refunds,
disputes, inbound webhook events, and dunning (policy, cases, actions).

Money is integer minor units of ``currency`` (ISO 4217 exponents, ``billing_site.common.money``).
Every table carries ``account_id`` (the shard key) and leads its hot indexes with it. Rows the
outside world can name have random 63-bit ids shown as ``pay_…``, ``pmt_…``, ``ref_…``, ``dsp_…``.

Exactly once, by constraint:

- one payment method row per gateway payment method (``(gateway, gateway_payment_method_id)``);
- one *active* payment per invoice (``payments_payment_one_active``: a partial unique index on
  ``invoice_id`` over ``pending``, ``processing`` and ``unknown``): the customer's pay call, the
  post-issue charge, a dunning retry and a webhook racing each other cannot start two charges;
  a payment whose outcome is ``unknown`` blocks every new charge of its invoice until the
  reconciler has asked the gateway;
- ``(invoice_id, attempt)`` numbers the attempts; ``idempotency_key`` is unique;
- a webhook event once per ``(gateway, event_id)``; a refund per ``idempotency_key``; a dispute
  per gateway dispute id; a dunning action per ``(case, action)``.
"""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django_fsm import FSMField, FSMModelMixin, transition

from billing_site.common import ids, money
from billing_site.common.audit import tracked
from billing_site.common.transitions import AuditedTransitions, StateChangeRecord


class GatewayName(models.TextChoices):
    SANDBOX = "sandbox", "Sandbox (offline)"
    STRIPE = "stripe", "Stripe"


@tracked(account="account_id")
class PaymentProfile(models.Model):
    """Per billing account: which gateway it pays through, its customer there, and whether
    operators paused dunning for it. Created on first use."""

    account_id = models.BigIntegerField(primary_key=True)
    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    gateway_customer_id = models.CharField(max_length=64, blank=True, default="")
    dunning_paused = models.BooleanField(default=False)
    dunning_paused_reason = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        permissions = [("pause_dunning", "Can pause and resume dunning for an account")]
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "gateway_customer_id"],
                condition=~Q(gateway_customer_id=""),
                name="payments_profile_customer_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)} via {self.gateway}"


@tracked(account="account_id")
class PaymentMethod(models.Model):
    """A card bound to an account. Card facts come from the gateway; card data never reach us."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    gateway_payment_method_id = models.CharField(max_length=64)
    setup_intent_id = models.CharField(max_length=64, blank=True, default="")
    brand = models.CharField(max_length=32)
    last4 = models.CharField(max_length=4)
    exp_month = models.PositiveSmallIntegerField()
    exp_year = models.PositiveSmallIntegerField()
    fingerprint = models.CharField(max_length=64, db_index=True, help_text="Never shown to customers")
    issuer_country = models.CharField(max_length=2, blank=True, default="")
    funding = models.CharField(max_length=16, blank=True, default="")
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    detached_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "gateway_payment_method_id"], name="payments_pm_gateway_id_unique"
            ),
            models.UniqueConstraint(
                fields=["account_id"],
                condition=Q(is_default=True, detached_at__isnull=True),
                name="payments_pm_one_default",
            ),
        ]
        indexes = [
            models.Index(fields=["account_id", "created_at"], name="payments_pm_account"),
            models.Index(fields=["last4", "created_at"], name="payments_pm_last4"),  # the back office's search
        ]

    def __str__(self) -> str:
        return f"{self.brand} •••• {self.last4} ({self.exp_month:02d}/{self.exp_year % 100:02d})"

    @property
    def public_id(self) -> str:
        return ids.encode("pmt", self.id)

    @property
    def is_active(self) -> bool:
        return self.detached_at is None


class BindingStatus(models.TextChoices):
    STARTED = "started", "Started"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class BindingAttempt(models.Model):
    """A card binding started (a SetupIntent) and how it ended: the trail antifraud reads for
    card testing, and what ties a SetupIntent to the account that asked for it."""

    account_id = models.BigIntegerField()
    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    setup_intent_id = models.CharField(max_length=64)
    user_id = models.BigIntegerField(null=True, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=BindingStatus.choices, default=BindingStatus.STARTED)
    failure_code = models.CharField(max_length=64, blank=True, default="")
    payment_method = models.ForeignKey(PaymentMethod, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["gateway", "setup_intent_id"], name="payments_binding_intent_unique")
        ]
        indexes = [
            models.Index(fields=["account_id", "created_at"], name="payments_binding_account"),
            models.Index(fields=["client_ip", "created_at"], name="payments_binding_ip"),
        ]

    def __str__(self) -> str:
        return f"{self.setup_intent_id}: {self.status}"


class PaymentStatus(models.TextChoices):
    PENDING = "pending", "Pending (not sent yet)"
    PROCESSING = "processing", "Processing (sent to the gateway)"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    REQUIRES_ACTION = "requires_action", "Requires the customer's authentication"
    UNKNOWN = "unknown", "Unknown (answer lost; the reconciler asks the gateway)"
    CANCELED = "canceled", "Canceled"


# A payment in one of these states may still take money: at most one per invoice.
ACTIVE_STATUSES = (PaymentStatus.PENDING, PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN)


class PaymentTrigger(models.TextChoices):
    AFTER_ISSUE = "after_issue", "Charged after the invoice was issued"
    CUSTOMER = "customer", "The customer's pay request"
    DUNNING = "dunning", "Dunning retry"
    NEW_CARD = "new_card", "A new default card"
    WEBHOOK = "webhook", "Learnt from a gateway webhook"
    OPERATOR = "operator", "An operator"


@tracked(account="account_id", exclude=("client_secret",))
class Payment(AuditedTransitions, FSMModelMixin, models.Model):
    """One attempt to collect an invoice's outstanding amount from a card.

    Committed as ``pending`` before the gateway is called; ``processing`` while the call is
    out; the outcome is recorded in a second transaction. The idempotency key and our
    ``payment_id`` in the PaymentIntent's metadata let the reconciler find the intent when the
    answer was lost (``unknown``) or the worker died (stale ``processing``)."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    invoice_id = models.BigIntegerField()
    attempt = models.PositiveIntegerField()
    trigger = models.CharField(max_length=16, choices=PaymentTrigger.choices)
    status = FSMField(default=PaymentStatus.PENDING, choices=PaymentStatus.choices, protected=True)
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    gateway_customer_id = models.CharField(max_length=64, blank=True, default="")
    payment_method = models.ForeignKey(PaymentMethod, null=True, blank=True, on_delete=models.PROTECT)
    idempotency_key = models.CharField(max_length=64, unique=True)
    gateway_intent_id = models.CharField(max_length=64, null=True, blank=True)
    gateway_charge_id = models.CharField(max_length=64, blank=True, default="")
    decline_code = models.CharField(max_length=64, blank=True, default="")
    decline_message = models.CharField(max_length=300, blank=True, default="")
    retryable = models.BooleanField(default=True, help_text="Of a decline: may a later attempt succeed")
    client_secret = models.CharField(max_length=200, blank=True, default="", help_text="requires_action only")
    next_action_url = models.URLField(max_length=500, blank=True, default="")
    amount_refunded_minor = models.BigIntegerField(default=0)
    amount_disputed_minor = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When the gateway call went out")
    completed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["invoice_id", "attempt"], name="payments_payment_invoice_attempt"),
            models.UniqueConstraint(
                fields=["invoice_id"], condition=Q(status__in=ACTIVE_STATUSES), name="payments_payment_one_active"
            ),
            models.UniqueConstraint(
                fields=["gateway", "gateway_intent_id"],
                condition=Q(gateway_intent_id__isnull=False),
                name="payments_payment_intent_unique",
            ),
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="payments_payment_positive"),
            models.CheckConstraint(
                condition=Q(amount_refunded_minor__gte=0, amount_refunded_minor__lte=models.F("amount_minor")),
                name="payments_payment_refunds_within_amount",
            ),
            # Refunded plus withdrawn by open and lost disputes never exceeds what was captured.
            # Added NOT VALID (migration 0003): rows from before the rule are found by ledger_check.
            models.CheckConstraint(
                condition=Q(
                    amount_disputed_minor__gte=0,
                    amount_minor__gte=models.F("amount_refunded_minor") + models.F("amount_disputed_minor"),
                ),
                name="payments_payment_within_captured",
            ),
        ]
        indexes = [
            models.Index(fields=["account_id", "-created_at"], name="payments_payment_account"),
            models.Index(fields=["status", "updated_at"], name="payments_payment_status"),
            # The month's first charges: the dunning funnel's cohort (``selectors.dunning_funnel``).
            models.Index(
                fields=["created_at"],
                include=["invoice_id", "currency", "amount_minor"],
                condition=Q(attempt=1),
                name="payments_payment_first_attempt",
            ),
            # The back office's search by the gateway's charge id (the intent has its unique index).
            models.Index(
                fields=["gateway_charge_id"], name="payments_payment_charge", condition=~Q(gateway_charge_id="")
            ),
        ]
        permissions = [("issue_refund", "Can refund payments")]

    def __str__(self) -> str:
        return f"{self.public_id} {money.display(self.amount_minor, self.currency)} {self.status}"

    @property
    def public_id(self) -> str:
        return ids.encode("pay", self.id)

    # --- Lifecycle: state only; ``payments.charging`` locks, audits and does the rest (through
    # ``billing_site.common.transitions``: the audit row and the log line's ids below).

    TRANSITION_LOG = "payment.transition"

    def log_fields(self) -> dict[str, object]:
        return {
            "payment_id": self.public_id,
            "invoice_id": ids.encode("inv", self.invoice_id),
            "account_id": ids.encode("acc", self.account_id),
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "decline_code": self.decline_code or None,
        }

    @transition(field=status, source=PaymentStatus.PENDING, target=PaymentStatus.PROCESSING)
    def send(self) -> None:
        """The gateway call is going out."""

    @transition(
        field=status,
        source=[PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN, PaymentStatus.REQUIRES_ACTION],
        target=PaymentStatus.SUCCEEDED,
    )
    def succeed(self) -> None:
        """The money was taken."""

    @transition(
        field=status,
        source=[PaymentStatus.PENDING, PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN, PaymentStatus.REQUIRES_ACTION],
        target=PaymentStatus.FAILED,
    )
    def fail(self) -> None:
        """Declined, or never sent (no card, gateway certainly down)."""

    @transition(
        field=status, source=[PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN], target=PaymentStatus.REQUIRES_ACTION
    )
    def require_action(self) -> None:
        """The customer must authenticate (3-D Secure)."""

    @transition(field=status, source=PaymentStatus.PROCESSING, target=PaymentStatus.UNKNOWN)
    def lose_track(self) -> None:
        """The answer was lost: the reconciler asks the gateway."""

    @transition(field=status, source=[PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN], target=PaymentStatus.PENDING)
    def requeue(self) -> None:
        """The request never reached the gateway (it refused the connection, or has no trace of
        it): the same payment is sent again, with the same idempotency key. Not a decline."""

    @transition(
        field=status,
        source=[PaymentStatus.PENDING, PaymentStatus.REQUIRES_ACTION, PaymentStatus.UNKNOWN],
        target=PaymentStatus.CANCELED,
    )
    def cancel(self) -> None:
        """An abandoned authentication, replaced by a new attempt; an intent never created; or
        a payment waiting to be sent (again) whose invoice no longer owes anything."""


class PaymentTransition(StateChangeRecord):
    """Append-only audit of payment state changes, in the transition's transaction."""

    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=PaymentStatus.choices)
    to_state = models.CharField(max_length=16, choices=PaymentStatus.choices)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="payments_pt_account")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{ids.encode('pay', self.payment_id)}: {self.from_state} → {self.to_state}"


class GatewayCall(models.Model):
    """One call to the gateway about a payment or refund and what came back (the admin's view
    of a payment's attempts; nothing secret: no client secret, no card data)."""

    account_id = models.BigIntegerField()
    payment = models.ForeignKey(Payment, null=True, blank=True, on_delete=models.CASCADE, related_name="calls")
    refund = models.ForeignKey("Refund", null=True, blank=True, on_delete=models.CASCADE, related_name="calls")
    operation = models.CharField(max_length=32)  # charge, retrieve, list, refund, cancel
    outcome = models.CharField(max_length=32)  # succeeded, declined, unknown, unavailable …
    gateway_object_id = models.CharField(max_length=64, blank=True, default="")
    detail = models.CharField(max_length=300, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="payments_call_account")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.operation}: {self.outcome}"


class RefundStatus(models.TextChoices):
    PENDING = "pending", "Pending (not sent yet)"
    PROCESSING = "processing", "Sent to the gateway"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    UNKNOWN = "unknown", "Unknown (the reconciler asks the gateway)"


@tracked(account="account_id")
class Refund(AuditedTransitions, FSMModelMixin, models.Model):
    """Money given back on a payment: committed before the gateway call (intent first), with
    an idempotency key from its id; a credit note and a ledger entry when it succeeded.

    ``reason`` is the customer's: it is printed on the credit note and shown by the API.
    ``internal_note`` is finance's (a ticket number, what the customer said on the phone):
    shown in the admin only, never on a document or in the API.

    A state machine (``pending`` → ``processing`` → ``succeeded`` / ``failed`` / ``unknown``;
    ``unknown`` → ``succeeded`` / ``failed``) moved only through
    ``billing_site.common.transitions``, each move audited as a ``RefundTransition``."""

    TRANSITION_LOG = "refund.transition"

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="refunds")
    invoice_id = models.BigIntegerField()
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    reason = models.CharField(max_length=300, help_text="The customer's: on the credit note and in the API")
    internal_note = models.CharField(
        max_length=1000, blank=True, default="", help_text="Staff only: never on the credit note or in the API"
    )
    status = FSMField(default=RefundStatus.PENDING, choices=RefundStatus.choices, protected=True)
    idempotency_key = models.CharField(max_length=64, unique=True)
    gateway_refund_id = models.CharField(max_length=64, null=True, blank=True)
    credit_note_id = models.BigIntegerField(null=True, blank=True)
    failure_reason = models.CharField(max_length=300, blank=True, default="")
    requested_by = models.CharField(max_length=254)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="payments_refund_positive"),
            models.UniqueConstraint(
                fields=["payment", "gateway_refund_id"],
                condition=Q(gateway_refund_id__isnull=False),
                name="payments_refund_gateway_unique",
            ),
        ]
        indexes = [models.Index(fields=["account_id", "-created_at"], name="payments_refund_account")]

    def __str__(self) -> str:
        return f"{self.public_id} {money.display(self.amount_minor, self.currency)} {self.status}"

    @property
    def public_id(self) -> str:
        return ids.encode("ref", self.id)

    # --- Lifecycle: state only; ``payments.refunds`` locks, records the outcome and posts.

    @transition(field=status, source=RefundStatus.PENDING, target=RefundStatus.PROCESSING)
    def send(self) -> None:
        """The gateway call is going out."""

    @transition(field=status, source=[RefundStatus.PROCESSING, RefundStatus.UNKNOWN], target=RefundStatus.SUCCEEDED)
    def succeed(self) -> None:
        """The money went back to the card."""

    @transition(field=status, source=[RefundStatus.PROCESSING, RefundStatus.UNKNOWN], target=RefundStatus.FAILED)
    def fail(self) -> None:
        """Refused or declined by the gateway, or never sent."""

    @transition(field=status, source=RefundStatus.PROCESSING, target=RefundStatus.UNKNOWN)
    def lose_track(self) -> None:
        """The answer was lost: the reconciler asks the gateway."""

    def log_fields(self) -> dict[str, object]:
        return {
            "refund_id": self.public_id,
            "payment_id": ids.encode("pay", self.payment_id),
            "invoice_id": ids.encode("inv", self.invoice_id),
            "account_id": ids.encode("acc", self.account_id),
            "amount_minor": self.amount_minor,
            "currency": self.currency,
        }


class RefundTransition(StateChangeRecord):
    """Append-only audit of refund state changes, in the transition's transaction."""

    refund = models.ForeignKey(Refund, on_delete=models.PROTECT, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=RefundStatus.choices)
    to_state = models.CharField(max_length=16, choices=RefundStatus.choices)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="payments_rt_account")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{ids.encode('ref', self.refund_id)}: {self.from_state} → {self.to_state}"


class DisputeStatus(models.TextChoices):
    OPEN = "open", "Open"
    WON = "won", "Won"
    LOST = "lost", "Lost"


@tracked(account="account_id")
class Dispute(AuditedTransitions, FSMModelMixin, models.Model):
    """A chargeback on a payment: its funds are withdrawn while it is open; returned if won.

    A state machine (``open`` → ``won`` / ``lost``) moved only through
    ``billing_site.common.transitions``, each move audited as a ``DisputeTransition`` (its
    opening too, from no state)."""

    TRANSITION_LOG = "dispute.transition"

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="disputes")
    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    gateway_dispute_id = models.CharField(max_length=64)
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    reason = models.CharField(max_length=64)
    status = FSMField(default=DisputeStatus.OPEN, choices=DisputeStatus.choices, protected=True)
    opened_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["gateway", "gateway_dispute_id"], name="payments_dispute_unique"),
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="payments_dispute_positive"),
        ]
        indexes = [models.Index(fields=["account_id", "opened_at"], name="payments_dispute_account")]

    def __str__(self) -> str:
        return f"{self.public_id} {money.display(self.amount_minor, self.currency)} {self.status}"

    @property
    def public_id(self) -> str:
        return ids.encode("dsp", self.id)

    @transition(field=status, source=DisputeStatus.OPEN, target=DisputeStatus.WON)
    def win(self) -> None:
        """The bank decided for us: the funds come back."""

    @transition(field=status, source=DisputeStatus.OPEN, target=DisputeStatus.LOST)
    def lose(self) -> None:
        """The bank decided for the card holder: the funds are gone."""

    def log_fields(self) -> dict[str, object]:
        return {
            "dispute_id": self.public_id,
            "payment_id": ids.encode("pay", self.payment_id),
            "account_id": ids.encode("acc", self.account_id),
            "gateway_dispute_id": self.gateway_dispute_id,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
        }


class DisputeTransition(StateChangeRecord):
    """Append-only audit of dispute state changes (the opening: from ``""``)."""

    dispute = models.ForeignKey(Dispute, on_delete=models.PROTECT, related_name="transitions")
    from_state = models.CharField(max_length=8, blank=True, choices=DisputeStatus.choices)
    to_state = models.CharField(max_length=8, choices=DisputeStatus.choices)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="payments_dt_account")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{ids.encode('dsp', self.dispute_id)}: {self.from_state or '-'} → {self.to_state}"


class WebhookStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PROCESSED = "processed", "Processed"
    IGNORED = "ignored", "Ignored (type we do not handle)"
    FAILED = "failed", "Failed (see error; re-run from the admin)"


class WebhookEvent(models.Model):
    """An inbound gateway event, stored once (``(gateway, event_id)``) after its signature was
    verified, answered 200 at once, then processed by a task (idempotent, order-independent)."""

    gateway = models.CharField(max_length=16, choices=GatewayName.choices)
    event_id = models.CharField(max_length=100)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=WebhookStatus.choices, default=WebhookStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    account_id = models.BigIntegerField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["gateway", "event_id"], name="payments_webhook_once")]
        indexes = [models.Index(fields=["status", "received_at"], name="payments_webhook_status")]
        permissions = [("rerun_webhookevent", "Can re-run webhook events")]

    def __str__(self) -> str:
        return f"{self.gateway} {self.type} {self.event_id}"


@tracked(account=None)
class DunningPolicy(models.Model):
    """How debt is chased, as data finance edits (like Kill Bill's overdue configuration).

    The most specific active policy applies: one for the account's currency and kind, else its
    currency, else its kind, else the default (both empty)."""

    name = models.CharField(max_length=100)
    currency = models.CharField(max_length=3, blank=True, default="", help_text="Empty: any currency")
    account_kind = models.CharField(max_length=16, blank=True, default="", help_text="Empty: any kind")
    retry_days = ArrayField(
        models.PositiveSmallIntegerField(),
        default=list,
        blank=True,
        help_text="Days after the first failure to retry a retryable decline, e.g. 1,3,5",
    )
    email_on_failure = models.BooleanField(default=True)
    warn_days_before_suspension = models.PositiveSmallIntegerField(
        default=2, help_text="A warning this many days before suspension (0: none)"
    )
    suspend_after_days = models.PositiveSmallIntegerField(default=7, help_text="Days after the due date")
    write_off_after_days = models.PositiveSmallIntegerField(default=60, help_text="Days after the due date")
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "dunning policies"
        constraints = [
            models.UniqueConstraint(
                fields=["currency", "account_kind"], condition=Q(is_active=True), name="payments_dunning_policy_scope"
            ),
            models.CheckConstraint(
                condition=Q(write_off_after_days__gt=models.F("suspend_after_days")),
                name="payments_dunning_write_off_after_suspension",
            ),
            models.CheckConstraint(
                condition=Q(warn_days_before_suspension__lte=models.F("suspend_after_days")),
                name="payments_dunning_warning_after_due_date",
            ),
        ]

    def __str__(self) -> str:
        scope = " ".join(filter(None, [self.currency, self.account_kind])) or "default"
        return f"{self.name} ({scope})"

    def ladder_errors(self) -> dict[str, str]:
        """What is wrong with the ladder, by field (empty: nothing). The one statement of its
        rules: the admin's form and ``payments.services.dunning_policy_save`` ask it.

        - retries are days 1 or more after the first failure, increasing, each once, and all
          before the suspension (``suspend_after_days``; a failure is at the latest on the due
          date the suspension counts from, so every retry also comes before it);
        - the warning comes before the suspension and not before the due date
          (``warn_days_before_suspension`` at most ``suspend_after_days``);
        - the write-off comes after the suspension."""
        errors: dict[str, str] = {}
        days = list(self.retry_days or [])
        suspend, write_off, warn = self.suspend_after_days, self.write_off_after_days, self.warn_days_before_suspension
        if any(day < 1 for day in days):
            errors["retry_days"] = "Retries are 1 day or more after the first failure."
        elif days != sorted(set(days)):
            errors["retry_days"] = "List the days in increasing order, each once (e.g. 1,3,5)."
        elif days and suspend is not None and days[-1] >= suspend:
            errors["retry_days"] = (
                f"Every retry comes before the suspension (day {suspend} after the due date); day {days[-1]} does not."
            )
        if suspend is not None and write_off is not None and write_off <= suspend:
            errors["write_off_after_days"] = "The write-off comes after the suspension."
        if warn is not None and suspend is not None and warn > suspend:
            errors["warn_days_before_suspension"] = "The warning cannot come before the due date."
        return errors

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        errors = self.ladder_errors()
        if errors:
            raise ValidationError(errors)


class DunningCaseStatus(models.TextChoices):
    OPEN = "open", "Open (being chased)"
    RESOLVED = "resolved", "Resolved (paid or settled)"
    WRITTEN_OFF = "written_off", "Written off"


@tracked(account="account_id")
class DunningCase(AuditedTransitions, FSMModelMixin, models.Model):
    """An unpaid invoice being chased: opened by its first failed charge (or by being overdue),
    resolved when it is paid or settled, closed by a write-off.

    A state machine (``open`` → ``resolved`` / ``written_off``) moved only through
    ``billing_site.common.transitions``, each move audited as a ``DunningCaseTransition``."""

    TRANSITION_LOG = "dunning.case_transition"

    account_id = models.BigIntegerField()
    invoice_id = models.BigIntegerField(unique=True)
    currency = models.CharField(max_length=3)
    status = FSMField(default=DunningCaseStatus.OPEN, choices=DunningCaseStatus.choices, protected=True)
    first_failure_at = models.DateTimeField()
    due_at = models.DateTimeField()
    retries_done = models.PositiveSmallIntegerField(default=0)
    last_decline_code = models.CharField(max_length=64, blank=True, default="")
    retryable = models.BooleanField(default=True)
    suspended_account = models.BooleanField(default=False)
    opened_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "status"], name="payments_dunning_account"),
            models.Index(fields=["status", "due_at"], name="payments_dunning_status"),
        ]

    def __str__(self) -> str:
        return f"{ids.encode('inv', self.invoice_id)}: {self.status}"

    @transition(field=status, source=DunningCaseStatus.OPEN, target=DunningCaseStatus.RESOLVED)
    def resolve(self) -> None:
        """Paid or otherwise settled."""

    @transition(field=status, source=DunningCaseStatus.OPEN, target=DunningCaseStatus.WRITTEN_OFF)
    def write_off(self) -> None:
        """The invoice was written off (uncollectible)."""

    def log_fields(self) -> dict[str, object]:
        return {
            "case_id": self.id,
            "invoice_id": ids.encode("inv", self.invoice_id),
            "account_id": ids.encode("acc", self.account_id),
        }


class DunningCaseTransition(StateChangeRecord):
    """Append-only audit of dunning case state changes, in the transition's transaction."""

    case = models.ForeignKey(DunningCase, on_delete=models.PROTECT, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=DunningCaseStatus.choices)
    to_state = models.CharField(max_length=16, choices=DunningCaseStatus.choices)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="payments_dct_account")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{ids.encode('inv', self.case.invoice_id)}: {self.from_state} → {self.to_state}"


class DunningAction(models.Model):
    """What dunning did for a case, once each (``(case, action)`` is unique): ``retry:1``,
    ``email:failure:1``, ``email:warning``, ``suspend``, ``write_off``. Two runs at once, or
    the same day's run twice, insert the same keys: only one does the work."""

    case = models.ForeignKey(DunningCase, on_delete=models.CASCADE, related_name="actions")
    account_id = models.BigIntegerField()
    action = models.CharField(max_length=32)
    detail = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["case", "action"], name="payments_dunning_action_once")]
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.action


class SandboxObject(models.Model):
    """The sandbox gateway's own storage (what Stripe keeps on its side): customers, setup
    intents, payment methods, payment intents and refunds, by their gateway ids. Written by
    the sandbox gateway outside our transactions; the payments app never reads it directly."""

    object_id = models.CharField(max_length=64, primary_key=True)
    kind = models.CharField(max_length=16)
    customer_id = models.CharField(max_length=64, blank=True, default="")
    idempotency_key = models.CharField(max_length=100, null=True, blank=True, unique=True)
    data = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["customer_id", "kind", "created_at"], name="payments_sandbox_customer")]

    def __str__(self) -> str:
        return self.object_id
