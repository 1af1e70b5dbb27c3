"""Last month's invoices for the demo accounts: a credit grant and a contract discount on
show, then the real period close (rollup, invoices, ledger, PDFs). Idempotent: a second
run finds the month closed and the demo extras in place."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts import selectors as account_selectors
from billing_site.common import money
from billing_site.common.actors import Actor
from invoicing import ledger, services
from invoicing.models import ContractDiscount, CreditGrant, Invoice, RenderedDocument
from invoicing.periods import Period

DEMO = Actor.system("load_demo_invoices")


class Command(BaseCommand):
    help = "Close last month for the demo accounts (credits, a discount, invoices with PDFs). DEBUG only."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("Demo invoices are for demo databases: DEBUG must be on (or --force).")
        named = {a.name: a for a in account_selectors.billing_accounts_named(names=["Globex GmbH", "Acme Cloud BV"])}
        globex, acme = named.get("Globex GmbH"), named.get("Acme Cloud BV")
        if acme is not None and not CreditGrant.objects.filter(account_id=acme.id).exists():
            services.credit_grant_create(
                account_id=acme.id,
                kind="promotional",
                amount=Decimal("5.00"),
                currency=acme.currency,
                reason="Welcome credit",
                actor=DEMO,
                expires_at=timezone.now() + dt.timedelta(days=90),
            )
        if globex is not None and not ContractDiscount.objects.filter(account_id=globex.id).exists():
            services.contract_discount_create(
                account_id=globex.id,
                sku_prefix="compute.",
                percent=Decimal("15"),
                valid_from=dt.date(2026, 1, 1),
                reason="Enterprise agreement 2026",
                actor=DEMO,
            )
        period = Period.containing(timezone.now()).previous
        report = services.period_close(period=period, actor=DEMO)
        self.stdout.write(f"Period close {report.summary()}")
        for invoice in Invoice.objects.filter(period_start=period.start).order_by("number"):
            has_pdf = RenderedDocument.objects.filter(kind="invoice", source_id=invoice.id).exists()
            self.stdout.write(
                f"  {invoice.number} {invoice.buyer.get('name', '')}: total "
                f"{money.display(invoice.total_minor, invoice.currency)}, {invoice.tax_treatment}"
                f"{', PDF stored' if has_pdf else ''}"
            )
        problems = ledger.check()
        self.stdout.write("Ledger: ok" if not problems else f"Ledger: {len(problems)} problems: {problems[:3]}")
