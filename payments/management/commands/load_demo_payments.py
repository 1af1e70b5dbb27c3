"""Cards and payments for the demo accounts, on the sandbox gateway, through the real flows:
each account binds a Stripe test card (a setup intent confirmed server-side, as a browser-less
test flow does), the new default card pays last month's invoice at once, and the dunning run
does what the policy says. Idempotent: a second run binds nothing new and charges nothing twice.

- Acme Cloud BV: ``pm_card_visa`` → paid.
- Globex GmbH: ``pm_card_chargeCustomerFail`` → declined (retryable), in dunning: retries on
  days 1, 3 and 5, then suspension 7 days after the due date.
- Hooli Inc: ``pm_card_visa_chargeDeclinedLostCard`` → a hard decline; its invoices are due on
  receipt and its policy (USD, business) suspends on the due date: suspended for debt.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import selectors as account_selectors
from billing_site.common import money
from billing_site.outbox import services as outbox
from invoicing import selectors as invoicing_selectors
from payments import dunning, selectors, services
from payments.models import DunningPolicy

CARDS = {
    "Acme Cloud BV": "pm_card_visa",
    "Globex GmbH": "pm_card_chargeCustomerFail",
    "Hooli Inc": "pm_card_visa_chargeDeclinedLostCard",
}
# Policy as data, as finance would add it: US business accounts pay on receipt and are
# suspended the day an invoice is unpaid.
DUE_ON_RECEIPT = {
    "name": "US business: due on receipt",
    "currency": "USD",
    "account_kind": "business",
    "retry_days": [1, 3, 5],
    "warn_days_before_suspension": 0,
    "suspend_after_days": 0,
    "write_off_after_days": 60,
}


class Command(BaseCommand):
    help = "Bind sandbox test cards for the demo accounts, charge last month's invoices, run dunning. DEBUG only."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off (never in production).")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("Demo payments are for demo databases: DEBUG must be on (or --force).")
        if not DunningPolicy.objects.filter(
            currency=DUE_ON_RECEIPT["currency"], account_kind=DUE_ON_RECEIPT["account_kind"], is_active=True
        ).exists():
            DunningPolicy.objects.create(**DUE_ON_RECEIPT)
        accounts = {a.name: a for a in account_selectors.billing_accounts_named(names=list(CARDS))}
        for name, card in CARDS.items():
            account = accounts.get(name)
            if account is None:
                raise CommandError(f"{name} is missing: run load_demo_data first.")
            if selectors.payment_method_list(account_id=account.id).exists():
                continue
            start = services.binding_start(account_id=account.id, user_id=None, client_ip=None)
            services.binding_complete(
                account_id=account.id,
                setup_intent_id=start.setup_intent_id,
                gateway_name=start.gateway,
                test_payment_method=card,
            )
        outbox.drain()  # what the outbox's task does: the new default cards' charges
        counts = dunning.dunning_run()
        outbox.drain()  # dunning's suspensions and emails
        self.stdout.write(
            f"Dunning: {counts['retried']} retried, {counts['suspended']} suspended, {counts['opened']} opened"
        )

        for name in CARDS:
            account = account_selectors.billing_accounts_named(names=[name]).get()
            method = selectors.payment_method_list(account_id=account.id).first()
            card = f"{method.brand} •••• {method.last4}" if method else "no card"
            latest = selectors.payment_list(account_id=account.id).order_by("-created_at").first()
            owed = invoicing_selectors.payable_invoices(account_id=account.id)
            state = selectors.dunning_state(account_id=account.id)
            if latest is None:
                outcome = "no charge"
            elif latest.status == "succeeded":
                outcome = f"paid {money.display(latest.amount_minor, latest.currency)}"
            else:
                outcome = f"{latest.status} ({latest.decline_code})"
            debt = (
                ", ".join(f"{i.number} owes {money.display(i.outstanding_minor, i.currency)}" for i in owed)
                or "nothing owed"
            )
            self.stdout.write(
                f"  {name} ({account.public_id}): {card}; last charge {outcome}; {debt}; "
                f"dunning: {state.state}; account {account.state}"
            )
