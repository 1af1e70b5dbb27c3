"""Every write of the accounts app. Keyword-only, one durable transaction per entry point."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts import debts, keys, validation
from accounts.models import (
    AccountNote,
    AccountState,
    ApiKey,
    BillingAccount,
    BillingAccountProfileChange,
    BillingAccountTransition,
    MemberRole,
    Membership,
    Scope,
    TransitionCause,
    User,
    normalize_email,
)
from billing_site.common import ids, money, transitions
from billing_site.common.actors import Actor, ActorKind
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.logs import mask_email
from billing_site.outbox import services as outbox

log = logging.getLogger(__name__)

TRANSITIONS = ("activate", "suspend", "reactivate", "block", "unblock", "close")
REASON_REQUIRED = frozenset({"suspend", "block", "unblock", "close"})
OPERATOR_ONLY = frozenset({"unblock"})
# Which permission staff need for each transition (the admin and the back office ask it).
TRANSITION_PERMISSIONS = {
    "activate": "accounts.transition_billingaccount",
    "suspend": "accounts.transition_billingaccount",
    "reactivate": "accounts.transition_billingaccount",
    "close": "accounts.transition_billingaccount",
    "block": "accounts.block_billingaccount",
    "unblock": "accounts.block_billingaccount",
}
# Why a transition happened when its caller does not say: a person's is theirs (the customer's,
# staff's); our components' always mean the same (payments suspends for an unpaid debt and
# reactivates when it is settled, antifraud blocks for fraud). Callers may pass ``cause``.
SYSTEM_CAUSES = {
    "activate": TransitionCause.SYSTEM,
    "suspend": TransitionCause.DEBT,
    "reactivate": TransitionCause.DEBT_SETTLED,
    "block": TransitionCause.FRAUD,
    "unblock": TransitionCause.FRAUD,
    "close": TransitionCause.SYSTEM,
}

PROFILE_FIELDS = (
    "name",
    "email",
    "kind",
    "country",
    "tax_id",
    "phone",
    "address_line1",
    "address_line2",
    "address_city",
    "address_postal_code",
    "address_region",
)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: ApiKey
    raw: str  # the only time the secret exists outside the caller's hands


# --- Users and keys


@transaction.atomic(durable=True)
def user_signup(*, email: str, password: str) -> tuple[User, IssuedKey]:
    email = normalize_email(email)
    user = User(email=email)
    try:
        validate_password(password, user=user)
    except DjangoValidationError as exc:
        raise ApplicationError(
            "invalid",
            "The password is not acceptable.",
            errors=[{"field": "password", "code": "weak_password", "message": m} for m in exc.messages],
        ) from exc
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save(force_insert=True)
    except IntegrityError as exc:  # the unique constraint decides, not a look-up first
        raise Conflict("email_taken", "A user with this email already exists.", field="email") from exc
    issued = _key_insert(user_id=user.id, name="default", scopes=[], created_by_id=None)
    log.info("user.signup", extra={"user_id": user.public_id, "email": mask_email(email)})
    return user, issued


@transaction.atomic(durable=True)
def api_key_create(*, user_id: int, name: str) -> IssuedKey:
    return _key_insert(user_id=user_id, name=name, scopes=[], created_by_id=None)


@transaction.atomic(durable=True)
def service_key_create(*, name: str, scopes: list[str], created_by_id: int | None) -> IssuedKey:
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown or not scopes:
        raise ApplicationError(
            "invalid_scope",
            f"Unknown scopes {unknown}; known: {', '.join(Scope.values)}."
            if unknown
            else "A service key needs a scope.",
            field="scopes",
        )
    return _key_insert(user_id=None, name=name, scopes=sorted(set(scopes)), created_by_id=created_by_id)


def _key_insert(*, user_id: int | None, name: str, scopes: list[str], created_by_id: int | None) -> IssuedKey:
    material = keys.generate(service=user_id is None)
    key = ApiKey.objects.create(
        user_id=user_id,
        name=name,
        prefix=material.prefix,
        secret_hash=material.secret_hash,
        scopes=scopes,
        created_by_id=created_by_id,
    )
    # The key's public id only: never the raw key, its prefix or its hash.
    log.info(
        "api_key.create",
        extra={
            "key_id": key.public_id,
            "kind": "service" if user_id is None else "user",
            "user_id": ids.encode("usr", user_id) if user_id is not None else None,
            "scopes": scopes,
            "created_by": ids.encode("usr", created_by_id) if created_by_id is not None else None,
        },
    )
    return IssuedKey(key=key, raw=material.raw)


@transaction.atomic(durable=True)
def api_key_revoke(*, key_id: int, user_id: int | None) -> ApiKey:
    """Revoke a key. ``user_id`` scopes the look-up to that user's keys (None: operator)."""
    queryset = ApiKey.objects.select_for_update()
    if user_id is not None:
        queryset = queryset.filter(user_id=user_id)
    key = queryset.filter(id=key_id).first()
    if key is None:
        raise NotFound("No such API key.")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        log.info(
            "api_key.revoke",
            extra={"key_id": key.public_id, "by": "owner" if user_id is not None else "operator"},
        )
    return key


