"""A fraud ring and two honest newcomers for the demo, through the real API (signup, account
creation, card binding on the sandbox, each from its own client IP), so antifraud's rules see
exactly what they would see in production. Idempotent: a second run creates nothing and
prints the same summary.

The ring: four accounts signed up from one IP address in 198.51.100.0/24, all binding the same
card (``pm_card_mastercard``: one fingerprint), the third with a throwaway address. The first
two look clean on their own and are activated; the third is blocked (card reuse, disposable
email, signup velocity), which raises the first two for review as linked accounts; the fourth
is blocked at its card. The honest newcomers bind their own cards and are activated.

Then threshold billing: Northwind's new account (credit limit 500 EUR from its policy) ran an
8-GPU box for the last 30 hours (240 GPU-hours at 2.29 EUR: 549.60 EUR), sent through the
usage endpoint and rolled up; the credit check finds it past its limit and issues a threshold
invoice (665.02 EUR with Dutch VAT), charged to its card at once.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.authentication import Scope
from antifraud.models import AccountRisk, RiskAssessment
from billing_site.common import money
from billing_site.outbox import services as outbox
from invoicing import selectors as invoicing_selectors
from invoicing import services as invoicing_services
from metering import services as metering_services

PASSWORD = "demo-password-2026"  # noqa: S105  (demo users on 127.0.0.1)
RING_IP = "198.51.100.23"
ADDRESS = {"line1": "Keizersgracht 100", "city": "Amsterdam", "postal_code": "1015 CS"}
# (user email, account profile, client IP, test card)
ACCOUNTS: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "ring1@hashpower.test",
        {"name": "Hashpower One BV", "email": "ops@hashpower-one.test"},
        RING_IP,
        "pm_card_mastercard",
    ),
    (
        "ring2@hashpower.test",
        {"name": "Hashpower Two BV", "email": "ops@hashpower-two.test"},
        RING_IP,
        "pm_card_mastercard",
    ),
    (
        "ring3@hashpower.test",
        {"name": "Hashpower Three BV", "email": "ops@mailinator.com"},
        RING_IP,
        "pm_card_mastercard",
    ),
    (
        "ring4@hashpower.test",
        {"name": "Hashpower Four BV", "email": "ops@hashpower-four.test"},
        RING_IP,
        "pm_card_mastercard",
    ),
    ("ap@northwind.test", {"name": "Northwind Traders BV", "email": "ap@northwind.test"}, "145.14.1.1", "pm_card_amex"),
    (
        "ap@contoso.test",
        {
            "name": "Contoso GmbH",
            "email": "ap@contoso.test",
            "country": "DE",
            "address": {"line1": "Friedrichstr. 1", "city": "Berlin", "postal_code": "10117"},
        },
        "193.99.144.80",
        "pm_card_visa",
    ),
]


class Command(BaseCommand):
    help = "Load a fraud ring the rules catch and honest newcomers they let in, through the API. DEBUG only."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off (never in production).")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("The demo fraud ring is for demo databases: DEBUG must be on (or --force).")
        names = [profile["name"] for _, profile, _, _ in ACCOUNTS]
        if not account_selectors.billing_accounts_named(names=names).exists():
            for email, profile, ip, card in ACCOUNTS:
                self._sign_up_and_bind(email, profile, ip, card)
                while outbox.drain():  # what the outbox's task does: activations, blocks, reviews
                    pass
        self.stdout.write("Antifraud (admin: Antifraud → Account risks is the review queue):")
        for account in account_selectors.billing_accounts_named(names=names):
            risk = AccountRisk.objects.filter(account_id=account.id).first()
            last = RiskAssessment.objects.filter(account_id=account.id).order_by("-id").first()
            rules = ", ".join(f["rule"] for f in last.fired) if last else ""
            self.stdout.write(
                f"  {account.name} ({account.public_id}): account {account.state}, "
                f"{risk.status if risk else 'clear'} with the fraud team"
                f"{f'; last assessment {last.checkpoint}: {last.decision} ({last.score}) {rules}' if last else ''}"
            )
        self._threshold_billing()

    def _threshold_billing(self) -> None:
        """Northwind passes its credit limit: usage through the endpoint, the rollup, the
        credit check as beat runs it after a rollup, the charge the outbox delivers."""
        account = account_selectors.billing_accounts_named(names=["Northwind Traders BV"]).first()
        if account is None or account.state != "active":
            return
        if not invoicing_selectors.threshold_invoices(account_id=account.id):
            key = account_services.service_key_create(
                name="demo-threshold", scopes=[Scope.USAGE_WRITE], created_by_id=None
            )
            until = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
            since = until - dt.timedelta(hours=30)
            box = {"account_id": account.public_id, "type": "resource", "resource_id": "gpu-box-1"}
            events = [
                {
                    **box,
                    "id": "gpu-box-start",
                    "time": since.isoformat(),
                    "action": "start",
                    "spec": {"compute.gpu.a100": "8"},
                    "labels": {"project": "training"},
                },
                {**box, "id": "gpu-box-stop", "time": until.isoformat(), "action": "stop"},
            ]
            client = Client(HTTP_AUTHORIZATION=f"Bearer {key.raw}", SERVER_NAME="127.0.0.1")
            response = client.post(
                "/api/v1/usage/events", json.dumps({"events": events}), content_type="application/json"
            )
            account_services.api_key_revoke(key_id=key.key.id, user_id=None)
            if response.status_code != 200:
                raise CommandError(f"usage for the threshold demo: {response.status_code} {response.content[:300]!r}")
            metering_services.rollup_catch_up()
            invoicing_services.threshold_billing_run(render_pdfs=False)
            while outbox.drain():  # the charge
                pass
        account.refresh_from_db()
        for invoice in invoicing_selectors.threshold_invoices(account_id=account.id):
            self.stdout.write(
                f"Threshold billing: {account.name} ({account.public_id}) passed its credit limit of "
                f"{money.format_amount(account.credit_limit, account.currency)} {account.currency}: threshold "
                f"invoice {invoice.number} of {money.format_minor(invoice.total_minor, invoice.currency)} "
                f"{invoice.currency}, {invoice.status}; account {account.state}"
            )

    def _sign_up_and_bind(self, email: str, profile: dict[str, Any], ip: str, card: str) -> None:
        client = Client(SERVER_NAME="127.0.0.1", REMOTE_ADDR=ip)
        signup = client.post("/api/v1/users", {"email": email, "password": PASSWORD}, content_type="application/json")
        if signup.status_code != 201:
            raise CommandError(f"signup of {email}: {signup.status_code} {signup.content[:300]!r}")
        auth = {"Authorization": f"Bearer {signup.json()['api_key']}"}
        body = {"kind": "business", "country": "NL", "currency": "EUR", "address": ADDRESS, **profile}
        created = client.post("/api/v1/billing-accounts", body, content_type="application/json", headers=auth)
        if created.status_code != 201:
            raise CommandError(f"account {profile['name']}: {created.status_code} {created.content[:300]!r}")
        base = f"/api/v1/billing-accounts/{created.json()['id']}/payment-methods"
        setup = client.post(f"{base}/setup", content_type="application/json", headers=auth)
        if setup.status_code != 201:  # a blocked account cannot bind: the rules stopped it at signup
            return
        client.post(
            base,
            {"setup_intent_id": setup.json()["setup_intent_id"], "test_payment_method": card},
            content_type="application/json",
            headers=auth,
        )
