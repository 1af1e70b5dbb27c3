"""Antifraud: the rules and their thresholds (as data, versioned), what each checkpoint saw
(identity and card signals kept here, so evaluation never reaches into another app or the
network) and what it decided (``RiskAssessment``), and each account's standing with the fraud
team (``AccountRisk``). Every table that grows carries ``account_id`` as its leading key."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from billing_site.common import ids
from billing_site.common.audit import tracked


class Checkpoint(models.TextChoices):
    SIGNUP = "signup", "Signup / account creation"
    CARD_BINDING = "card_binding", "Card binding"
    PAYMENT = "payment", "Payment outcome"
    USAGE = "usage", "Usage"
    LINKED = "linked", "A linked account was blocked"


class Decision(models.TextChoices):
    ALLOW = "allow", "Allow"
    REVIEW = "review", "Review"
    BLOCK = "block", "Block"


class RuleCode(models.TextChoices):
    DISPOSABLE_EMAIL = "disposable_email", "Disposable email domain"
    SIGNUP_VELOCITY = "signup_velocity", "Signup velocity (IP, /24, /64)"
    CARD_REUSE = "card_reuse", "Card fingerprint reuse"
    CARD_TESTING = "card_testing", "Card testing (failed bindings)"
    COUNTRY_MISMATCH = "country_mismatch", "Card, billing and IP country disagree"
    PREPAID_CARD = "prepaid_card", "Prepaid card on a new account"
    LINKED_ACCOUNTS = "linked_accounts", "Linked to a blocked account"
    PAYMENT_TROUBLE = "payment_trouble", "Repeated declines and disputes"
    SPEND_VELOCITY = "spend_velocity", "Spend velocity of a new account"


@tracked(account=None)
class RiskRule(models.Model):
    """One rule's switch, weight and thresholds, as the fraud team sets them. Any change
    makes a new rules version (``RiskSettings.version``)."""

    code = models.CharField(max_length=32, choices=RuleCode.choices, unique=True)
    enabled = models.BooleanField(default=True)
    weight = models.PositiveSmallIntegerField(help_text="Added to the score when the rule fires")
    params = models.JSONField(default=dict, blank=True, help_text="Thresholds and windows (see the rule)")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.get_code_display()


@tracked(account=None)
class RiskSettings(models.Model):
    """The score bands (like Radar's elevated and highest risk) and the rules version. One row."""

    review_score = models.PositiveSmallIntegerField(default=50, help_text="A score from here is reviewed")
    block_score = models.PositiveSmallIntegerField(default=90, help_text="A score from here is blocked")
    version = models.PositiveIntegerField(default=1)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "risk settings"
        constraints = [
            models.CheckConstraint(condition=models.Q(id=1), name="antifraud_settings_one_row"),
            models.CheckConstraint(
                condition=models.Q(block_score__gt=models.F("review_score")), name="antifraud_block_above_review"
            ),
        ]

    def __str__(self) -> str:
        return f"review from {self.review_score}, block from {self.block_score} (v{self.version})"


class RulesVersion(models.Model):
    """What the rules and bands were under each version: an assessment names its version, and
    this says what that meant. Also the audit of rule changes: who made the version, and what
    changed from the one before (``changes``: what → [before, after])."""

    version = models.PositiveIntegerField(unique=True)
    snapshot = models.JSONField()
    changes = models.JSONField(default=dict, blank=True, db_default={}, help_text="what → [before, after]")
    created_by = models.CharField(max_length=150, blank=True, default="")
    created_by_user_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"v{self.version}"


class DomainVerdict(models.TextChoices):
    DISPOSABLE = "disposable", "Disposable (flag it)"
    ALLOWED = "allowed", "Allowed (never flag it)"


@tracked(account=None)
class EmailDomain(models.Model):
    """Analysts' additions to, and exceptions from, the maintained disposable-domain list."""

    domain = models.CharField(max_length=253, unique=True)
    verdict = models.CharField(max_length=16, choices=DomainVerdict.choices)
    reason = models.CharField(max_length=300)
    created_by = models.CharField(max_length=150, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.domain}: {self.verdict}"


class SignupKind(models.TextChoices):
    USER = "user", "User"
    ACCOUNT = "account", "Billing account"


class SignupEvent(models.Model):
    """A user or billing account created from an IP address: what signup velocity counts."""

    kind = models.CharField(max_length=8, choices=SignupKind.choices)
    subject_id = models.BigIntegerField()
    ip = models.GenericIPAddressField()
    ip_prefix = models.CharField(max_length=64, help_text="The /24 (IPv4) or /64 (IPv6) network")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["ip", "created_at"], name="antifraud_signup_ip"),
            models.Index(fields=["ip_prefix", "created_at"], name="antifraud_signup_prefix"),
        ]
        constraints = [models.UniqueConstraint(fields=["kind", "subject_id"], name="antifraud_signup_once")]

    def __str__(self) -> str:
        return f"{self.kind} {self.subject_id} from {self.ip}"