def api_key_touch(*, key: ApiKey, interval_seconds: int) -> None:
    """Record use at most once per interval: one conditional UPDATE, no lock, no read."""
    now = timezone.now()
    if key.last_used_at is not None and (now - key.last_used_at).total_seconds() < interval_seconds:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - timedelta(seconds=interval_seconds))
    ApiKey.objects.filter(Q(id=key.id) & stale).update(last_used_at=now)


# --- Billing accounts


@transaction.atomic(durable=True)
def billing_account_create(*, owner_id: int, profile: dict[str, Any], currency: str) -> BillingAccount:
    unknown = set(profile) - set(PROFILE_FIELDS)
    if unknown:
        raise ApplicationError("invalid", f"Not profile fields: {', '.join(sorted(unknown))}.")
    account = BillingAccount(currency=currency, **profile)
    account.save(force_insert=True)
    Membership.objects.create(account=account, user_id=owner_id, role=MemberRole.OWNER)
    log.info(
        "account.create",
        extra={
            "account_id": account.public_id,
            "owner_id": ids.encode("usr", owner_id),
            "currency": currency,
            "state": account.state,
        },
    )
    return account


# The fields that decide an invoice's tax and where it goes: in the admin, finance's only
# (``accounts.change_tax_profile_billingaccount``); customers keep changing their own.
TAX_PROFILE_FIELDS = (
    "kind",
    "country",
    "tax_id",
    "email",
    "address_line1",
    "address_line2",
    "address_city",
    "address_postal_code",
    "address_region",
)
UPDATE_ACTOR = Actor.system("accounts")  # a caller that does not say who it acts for


