"""The last words of ``make demo``, all in one place: the operator login, a fresh API key for a
demo customer and one for a usage producer, and curl lines that work as printed. A key exists
in clear only when it is created, so every run creates (and prints) new ones. DEBUG only."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts import services
from accounts.management.commands.load_demo_data import (
    OPERATOR_EMAIL,
    OPERATOR_PASSWORD,
    OPERATORS,
    demo_backup_codes,
    demo_secret_base32,
)
from accounts.models import BillingAccount, Scope, User

PORT = 8000
SITE = f"http://127.0.0.1:{PORT}"
CUSTOMER_EMAIL = "alice@demo.test"
CUSTOMER_ACCOUNT = "Acme Cloud BV"


class Command(BaseCommand):
    help = "Print the demo's operator login, fresh API keys and curl examples (DEBUG only)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off (never in production).")
        parser.add_argument("--port", type=int, default=PORT, help="The port the demo serves on (make demo PORT=…).")

    def handle(self, *args: Any, force: bool = False, port: int = PORT, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("Demo keys are for demo databases: DEBUG must be on (or --force).")
        customer = User.objects.filter(email=CUSTOMER_EMAIL).first()
        acme = BillingAccount.objects.filter(name=CUSTOMER_ACCOUNT).first()
        if customer is None or acme is None:
            raise CommandError("No demo data: run `manage.py load_demo_data` first.")
        key = services.api_key_create(user_id=customer.id, name="demo").raw
        producer = services.service_key_create(name="demo-producer", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw

        site = f"http://127.0.0.1:{port}"
        now = timezone.now()
        # The costs of the demo's month of usage: from the first of last month to tomorrow.
        start = (now.date().replace(day=1) - dt.timedelta(days=1)).replace(day=1)
        end = now.date() + dt.timedelta(days=1)
        event = {
            "id": "try-1",  # sent twice, it is counted once: the second answer says "duplicates": 1
            "account_id": acme.public_id,
            "time": now.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "type": "usage",
            "sku": "network.egress",
            "quantity": "1.5",
        }
        api = f"{site}/api/v1"
        accounts = f"{api}/billing-accounts/{acme.public_id}"
        lines = [
            "",
            self.style.SUCCESS(
                f"The demo runs on {site}/ (Ctrl-C stops it, its worker and beat, and its embedded PostgreSQL)."
            ),
            "",
            f"  Admin:         {site}/admin/  login {OPERATOR_EMAIL} / {OPERATOR_PASSWORD}",
            "                 then the second factor: the code `.venv/bin/python manage.py operator_totp "
            f"--email {OPERATOR_EMAIL}` prints, or a backup code",
            *self.operator_lines(),
            f"  API docs:      {site}/api/docs/",
            f"  Customer key:  {key}",
            f"                 ({CUSTOMER_EMAIL}, owner of Acme Cloud BV and Globex GmbH)",
            f"  Producer key:  {producer}",
            "                 (a usage producer: scope usage:write)",
            "",
            "  Try:",
            f"  curl -H 'Authorization: Bearer {key}' {api}/billing-accounts",
            f"  curl -H 'Authorization: Bearer {key}' "
            f"'{accounts}/costs?start={start.isoformat()}&end={end.isoformat()}&group_by=sku,label:project'",
            f"  curl -H 'Authorization: Bearer {key}' {accounts}/invoices",
            f"  curl -H 'Authorization: Bearer {producer}' -H 'Content-Type: application/json' "
            f"-d '{json.dumps({'events': [event]})}' {api}/usage/events",
            "",
            "  Usage sent now is rolled up by the demo's worker and in the costs within a minute.",
            "",
        ]
        self.stdout.write("\n".join(lines))

    def operator_lines(self) -> list[str]:
        """Every demo operator: login, password, groups, TOTP secret (for an authenticator app)
        and backup codes; all published on purpose (a demo on 127.0.0.1)."""
        lines = [
            "",
            f"  Operators (password {OPERATOR_PASSWORD} for all; second factor: TOTP secret or a backup code):",
        ]
        for email, groups, superuser in OPERATORS:
            role = "superuser" if superuser else ", ".join(groups)
            lines.append(
                f"    {email:<22} {role:<10} TOTP secret {demo_secret_base32(email)}  "
                f"backup codes {' '.join(demo_backup_codes(email))}"
            )
        lines.append("    current code: .venv/bin/python manage.py operator_totp --email EMAIL")
        return lines