class AccountSignal(models.Model):
    """An account's identity as antifraud links accounts by: normalised email, signup IP and
    its country, tax id, phone (E.164)."""

    account_id = models.BigIntegerField(primary_key=True)
    user_id = models.BigIntegerField(null=True, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    ip_prefix = models.CharField(max_length=64, blank=True, default="", help_text="The IP's /24 or /64")
    ip_country = models.CharField(max_length=2, blank=True, default="")
    email_normalised = models.CharField(max_length=254, blank=True, default="")
    email_domain = models.CharField(max_length=253, blank=True, default="")
    tax_id = models.CharField(max_length=32, blank=True, default="")
    phone = models.CharField(max_length=20, blank=True, default="", db_default="")
    country = models.CharField(max_length=2, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["email_normalised"], name="antifraud_signal_email"),
            models.Index(fields=["ip"], name="antifraud_signal_ip"),
            models.Index(fields=["tax_id"], name="antifraud_signal_tax_id_set", condition=~models.Q(tax_id="")),
            models.Index(fields=["phone"], name="antifraud_signal_phone", condition=~models.Q(phone="")),
            models.Index(fields=["created_at"], name="antifraud_signal_created"),
        ]

    def __str__(self) -> str:
        return f"{self.account_id}: {self.email_normalised} from {self.ip}"


class CardSeen(models.Model):
    """A card (by the gateway's fingerprint) bound to an account."""

    account_id = models.BigIntegerField()
    fingerprint = models.CharField(max_length=64)
    brand = models.CharField(max_length=16, blank=True, default="")
    last4 = models.CharField(max_length=4, blank=True, default="")
    country = models.CharField(max_length=2, blank=True, default="")
    funding = models.CharField(max_length=16, blank=True, default="")
    first_seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account_id", "fingerprint"], name="antifraud_card_once_per_account")
        ]
        indexes = [models.Index(fields=["fingerprint"], name="antifraud_card_fingerprint")]

    def __str__(self) -> str:
        return f"{self.brand} {self.last4} on {self.account_id}"


class BindingFailure(models.Model):
    """A declined card binding: what card testing counts, by account, user and IP."""

    account_id = models.BigIntegerField()
    user_id = models.BigIntegerField(null=True, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    code = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "created_at"], name="antifraud_failure_account"),
            models.Index(fields=["user_id", "created_at"], name="antifraud_failure_user"),
            models.Index(fields=["ip", "created_at"], name="antifraud_failure_ip"),
        ]

    def __str__(self) -> str:
        return f"{self.code} on {self.account_id}"


class OutcomeKind(models.TextChoices):
    DECLINE = "decline", "Charge declined"
    DISPUTE = "dispute", "Dispute opened"
    REFUND = "refund", "Refund"


class PaymentOutcome(models.Model):
    """A payment outcome payments reported (checkpoint 3): what repeated declines and disputes
    count."""

    account_id = models.BigIntegerField()
    kind = models.CharField(max_length=8, choices=OutcomeKind.choices)
    reference = models.CharField(max_length=32, help_text="The payment, dispute or refund id")
    code = models.CharField(max_length=64, blank=True, default="")
    amount_minor = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account_id", "kind", "created_at"], name="antifraud_outcome_account")]
        constraints = [models.UniqueConstraint(fields=["kind", "reference"], name="antifraud_outcome_once")]

    def __str__(self) -> str:
        return f"{self.kind} {self.reference}"