@audited
@transaction.atomic(durable=True)
def billing_account_update(
    *,
    account_id: int,
    changes: dict[str, Any],
    credit_limit: Decimal | None = None,
    credit_limit_was: Decimal | None = None,
    actor: Actor | None = None,
) -> BillingAccount:
    """Update profile fields (and, for operators and antifraud's policy, the credit limit).
    Never the state. With ``credit_limit_was`` the limit changes only if it still is that
    (checked under the row lock: a policy never overwrites a limit an analyst set meanwhile).
    What changed is audited (``BillingAccountProfileChange``: each field before and after,
    and ``actor``) in the same transaction; who may change which field is the caller's check
    (the admin: ``TAX_PROFILE_FIELDS`` are finance's)."""
    unknown = set(changes) - set(PROFILE_FIELDS)
    if unknown:
        raise ApplicationError("invalid", f"Not profile fields: {', '.join(sorted(unknown))}.")
    account = BillingAccount.objects.select_for_update().filter(id=account_id).first()
    if account is None:
        raise NotFound("No such billing account.")
    if account.state == AccountState.CLOSED:
        raise Conflict("account_closed", "A closed billing account cannot be changed.")
    before = {field: _audited(getattr(account, field)) for field in (*PROFILE_FIELDS, "credit_limit")}
    for field, value in changes.items():
        setattr(account, field, value)
    if account.tax_id and ("tax_id" in changes or "country" in changes):
        # Re-checked under the row lock: two PATCHes (one country, one tax id) that each
        # passed validation alone must not combine into a mismatched pair.
        try:
            changes["tax_id"] = account.tax_id = validation.normalize_tax_id(account.country.code, account.tax_id)
        except ValueError as exc:
            raise ApplicationError("invalid_tax_id", str(exc), field="tax_id") from exc
    fields = [*changes, "updated_at"]
    if credit_limit is not None and credit_limit_was is not None and account.credit_limit != credit_limit_was:
        credit_limit = None  # changed meanwhile: left as it is
    if credit_limit is not None:
        if credit_limit < 0:
            raise ApplicationError("invalid", "A credit limit cannot be negative.", field="credit_limit")
        account.credit_limit = credit_limit
        fields.append("credit_limit")
    account.save(update_fields=fields)
    after = {field: _audited(getattr(account, field)) for field in before}
    changed = {f: {"before": before[f], "after": after[f]} for f in before if before[f] != after[f]}
    if changed:
        actor = actor or UPDATE_ACTOR
        BillingAccountProfileChange.objects.create(
            account=account,
            actor_kind=actor.kind.value,
            actor_user_id=actor.user_id,
            actor_name=actor.name,
            changes=changed,
        )
    # Which fields changed, not their values (they hold emails, addresses, tax ids).
    log.info(
        "account.update",
        extra={
            "account_id": account.public_id,
            "fields": sorted(changed),
            **transitions.actor_log_fields(actor or UPDATE_ACTOR),
        },
    )
    return account


def _audited(value: Any) -> str:
    """A field's value as the audit keeps it: country codes, decimals and text as strings."""
    return str(value) if value is not None else ""


