"""Reads shared by the API, the admin and other apps. Customer-facing reads are scoped to
the caller's accounts: someone else's id is indistinguishable from a missing one (404)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection
from django.db.models import OuterRef, QuerySet, Subquery
from django.db.models.functions import Lower

from accounts.authentication import Caller
from accounts.models import (
    AccountNote,
    ApiKey,
    BillingAccount,
    BillingAccountProfileChange,
    BillingAccountTransition,
    MemberRole,
    Membership,
    Scope,
)
from billing_site.common import ids
from billing_site.common.errors import Forbidden, NotFound


def billing_account_list_for_caller(*, caller: Caller) -> QuerySet[BillingAccount]:
    if caller.is_service:
        if caller.has_scope(Scope.ACCOUNTS_READ):
            return BillingAccount.objects.all()
        return BillingAccount.objects.none()
    assert caller.user_id is not None
    return BillingAccount.objects.filter(memberships__user_id=caller.user_id)


def billing_account_get_for_caller(
    *, caller: Caller, account_id: int, roles: tuple[str, ...] | None = None
) -> BillingAccount:
    """The account if the caller may see it, else 404; if it may see but ``roles`` (for a
    write) excludes the caller's role, 403. Service keys read with ``accounts:read`` only."""
    if caller.is_service:
        account = (
            BillingAccount.objects.filter(id=account_id).first() if caller.has_scope(Scope.ACCOUNTS_READ) else None
        )
        if account is None:
            raise NotFound("No such billing account.")
        if roles is not None:
            raise Forbidden("Service keys cannot change billing accounts.")
        return account
    assert caller.user_id is not None
    membership = (
        Membership.objects.select_related("account").filter(account_id=account_id, user_id=caller.user_id).first()
    )
    if membership is None:
        raise NotFound("No such billing account.")
    if roles is not None and membership.role not in roles:
        raise Forbidden(f"Your role ({membership.role}) does not allow this.")
    return membership.account


def billing_account_history(*, account_id: int) -> QuerySet[BillingAccountTransition]:
    return BillingAccountTransition.objects.filter(account_id=account_id).select_related("actor_user")


def member_list(*, account_id: int) -> QuerySet[Membership]:
    return Membership.objects.filter(account_id=account_id).select_related("user")


def api_key_list_for_user(*, user_id: int) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user_id=user_id)


WRITERS = (MemberRole.OWNER, MemberRole.ADMIN)
OWNERS = (MemberRole.OWNER,)


def billing_accounts_named(*, names: list[str]) -> QuerySet[BillingAccount]:
    """Accounts with these names, by name (the demo loaders find their accounts so)."""
    return BillingAccount.objects.filter(name__in=names).order_by("name")


@dataclass(frozen=True, slots=True)
class IngestStanding:
    """What usage ingestion needs to know of an account: its state, and when it was closed."""

    state: str
    closed_at: dt.datetime | None


def billing_account_hold(account_id: int) -> bool:
    """Hold the account's row until the caller's transaction ends (``FOR SHARE``): a transition
    of it (a close) waits for the caller, or the caller for it, so what the caller reads of the
    account afterwards stays true until it commits. False: no such account."""
    if not connection.in_atomic_block:
        raise RuntimeError("an account is held for the rest of a transaction")
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM accounts_billingaccount WHERE id = %s FOR SHARE", [account_id])
        return cursor.fetchone() is not None


