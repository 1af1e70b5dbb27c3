"""A small back office's books, for the pages staff read at a glance (the home page, finance's
ageing) and their screenshots: customers in every account state, in three currencies, owing
invoices spread over the ageing buckets, one account waiting in fraud's review queue.

Invoices are built directly (as the period close leaves an issued threshold invoice), their due
dates counted back from now, so the buckets hold on any date. ``Books.owed`` says what each
currency's bucket must show, ``Books.invoices`` each customer's invoices (the numbers a customer
quotes to support)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from django.utils import timezone

from accounts.models import AccountState, BillingAccount
from antifraud.tests.test_checkpoints import US_IP, bind, open_account
from conftest import Customer
from invoicing.models import Invoice

_numbers = itertools.count(1)

# Name, country, currency, state, and the invoices owed: (days past due, amount in minor units).
# Days past due stay off the buckets' edges (0, 30, 60, 90), so a test near midnight holds too.
CUSTOMERS: tuple[tuple[str, str, str, AccountState, tuple[tuple[int, int], ...]], ...] = (
    ("Initech BV", "NL", "EUR", AccountState.ACTIVE, ((-12, 48_400), (5, 12_100))),
    ("Globex GmbH", "DE", "EUR", AccountState.ACTIVE, ((-3, 238_000), (21, 95_200), (44, 95_200))),
    ("Hooli SAS", "FR", "EUR", AccountState.SUSPENDED, ((47, 61_200), (75, 61_200), (104, 58_800))),
    ("Vandelay Industries", "US", "USD", AccountState.ACTIVE, ((-20, 150_000), (9, 42_550))),
    ("Massive Dynamic Inc.", "US", "USD", AccountState.SUSPENDED, ((38, 88_000), (67, 91_000), (131, 79_500))),
    ("Stark Hosting Ltd", "GB", "GBP", AccountState.ACTIVE, ((-7, 33_600), (16, 33_600))),
    ("Wayne Compute Ltd", "GB", "GBP", AccountState.BLOCKED, ((96, 12_000),)),
    ("Soylent Data BV", "NL", "EUR", AccountState.PENDING, ()),
    ("Tyrell Systems GmbH", "DE", "EUR", AccountState.CLOSED, ()),
)


def bucket_of(days_past_due: int) -> str:
    """The ageing bucket's key (``invoicing.selectors.AGEING_BUCKETS``) for so many days past due."""
    if days_past_due <= 0:
        return "current"
    if days_past_due <= 30:
        return "1_30"
    if days_past_due <= 60:
        return "31_60"
    return "61_90" if days_past_due <= 90 else "90_plus"


@dataclass
class Books:
    accounts: dict[str, BillingAccount] = field(default_factory=dict)
    invoices: dict[str, list[Invoice]] = field(default_factory=lambda: defaultdict(list))  # by customer name
    # currency → bucket → (amount owed in minor units, invoices)
    owed: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: defaultdict(dict))
    in_review: BillingAccount | None = None
    owner: Customer | None = None  # the customer who opened the accounts above (binds their cards)


def open_books(make_customer: Callable[..., Customer], make_account: Callable[..., BillingAccount]) -> Books:
    """The customers above with their invoices, and one account opened from abroad with a
    throwaway address and a card: pending, in fraud's review queue."""
    now = timezone.now()
    books = Books()
    owner = books.owner = make_customer()
    for name, country, currency, state, invoices in CUSTOMERS:
        account = make_account(owner.user, name=name, country=country, currency=currency, state=state)
        books.accounts[name] = account
        for days_past_due, total in invoices:
            due_at = now - dt.timedelta(days=days_past_due)
            issued_at = due_at - dt.timedelta(days=14)
            issued = Invoice.objects.create(
                account_id=account.id,
                period_start=(issued_at.date().replace(day=1) - dt.timedelta(days=1)).replace(day=1),
                period_end=issued_at.date().replace(day=1),
                kind="threshold",
                status="issued",
                currency=currency,
                number=f"INV-{issued_at:%Y}-{next(_numbers):06d}",
                subtotal_minor=total,
                total_minor=total,
                issued_at=issued_at,
                due_at=due_at,
            )
            books.invoices[name].append(issued)
            amount, count = books.owed[currency].get(bucket_of(days_past_due), (0, 0))
            books.owed[currency][bucket_of(days_past_due)] = (amount + total, count + 1)
    flagged = make_customer()
    books.in_review = open_account(flagged, US_IP, name="Quick Cash Cloud LLC", email="ops@mailinator.com")
    bind(flagged, books.in_review, "pm_card_visa")
    return books