@transaction.atomic(durable=True)
def billing_account_transition(
    *,
    account_id: int,
    transition: str,
    actor: Actor,
    reason: str = "",
    to_state: str | None = None,
    override_debt: bool = False,
    cause: str = "",
) -> BillingAccount:
    """Move an account through its lifecycle, under a row lock with the state re-checked,
    writing the audit row in the same transaction. A transition that is not allowed from
    the state found under the lock (e.g. the loser of two concurrent ones) → 409.

    What the account owes (``debts``) is asked under the lock: an account that owes money is
    never closed (409 ``outstanding_balance``), and staff reactivate one only with
    ``override_debt`` and a reason (the audit row says it was an override and how much was
    owed). A staff reactivation is announced to ``ACCOUNTS_REACTIVATED_BY_STAFF_TASKS``
    (payments' dunning notes it on the cases that had suspended the account).

    ``cause`` (a ``TransitionCause``; by default the actor's, see ``SYSTEM_CAUSES``) is kept
    on the audit row and the account (``state_cause``): the admin's state label and what the
    customer reads come from it. Settling a debt lifts only a suspension for debt."""
    if transition not in TRANSITIONS:
        raise ApplicationError("invalid", f"Unknown transition '{transition}'.", field="transition")
    reason = reason.strip()
    if transition in REASON_REQUIRED and not reason:
        raise ApplicationError("reason_required", f"A reason is required to {transition} an account.", field="reason")
    if transition in OPERATOR_ONLY and actor.kind != ActorKind.OPERATOR:
        raise ApplicationError("operator_only", f"Only an operator can {transition} an account.", status=403)
    if transition == "unblock" and to_state not in (AccountState.ACTIVE, AccountState.PENDING):
        raise ApplicationError("invalid", "Unblock to 'active' or 'pending'.", field="to_state")
    cause = _cause_of(transition, actor, cause)

    account = transitions.locked(BillingAccount, account_id, message="No such billing account.")
    if transition == "close":
        owed = debts.billing_account_debt(account_id=account.id)
        if owed:
            raise outstanding_balance(
                owed, f"{account.name} cannot be closed while it owes money: pay, credit or write off the debt first."
            )
    if (
        cause == TransitionCause.DEBT_SETTLED
        and account.state == AccountState.SUSPENDED
        and account.state_cause not in ("", TransitionCause.DEBT)
    ):
        raise Conflict(
            "invalid_transition",
            f"{account.name} is suspended {TransitionCause(account.state_cause).label}, not for a debt: "
            "settling a debt does not reactivate it.",
        )
    staff_reactivation = transition == "reactivate" and actor.kind == ActorKind.OPERATOR
    if staff_reactivation and account.state == AccountState.SUSPENDED:
        owed = debts.billing_account_debt(account_id=account.id)
        if owed and not override_debt:
            raise outstanding_balance(
                owed,
                f"{account.name} still owes money: reactivating it anyway needs an explicit override with a reason.",
            )
        if owed:
            if not reason:
                raise ApplicationError(
                    "reason_required", "A reason is required to reactivate an account that owes money.", field="reason"
                )
            reason = f"{reason} (override: {debts.debt_display(owed)} still owed)"

    # The state, the cause with it, the audit row (``BillingAccount.audit_record``), one log line.
    account.state_cause = cause
    transitions.transition(
        account,
        transition,
        actor=actor,
        reason=reason,
        args=(to_state,) if transition == "unblock" else (),
        update_fields=["state_cause"],
    )
    # The side effects the transition owes, in its transaction (the outbox delivers after commit).
    entry_id = BillingAccountTransition.objects.filter(account=account).latest("id").id  # ours: the row is locked
    if staff_reactivation:
        for task in settings.ACCOUNTS_REACTIVATED_BY_STAFF_TASKS:  # by name: accounts imports no other app
            outbox.enqueue_task(task, account_id=account.id, reason=reason, dedupe_key=f"{task}:{entry_id}")
    if transition in ("block", "unblock"):
        # Antifraud keeps its own record of blocks and reviews the accounts linked to a blocked
        # one (by task name, through the outbox: accounts imports no other app, and the
        # transition's commit carries the message).
        outbox.enqueue_task(
            f"antifraud.account_{transition}ed", account_id=account.id, dedupe_key=f"{transition}:{entry_id}"
        )
    return account


def _cause_of(transition: str, actor: Actor, cause: str) -> str:
    if cause:
        if cause not in TransitionCause.values:
            raise ApplicationError(
                "invalid", f"Unknown cause '{cause}'; known: {', '.join(TransitionCause.values)}.", field="cause"
            )
        return cause
    if actor.kind == ActorKind.USER:
        return TransitionCause.CUSTOMER
    if actor.kind == ActorKind.OPERATOR:
        return TransitionCause.STAFF
    return SYSTEM_CAUSES[transition]


def outstanding_balance(owed: dict[str, int], advice: str) -> ApplicationError:
    """409 ``outstanding_balance``: what is owed, per currency, as money strings (in the
    message and one entry of ``errors`` per currency, with ``currency`` and ``amount``)."""
    return ApplicationError(
        "outstanding_balance",
        f"{debts.debt_display(owed)} outstanding. {advice}",
        status=409,
        errors=[
            {
                "field": f"outstanding.{currency}",
                "code": "outstanding_balance",
                "message": f"{money.format_minor(minor, currency)} {currency} outstanding.",
                "currency": currency,
                "amount": money.format_minor(minor, currency),
            }
            for currency, minor in owed.items()
        ],
    )


# --- Staff notes