def billing_account_standings(account_ids: set[int]) -> dict[int, IngestStanding]:
    """The state (and closure time, for closed accounts) of each of these accounts that
    exists: one indexed query per batch on the ingestion hot path (states change, so nothing
    is cached). Only closed accounts look up their closure in the audit trail; one closed
    without a closure record (imported data) counts as closed since its row last changed."""
    if not account_ids:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT a.id, a.state,
                   CASE WHEN a.state = 'closed' THEN coalesce(
                       (SELECT max(t.created_at) FROM accounts_billingaccounttransition t
                        WHERE t.account_id = a.id AND t.to_state = 'closed'),
                       a.updated_at) END
            FROM accounts_billingaccount a WHERE a.id = ANY(%s)
            """,
            [list(account_ids)],
        )
        return {account_id: IngestStanding(state, closed_at) for account_id, state, closed_at in cursor.fetchall()}


@dataclass(frozen=True, slots=True)
class BillingProfile:
    """What an invoice needs to know about its buyer (snapshotted on the invoice when issued)."""

    account_id: int
    public_id: str
    name: str
    email: str
    kind: str
    country: str
    currency: str
    tax_id: str
    address: list[str]
    payment_terms_days: int
    phone: str = ""  # E.164; not on invoices

    def snapshot(self) -> dict[str, object]:
        return {
            "account": self.public_id,
            "name": self.name,
            "email": self.email,
            "kind": self.kind,
            "country": self.country,
            "tax_id": self.tax_id,
            "address": self.address,
        }


def billing_profiles(*, account_ids: list[int]) -> dict[int, BillingProfile]:
    """Billing profiles of these accounts, one query (plain rows in plain SQL: antifraud reads
    one at every checkpoint, where building the ORM's query cost twice its run)."""
    profiles: dict[int, BillingProfile] = {}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT id, name, email, kind, country, currency, tax_id, address_line1, address_line2,
                   address_postal_code, address_city, address_region, payment_terms_days, phone
            FROM accounts_billingaccount WHERE id = ANY(%s)
            """,
            [list(account_ids)],
        )
        rows = cursor.fetchall()
    for (
        account_id,
        name,
        email,
        kind,
        country,
        currency,
        tax_id,
        line1,
        line2,
        postal,
        city,
        region,
        terms,
        phone,
    ) in rows:
        city_line = " ".join(p for p in (postal, city) if p)
        profiles[account_id] = BillingProfile(
            account_id=account_id,
            public_id=ids.encode("acc", account_id),
            name=name,
            email=email,
            kind=kind,
            country=str(country),
            currency=currency,
            tax_id=tax_id,
            address=[line for line in (line1, line2, city_line, region) if line],
            payment_terms_days=terms,
            phone=phone,
        )
    return profiles


def billing_account_ids_same_owner(*, account_id: int) -> frozenset[int]:
    """The other accounts whose owner (the membership with role owner) owns this one too: one
    customer's own accounts (antifraud does not count them as strangers sharing a card). One
    indexed query."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT theirs.account_id FROM accounts_membership mine
            JOIN accounts_membership theirs ON theirs.user_id = mine.user_id AND theirs.role = %s
            WHERE mine.account_id = %s AND mine.role = %s AND theirs.account_id <> %s
            """,
            [MemberRole.OWNER, account_id, MemberRole.OWNER, account_id],
        )
        return frozenset(row[0] for row in cursor.fetchall())


def billing_account_name_subquery(*, account_id_field: str = "account_id") -> Subquery:
    """Each row's billing account name, to annotate another app's rows with (``account_id_field``
    names their account column): a list of invoices or grants names its customers in the
    page's one query, without a foreign key across apps."""
    return Subquery(BillingAccount.objects.filter(id=OuterRef(account_id_field)).values("name")[:1])


def billing_account_ids_open(*, opened_before: object, account_ids: list[int] | None = None) -> list[int]:
    """Ids of accounts created before ``opened_before`` and not closed, ascending."""
    from accounts.models import AccountState

    rows = BillingAccount.objects.filter(created_at__lt=opened_before).exclude(state=AccountState.CLOSED)
    if account_ids is not None:
        rows = rows.filter(id__in=account_ids)
    return list(rows.order_by("id").values_list("id", flat=True))


def credit_limits(*, account_ids: list[int]) -> dict[int, tuple[Decimal, str]]:
    """Each account's credit limit and currency (0: none set), one query."""
    return {
        account_id: (limit, currency)
        for account_id, limit, currency in BillingAccount.objects.filter(id__in=account_ids).values_list(
            "id", "credit_limit", "currency"
        )
    }


def billing_account_counts_by_state() -> dict[str, int]:
    """How many billing accounts are in each state (every state, zeros included), one
    statement over the ``state`` index."""
    from django.db.models import Count

    from accounts.models import AccountState

    counts = dict(
        BillingAccount.objects.order_by().values_list("state").annotate(n=Count("*")).values_list("state", "n")
    )
    return {state: counts.get(state, 0) for state in AccountState.values}


# --- For the back office's customer page and search (staff: not scoped to a caller)


def billing_account_get(*, account_id: int) -> BillingAccount | None:
    return BillingAccount.objects.filter(id=account_id).first()


def billing_account_profile_changes(*, account_id: int) -> QuerySet[BillingAccountProfileChange]:
    return BillingAccountProfileChange.objects.filter(account_id=account_id).order_by("-created_at", "-id")


def account_notes(*, account_id: int) -> QuerySet[AccountNote]:
    """Staff notes on the account, newest first."""
    return AccountNote.objects.filter(account_id=account_id).order_by("-created_at", "-id")


def api_keys_for_account(*, account_id: int) -> QuerySet[ApiKey]:
    """The API keys of the account's members (a user's key acts for every account the user is a
    member of), revoked ones too, newest first, each with its user."""
    return (
        ApiKey.objects.filter(user__memberships__account_id=account_id)
        .select_related("user")
        .order_by("-created_at", "-id")
    )


def transition_public_reason(*, transition: str, cause: str) -> str:
    """What the customer reads of a transition with this cause (the API's history shows it)."""
    from accounts.serializers import public_reason

    return public_reason(transition, cause)


def billing_account_last_transition(*, account_id: int) -> BillingAccountTransition | None:
    return BillingAccountTransition.objects.filter(account_id=account_id).order_by("-created_at", "-id").first()


def billing_account_search(*, term: str, limit: int = 20) -> dict[str, list[BillingAccount]]:
    """Accounts matching ``term``, by what matched: ``email`` and ``name`` by their beginning in
    any case (indexes on lower(email), lower(name) with text_pattern_ops), ``tax_id`` exactly
    (its compact form, any case: ``nl 0044.95445b01`` finds NL004495445B01). Each kind at most
    ``limit``, by name; three indexed queries."""
    term = term.strip()
    if not term:
        return {}
    lowered = term.lower()
    compact = "".join(ch for ch in term if ch.isalnum()).upper()
    base = BillingAccount.objects.order_by("name", "id")
    found: dict[str, list[BillingAccount]] = {
        "email": list(base.alias(email_lower=Lower("email")).filter(email_lower__startswith=lowered)[:limit]),
        "name": list(base.alias(name_lower=Lower("name")).filter(name_lower__startswith=lowered)[:limit]),
        "tax_id": list(base.filter(tax_id=compact)[:limit]) if compact else [],
    }
    return {kind: rows for kind, rows in found.items() if rows}
