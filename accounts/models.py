"""Users, billing accounts and their lifecycle, members, API keys, and the transition audit.

Primary keys of rows the outside world can name are random 63-bit integers
(``billing_site.common.ids``); the API shows them as ``usr_…``, ``acc_…``, ``key_…``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import OpClass
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django_countries.fields import CountryField
from django_fsm import RETURN_VALUE, FSMField, FSMModelMixin, transition

from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.audit import tracked


class AccountState(models.TextChoices):
    PENDING = "pending", "Pending"
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"  # why: ``BillingAccount.state_cause``
    BLOCKED = "blocked", "Blocked"
    CLOSED = "closed", "Closed"


class TransitionCause(models.TextChoices):
    """Why an account moved, recorded with the transition: what staff and customers read of a
    state comes from it (never from the state alone: a suspension is not always a debt)."""

    DEBT = "debt", "unpaid debt"
    DEBT_SETTLED = "debt_settled", "debt settled"
    FRAUD = "fraud", "fraud review"
    STAFF = "staff", "by staff"
    CUSTOMER = "customer", "by the customer"
    SYSTEM = "system", "automatic"  # e.g. activated when the first card was bound


class AccountKind(models.TextChoices):
    INDIVIDUAL = "individual", "Individual"
    BUSINESS = "business", "Business"


class MemberRole(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    VIEWER = "viewer", "Viewer"


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        user = self.model(email=normalize_email(email), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self.create_user(email, password, **extra)

    def get_by_natural_key(self, username: str | None) -> User:
        return self.get(email=normalize_email(username or ""))


def normalize_email(email: str) -> str:
    """Emails are unique case-insensitively: we store them lowercased."""
    return email.strip().lower()


class User(AbstractBaseUser, PermissionsMixin):
    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    email = models.EmailField(max_length=254, unique=True)
    is_staff = models.BooleanField(default=False, help_text="Operators (staff) can use the admin.")
    is_active = models.BooleanField(default=True)
    date_joined = models.DateTimeField(default=timezone.now)

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    objects = UserManager()

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(email=Lower("email")), name="accounts_user_email_lowercase"),
        ]

    def __str__(self) -> str:
        return self.email

    @property
    def public_id(self) -> str:
        return ids.encode("usr", self.id)


@tracked(account="id")
class BillingAccount(FSMModelMixin, models.Model):
    """Who pays. ``state`` moves only through the transitions below (``protected=True``),
    driven by ``accounts.services.billing_account_transition`` through the one transition
    helper (``billing_site.common.transitions``: locked, re-checked, audited, logged)."""

    TRANSITION_LOG = "account.transition"

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    name = models.CharField(max_length=200)
    email = models.EmailField(max_length=254, help_text="Where invoices and notices go.")
    kind = models.CharField(max_length=16, choices=AccountKind.choices)
    country = CountryField()
    currency = models.CharField(max_length=3, help_text="ISO 4217; fixed once the account exists.")
    tax_id = models.CharField(max_length=32, blank=True, default="", help_text="Compact form, e.g. NL004495445B01.")
    phone = models.CharField(
        max_length=20, blank=True, default="", db_default="", help_text="E.164, e.g. +31201234567."
    )
    address_line1 = models.CharField(max_length=200)
    address_line2 = models.CharField(max_length=200, blank=True, default="")
    address_city = models.CharField(max_length=100)
    address_postal_code = models.CharField(max_length=32)
    address_region = models.CharField(max_length=100, blank=True, default="")
    state = FSMField(default=AccountState.PENDING, choices=AccountState.choices, protected=True, db_index=True)
    # Why the account is in its state: the cause of its last transition ("" before any).
    state_cause = models.CharField(
        max_length=16, choices=TransitionCause.choices, blank=True, default="", db_default=""
    )
    # Decimal with 4 places, in the account's currency. Set by operators only.
    credit_limit = models.DecimalField(max_digits=18, decimal_places=4, default=0)
    payment_terms_days = models.PositiveSmallIntegerField(
        default=14, help_text="Invoices are due this many days after they are issued."
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        permissions = [
            ("transition_billingaccount", "Can activate, suspend, reactivate and close billing accounts"),
            ("block_billingaccount", "Can block and unblock billing accounts"),
            ("set_credit_limit_billingaccount", "Can set billing accounts' credit limits"),
            (
                "change_tax_profile_billingaccount",
                "Can change billing accounts' tax and invoicing details (kind, country, tax id, address, email)",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(credit_limit__gte=0), name="accounts_ba_credit_limit_not_negative"
            ),
        ]
        indexes = [
            models.Index(fields=["country", "kind"], name="accounts_ba_country_kind"),
            # The back office's search: an email or a name by its beginning, any case; a tax id
            # exactly (LIKE 'x%' on lower(...) with text_pattern_ops, whatever the collation).
            models.Index(OpClass(Lower("email"), name="text_pattern_ops"), name="accounts_ba_email_lower"),
            models.Index(OpClass(Lower("name"), name="text_pattern_ops"), name="accounts_ba_name_lower"),
            models.Index(fields=["tax_id"], name="accounts_ba_tax_id", condition=~models.Q(tax_id="")),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_id})"

    @property
    def public_id(self) -> str:
        return ids.encode("acc", self.id)

    def state_shown(self, *, reason: str = "") -> str:
        """The state as staff read it, with why: "Suspended (unpaid debt)", "Suspended (by
        staff: leaked credential)" (``reason``: the transition's, for a staff decision)."""
        label = str(self.get_state_display())
        if self.state not in (AccountState.SUSPENDED, AccountState.BLOCKED) or not self.state_cause:
            return label
        cause = str(TransitionCause(self.state_cause).label)
        if self.state_cause == TransitionCause.STAFF and reason:
            cause = f"{cause}: {reason}"
        return f"{label} ({cause})"

    # --- For the transition helper: the audit row and the log line's ids (no personal data).

    def audit_record(
        self, *, transition: str, from_state: str, actor: Actor, reason: str, to_state: str | None = None
    ) -> BillingAccountTransition:
        return BillingAccountTransition(
            account=self,
            transition=transition,
            from_state=from_state,
            to_state=to_state or self.state,
            actor_kind=actor.kind.value,
            actor_user_id=actor.user_id,
            actor_name=actor.name,
            reason=reason,
            cause=self.state_cause,  # set by the service with the transition
        )

    def log_fields(self) -> dict[str, object]:
        return {"account_id": self.public_id, "cause": self.state_cause}

    # --- Lifecycle. Transitions change the state only; services do the rest.

    @transition(field=state, source=AccountState.PENDING, target=AccountState.ACTIVE)
    def activate(self) -> None:
        """Allow the account to consume."""

    @transition(field=state, source=AccountState.ACTIVE, target=AccountState.SUSPENDED)
    def suspend(self) -> None:
        """Stop consumption for unpaid debt."""

    @transition(field=state, source=AccountState.SUSPENDED, target=AccountState.ACTIVE)
    def reactivate(self) -> None:
        """Debt settled: consume again."""

    @transition(
        field=state,
        source=[AccountState.PENDING, AccountState.ACTIVE, AccountState.SUSPENDED],
        target=AccountState.BLOCKED,
    )
    def block(self) -> None:
        """Fraud or an operator's decision."""

    @transition(
        field=state,
        source=AccountState.BLOCKED,
        target=RETURN_VALUE(AccountState.ACTIVE, AccountState.PENDING),
    )
    def unblock(self, to_state: str) -> str:
        """Operator only: back to ``active`` or ``pending``."""
        return to_state

    @transition(
        field=state,
        source=[AccountState.PENDING, AccountState.ACTIVE, AccountState.SUSPENDED],
        target=AccountState.CLOSED,
    )
    def close(self) -> None:
        """Terminal."""