class RiskAssessment(models.Model):
    """What one checkpoint decided for one account, and why: the rules that fired with their
    evidence, under which rules version."""

    account_id = models.BigIntegerField()
    checkpoint = models.CharField(max_length=16, choices=Checkpoint.choices)
    score = models.PositiveIntegerField()
    decision = models.CharField(max_length=8, choices=Decision.choices)
    fired = models.JSONField(default=list, help_text="[{rule, weight, evidence}]")
    skipped = models.JSONField(
        default=list, db_default=[], help_text="[{rule, error}]: rules that could not be evaluated, left out"
    )
    rules_version = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "created_at"], name="antifraud_assessment_account"),
            models.Index(fields=["decision", "created_at"], name="antifraud_assessment_decision"),
        ]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)} {self.get_checkpoint_display()}: {self.decision} ({self.score})"


class RiskStatus(models.TextChoices):
    CLEAR = "clear", "Clear"
    REVIEW = "review", "In review"
    BLOCKED = "blocked", "Blocked"
    APPROVED = "approved", "Approved by an analyst"


@tracked(account="account_id")
class AccountRisk(models.Model):
    """Where an account stands with the fraud team: the review queue is the rows ``review``."""

    account_id = models.BigIntegerField(primary_key=True)
    status = models.CharField(max_length=16, choices=RiskStatus.choices, default=RiskStatus.CLEAR)
    score = models.PositiveIntegerField(default=0)
    last_assessment = models.ForeignKey(RiskAssessment, null=True, blank=True, on_delete=models.SET_NULL)
    flagged_at = models.DateTimeField(null=True, blank=True)
    limit_raised_at_count = models.PositiveIntegerField(
        default=0, db_default=0, help_text="The count of on-time payments at which the credit limit was last raised"
    )
    # An active account raised for review spends under a cap until an analyst decides: its
    # credit limit lowered to ``spending_cap`` (threshold billing then bounds it), the limit
    # it had kept here and given back on approval.
    spending_cap = models.DecimalField(max_digits=18, decimal_places=4, null=True, blank=True)
    capped_from = models.DecimalField(
        max_digits=18, decimal_places=4, null=True, blank=True, help_text="The credit limit before the review cap"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "account risk"
        indexes = [models.Index(fields=["status", "score"], name="antifraud_risk_queue")]
        permissions = [("review_account", "Can approve, block or question accounts in review")]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)}: {self.get_status_display()}"


class ReviewAction(models.TextChoices):
    APPROVE = "approve", "Approve"
    BLOCK = "block", "Block"
    REQUEST_INFO = "request_info", "Request more information"


class ReviewDecision(models.Model):
    """An analyst's decision on an account in review: the audit of the review queue."""

    account_id = models.BigIntegerField()
    action = models.CharField(max_length=16, choices=ReviewAction.choices)
    reason = models.TextField()
    assessment = models.ForeignKey(RiskAssessment, null=True, blank=True, on_delete=models.SET_NULL)
    analyst_user_id = models.BigIntegerField(null=True, blank=True)
    analyst_name = models.CharField(max_length=254)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "created_at"], name="antifraud_review_account"),
            models.Index(fields=["created_at"], name="antifraud_review_day"),
        ]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} by {self.analyst_name}"


@tracked(account=None)
class CreditLimitPolicy(models.Model):
    """New accounts' credit limit, and how it grows, as data: the most specific active policy
    for the account's currency applies (its kind and country, its country, its kind, else any).
    Amounts in the currency."""

    name = models.CharField(max_length=100)
    currency = models.CharField(max_length=3)
    account_kind = models.CharField(max_length=16, blank=True, default="", help_text="Empty: any kind")
    country = models.CharField(max_length=2, blank=True, default="", help_text="Empty: any country")
    initial_limit = models.DecimalField(max_digits=18, decimal_places=4)
    raise_after_on_time_payments = models.PositiveSmallIntegerField(
        default=3, help_text="Raise the limit after every this many invoices paid on time (0: never)"
    )
    raise_percent = models.DecimalField(max_digits=6, decimal_places=2, default=50)
    max_limit = models.DecimalField(max_digits=18, decimal_places=4)
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "credit limit policies"
        constraints = [
            models.UniqueConstraint(
                fields=["currency", "account_kind", "country"],
                condition=models.Q(is_active=True),
                name="antifraud_credit_policy_scope",
            ),
            models.CheckConstraint(
                condition=models.Q(max_limit__gte=models.F("initial_limit"), initial_limit__gt=0),
                name="antifraud_credit_policy_amounts",
            ),
        ]

    def __str__(self) -> str:
        scope = " ".join(filter(None, [self.currency, self.account_kind, self.country]))
        return f"{self.name} ({scope})"