@audited
@transaction.atomic(durable=True)
def account_note_add(*, account_id: int, text: str, actor: Actor) -> AccountNote:
    """A staff note on a customer: added, never edited (a correction is a new note). Empty
    text → 400 ``invalid``; an unknown account → 404."""
    text = text.strip()
    if not text:
        raise ApplicationError("invalid", "A note needs some text.", field="text")
    if not BillingAccount.objects.filter(id=account_id).exists():
        raise NotFound("No such billing account.")
    note = AccountNote.objects.create(account_id=account_id, author_id=actor.user_id, author_name=actor.name, text=text)
    log.info(
        "account.note_added",
        extra={"account_id": ids.encode("acc", account_id), "note_id": note.id, "actor_kind": actor.kind.value},
    )
    return note


# --- Members


@transaction.atomic(durable=True)
def member_add(*, account_id: int, email: str, role: str) -> Membership:
    if role not in (MemberRole.ADMIN, MemberRole.VIEWER):
        raise ApplicationError("invalid", "Role must be 'admin' or 'viewer'.", field="role")
    user = User.objects.filter(email=normalize_email(email), is_active=True).first()
    if user is None:
        raise ApplicationError("unknown_user", "No user with this email; they must sign up first.", field="email")
    try:
        with transaction.atomic():
            membership = Membership.objects.create(account_id=account_id, user=user, role=role)
    except IntegrityError as exc:
        raise Conflict("already_member", "This user is already a member of the account.", field="email") from exc
    log.info(
        "member.add",
        extra={"account_id": ids.encode("acc", account_id), "user_id": user.public_id, "role": role},
    )
    return membership


@transaction.atomic(durable=True)
def member_remove(*, account_id: int, user_id: int) -> None:
    membership = Membership.objects.select_for_update().filter(account_id=account_id, user_id=user_id).first()
    if membership is None:
        raise NotFound("No such member.")
    if membership.role == MemberRole.OWNER:
        raise Conflict("owner_cannot_be_removed", "The owner cannot be removed from the account.")
    membership.delete()
    log.info(
        "member.remove",
        extra={
            "account_id": ids.encode("acc", account_id),
            "user_id": ids.encode("usr", user_id),
            "role": membership.role,
        },
    )


# --- Operators

# The operator groups, least privilege (issue 21). Each app adds its own permissions for each group
# in its ``AppConfig.operator_permissions``; these are the accounts app's. A refused page names
# the groups that hold what it needed (billing_site/common/staff.py reads them back from auth.Group).
READ_ONLY_GROUP = "read-only"
OPERATOR_GROUPS: dict[str, tuple[str, ...]] = {
    # Support reads everything about customers, runs the lifecycle (suspend, reactivate... with a
    # reason), edits contact details (name, phone) and revokes customers' keys; pauses dunning
    # and resends documents (payments', invoicing's).
    "support": (
        "view_billingaccount",
        "view_accountnote",
        "add_accountnote",
        "change_billingaccount",
        "transition_billingaccount",
        "view_membership",
        "view_billingaccounttransition",
        "view_billingaccountprofilechange",
        "view_apikey",
        "change_apikey",
        "view_user",
    ),
    # Finance owns the money and what decides the tax: the tax profile (kind, country, tax id,
    # address, billing email); invoices, credit notes, refunds, grants, write-offs, tax rates,
    # discounts, the dunning policy and the period close are in the other apps' declarations.
    "finance": (
        "view_billingaccount",
        "view_accountnote",
        "add_accountnote",
        "change_billingaccount",
        "change_tax_profile_billingaccount",
        "view_billingaccounttransition",
        "view_billingaccountprofilechange",
        "view_membership",
    ),
    # Fraud blocks and unblocks, sets credit limits; the review queue and rules are antifraud's.
    "fraud": (
        "view_billingaccount",
        "view_accountnote",
        "add_accountnote",
        "block_billingaccount",
        "set_credit_limit_billingaccount",
        "view_billingaccounttransition",
        "view_billingaccountprofilechange",
        "view_membership",
        "view_apikey",
        "change_apikey",
        "view_user",
    ),
    # Read-only sees everything and changes nothing: every ``view_*`` permission of the accounts
    # app and of every app that declares operator permissions (operator_groups_sync).
    READ_ONLY_GROUP: (),
}