@tracked(account="account_id")
class Membership(models.Model):
    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=MemberRole.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "user"], name="accounts_membership_unique"),
            models.UniqueConstraint(
                fields=["account"], condition=models.Q(role=MemberRole.OWNER), name="accounts_membership_one_owner"
            ),
        ]
        indexes = [models.Index(fields=["user", "account"], name="accounts_membership_user")]

    def __str__(self) -> str:
        # Names both sides (select_related("user", "account") where many are shown).
        return f"{self.user.email}: {self.get_role_display().lower()} of {self.account.name} ({self.account.public_id})"


class BillingAccountTransition(models.Model):
    """Append-only audit of every lifecycle transition, written in the transition's transaction."""

    account = models.ForeignKey(BillingAccount, on_delete=models.PROTECT, related_name="transitions")
    transition = models.CharField(max_length=32)
    from_state = models.CharField(max_length=16, choices=AccountState.choices)
    to_state = models.CharField(max_length=16, choices=AccountState.choices)
    actor_kind = models.CharField(
        max_length=16, choices=[("user", "User"), ("operator", "Operator"), ("system", "System")]
    )
    actor_user = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_name = models.CharField(max_length=254, help_text="Email of the user or operator, or the system component.")
    reason = models.TextField(blank=True, default="")
    cause = models.CharField(max_length=16, choices=TransitionCause.choices, blank=True, default="", db_default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account", "created_at"], name="accounts_bat_account_time")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)}: {self.transition} ({self.from_state} → {self.to_state})"


class BillingAccountProfileChange(models.Model):
    """Append-only audit of every change of an account's profile (and credit limit): who, when,
    and each changed field before and after, written in the change's transaction."""

    account = models.ForeignKey(BillingAccount, on_delete=models.PROTECT, related_name="profile_changes")
    actor_kind = models.CharField(
        max_length=16, choices=[("user", "User"), ("operator", "Operator"), ("system", "System")]
    )
    actor_user = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_name = models.CharField(max_length=254, help_text="Email of the user or operator, or the system component.")
    # {field: {"before": value, "after": value}}, values as stored (country codes, decimals as strings).
    changes = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account", "created_at"], name="accounts_bapc_account_time")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)}: {', '.join(self.changes)}"


@tracked(account=None, exclude=("secret_hash", "last_used_at"))
class ApiKey(models.Model):
    """A bearer key. Stored as a public lookup ``prefix`` and the SHA-256 of the whole key:
    the secret is 256 random bits, so a fast hash is enough and the key is never recoverable.

    User keys act as their user (no scopes). Service keys (``user`` empty) are created by
    operators for internal producers and carry ``scopes`` such as ``usage:write``.
    """

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    user = models.ForeignKey(User, null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    scopes = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    created_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        indexes = [models.Index(fields=["user", "created_at"], name="accounts_apikey_user")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, scopes=[]) | models.Q(user__isnull=True),
                name="accounts_apikey_scopes_only_on_service_keys",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def public_id(self) -> str:
        return ids.encode("key", self.id)

    @property
    def is_service(self) -> bool:
        return self.user_id is None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class Scope(models.TextChoices):
    """What a service key may do. User keys carry no scopes: they act as their user."""

    USAGE_WRITE = "usage:write", "Send usage and resource events"
    ACCOUNTS_READ = "accounts:read", "Read any billing account and its costs"


class AccountNote(models.Model):
    """A staff note on a customer (what support, finance or fraud want the next colleague to
    know). Append-only: a note is never edited or deleted, a correction is a new note."""

    account = models.ForeignKey(BillingAccount, on_delete=models.PROTECT, related_name="notes")
    author = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    author_name = models.CharField(max_length=254, help_text="The operator's email when the note was written.")
    text = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account", "-created_at"], name="accounts_note_account_time")]
        ordering = ["-created_at", "-id"]
        constraints = [models.CheckConstraint(condition=~models.Q(text=""), name="accounts_note_text_not_empty")]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)}: note by {self.author_name}"
