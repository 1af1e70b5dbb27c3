"""Demo data for ``make demo``: users, billing accounts in every state with their history,
and operator logins, one per operator group, each with a second factor whose secret and backup
codes are published. Safe to run again: existing demo rows are kept and the operators' passwords
and second factors are reset to the published ones. ``demo_access`` prints the logins and fresh keys."""

import base64
import hashlib
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import services
from accounts.models import BillingAccount, User
from billing_site.common.actors import Actor

OPERATOR_EMAIL = "operator@demo.test"
OPERATOR_PASSWORD = "demo-operator-2026"  # noqa: S105  (a demo login on 127.0.0.1, printed on purpose)
USER_PASSWORD = "demo-password-2026"  # noqa: S105


# The demo's operators, one per group (two in finance: one requests, the other approves), all with
# OPERATOR_PASSWORD: (email, groups, superuser). Their second factor is published (demo_secret).
OPERATORS = [
    (OPERATOR_EMAIL, ["support", "finance", "fraud"], True),
    ("support@demo.test", ["support"], False),
    ("finance@demo.test", ["finance"], False),
    ("finance2@demo.test", ["finance"], False),  # the second pair of eyes
    ("fraud@demo.test", ["fraud"], False),
    ("readonly@demo.test", ["read-only"], False),
]


def demo_secret(email: str) -> str:
    """The demo operator's TOTP secret (hex, 20 bytes), fixed and published: derived from the email."""
    return hashlib.sha1(f"billing-demo-totp:{email}".encode(), usedforsecurity=False).hexdigest()


def demo_secret_base32(email: str) -> str:
    """The same secret as an authenticator app takes it (base32)."""
    return base64.b32encode(bytes.fromhex(demo_secret(email))).decode()


def demo_backup_codes(email: str) -> tuple[str, ...]:
    """Three published backup codes (each signs in once; reset by every load_demo_data)."""
    return tuple(hashlib.sha256(f"billing-demo-backup:{email}:{n}".encode()).hexdigest()[:8] for n in (1, 2, 3))


USERS = ["alice@demo.test", "bob@demo.test", "carol@demo.test", "dave@demo.test"]

ADDRESS = {"address_line1": "Herengracht 1", "address_city": "Amsterdam", "address_postal_code": "1015 BA"}

# (owner, profile, currency, [(transition, who, reason)], [(member, role)]); who is "operator",
# "owner" or "system:<component>".
ACCOUNTS: list[tuple[str, dict[str, Any], str, list[tuple[str, str, str]], list[tuple[str, str]]]] = [
    (
        "alice@demo.test",
        {
            "name": "Acme Cloud BV",
            "email": "billing@acme.test",
            "kind": "business",
            "country": "NL",
            "tax_id": "NL004495445B01",
            **ADDRESS,
        },
        "EUR",
        [("activate", "operator", "Card verified")],
        [("bob@demo.test", "admin"), ("carol@demo.test", "viewer")],
    ),
    (
        "bob@demo.test",
        {
            "name": "Bob Smith",
            "email": "bob@demo.test",
            "kind": "individual",
            "country": "US",
            "address_line1": "1 Main St",
            "address_city": "Springfield",
            "address_postal_code": "62701",
            "address_region": "IL",
        },
        "USD",
        [],
        [],
    ),
    (
        "alice@demo.test",
        {
            "name": "Globex GmbH",
            "email": "ap@globex.test",
            "kind": "business",
            "country": "DE",
            "tax_id": "DE136695976",
            "address_line1": "Unter den Linden 5",
            "address_city": "Berlin",
            "address_postal_code": "10117",
        },
        "EUR",
        [
            ("activate", "operator", "Card verified"),
            ("suspend", "system:payments.dunning", "Invoice unpaid 30 days after due date"),
            ("reactivate", "system:payments.dunning", "Debt paid"),
        ],
        [],
    ),
    (
        "carol@demo.test",
        {
            "name": "Initech Ltd",
            "email": "finance@initech.test",
            "kind": "business",
            "country": "GB",
            "tax_id": "GB980780684",
            "address_line1": "10 Downing Way",
            "address_city": "London",
            "address_postal_code": "SW1A 2AA",
        },
        "GBP",
        [
            ("activate", "operator", "Card verified"),
            ("block", "system:antifraud.rules", "Card country differs from IP country; 9 cards in 1 hour"),
        ],
        [],
    ),
    (
        "dave@demo.test",
        {
            "name": "Hooli Inc",
            "email": "ap@hooli.test",
            "kind": "business",
            "country": "US",
            "address_line1": "1 Hacker Way",
            "address_city": "Palo Alto",
            "address_postal_code": "94301",
            "address_region": "CA",
        },
        "USD",
        [("activate", "operator", "Card verified")],
        [],
    ),
    (
        "dave@demo.test",
        {
            "name": "Tanaka KK",
            "email": "keiri@tanaka.test",
            "kind": "business",
            "country": "JP",
            "address_line1": "1-1 Marunouchi",
            "address_city": "Tokyo",
            "address_postal_code": "100-0005",
        },
        "JPY",
        [("activate", "operator", "Card verified"), ("close", "owner", "Moving workloads elsewhere")],
        [],
    ),
]


# Invoices due on receipt (operators set payment terms): the demo's account suspended for debt.
PAYMENT_TERMS_DAYS = {"Hooli Inc": 0}


class Command(BaseCommand):
    help = "Load demo users, billing accounts in every lifecycle state with history, and an operator login."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Load even with DEBUG off (never in production).")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError(
                "Demo data creates a superuser with a published password: DEBUG must be on (or --force)."
            )
        for email, groups, superuser in OPERATORS:
            staff = services.operator_create(
                email=email, password=OPERATOR_PASSWORD, groups=groups, superuser=superuser
            )
            services.operator_second_factor_set(
                user_id=staff.id, totp_key=demo_secret(email), backup_codes=demo_backup_codes(email)
            )
        operator = User.objects.get(email=OPERATOR_EMAIL)
        operator_actor = Actor.operator(operator.id, operator.email)
        users = {}
        for email in USERS:
            user = User.objects.filter(email=email).first()
            if user is None:
                user, _ = services.user_signup(email=email, password=USER_PASSWORD)
            users[email] = user

        created = 0
        for owner_email, profile, currency, transitions, members in ACCOUNTS:
            if BillingAccount.objects.filter(name=profile["name"]).exists():
                continue
            owner = users[owner_email]
            account = services.billing_account_create(owner_id=owner.id, profile=profile, currency=currency)
            if profile["name"] in PAYMENT_TERMS_DAYS:
                BillingAccount.objects.filter(id=account.id).update(
                    payment_terms_days=PAYMENT_TERMS_DAYS[profile["name"]]
                )
            for member_email, role in members:
                services.member_add(account_id=account.id, email=member_email, role=role)
            for transition, who, reason in transitions:
                actor = operator_actor
                if who == "owner":
                    actor = Actor.user(owner.id, owner.email)
                elif who.startswith("system:"):
                    actor = Actor.system(who.removeprefix("system:"))
                services.billing_account_transition(
                    account_id=account.id, transition=transition, actor=actor, reason=reason
                )
            created += 1

        self.stdout.write(
            self.style.SUCCESS(
                f"Demo data: {created} billing account(s) created, {len(ACCOUNTS)} in all; operator login "
                f"{OPERATOR_EMAIL} and {len(OPERATORS) - 1} more, one per group (`manage.py demo_access` prints "
                "them with their second factor, API keys and curl examples)."
            )
        )