def operator_groups_sync() -> None:
    """Create the operator groups and give them exactly their permissions (idempotent).

    Each app declares what its operators may do in its own ``AppConfig.operator_permissions``
    (group → codenames of that app's permissions); this app declares the groups."""
    from django.apps import apps
    from django.contrib.auth.models import Group, Permission
    from django.db.models import Q

    declared = [(config.label, getattr(config, "operator_permissions", {})) for config in apps.get_app_configs()]
    for name, codenames in OPERATOR_GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        wanted = Q(content_type__app_label="accounts", codename__in=codenames)
        for app_label, permissions in declared:
            if app_label != "accounts" and permissions.get(name):
                wanted |= Q(content_type__app_label=app_label, codename__in=permissions[name])
        if name == READ_ONLY_GROUP:
            labels = ["accounts", *(label for label, permissions in declared if permissions)]
            wanted = Q(content_type__app_label__in=labels, codename__startswith="view_")
        group.permissions.set(Permission.objects.filter(wanted))


@transaction.atomic(durable=True)
def operator_create(*, email: str, password: str, groups: list[str], superuser: bool = False) -> User:
    """A staff login for the admin, in the given operator groups (created or updated)."""
    from django.contrib.auth.models import Group

    user, _ = User.objects.get_or_create(email=normalize_email(email))
    user.is_staff = True
    user.is_superuser = superuser
    user.set_password(password)
    user.save()
    user.groups.set(Group.objects.filter(name__in=groups))
    log.info(
        "operator.create",
        extra={"user_id": user.public_id, "email": mask_email(user.email), "groups": groups, "superuser": superuser},
    )
    return user


# --- Operators' second factor: django-otp's devices (the sign-in, enrolment and backup-code pages
# are django-two-factor-auth's, at /admin/account/...).


@transaction.atomic(durable=True)
def operator_second_factor_set(*, user_id: int, totp_key: str, backup_codes: tuple[str, ...] = ()) -> None:
    """Give operator ``user_id`` a confirmed authenticator (TOTP) device with secret ``totp_key``
    (hex) and exactly ``backup_codes``, replacing what they had. For the demo's published
    operators; staff enrol their own device at their first sign-in."""
    from django_otp.plugins.otp_static.models import StaticDevice
    from django_otp.plugins.otp_totp.models import TOTPDevice

    user = User.objects.get(id=user_id, is_staff=True)
    TOTPDevice.objects.filter(user=user).delete()
    TOTPDevice.objects.create(user=user, name="default", key=totp_key, confirmed=True)
    StaticDevice.objects.filter(user=user).delete()
    if backup_codes:
        backup = StaticDevice.objects.create(user=user, name="backup", confirmed=True)
        for code in backup_codes:
            backup.token_set.create(token=code)
    log.info("operator.second_factor_set", extra={"user_id": user.public_id, "backup_codes": len(backup_codes)})


@audited
@transaction.atomic(durable=True)
def operator_second_factor_reset(*, email: str, actor: Actor, reason: str) -> int:
    """A lost device: every second-factor device of the operator (authenticator and backup codes)
    deleted. Their sessions lose the second factor at once (the device that verified them is gone);
    at their next sign-in, after the password, they enrol a new device. Returns how many devices
    were deleted; one log line says who reset whose and why."""
    from django_otp import devices_for_user

    if not reason.strip():
        raise ApplicationError("invalid", "A reason is required.", field="reason")
    user = User.objects.filter(email=normalize_email(email), is_staff=True).first()
    if user is None:
        raise NotFound("No staff user with this email.")
    devices = list(devices_for_user(user, confirmed=None))
    for device in devices:
        device.delete()
    log.info(
        "operator.second_factor_reset",
        extra={
            "user_id": user.public_id,
            "email": mask_email(user.email),
            "devices": len(devices),
            "actor": actor.name if actor.kind == ActorKind.SYSTEM else ids.encode("usr", actor.user_id or 0),
            "reason": reason.strip(),
        },
    )
    return len(devices)
