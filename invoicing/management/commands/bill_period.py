"""python manage.py bill_period 2026-10 [--account acc_…] [--dry-run]"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from invoicing import services
from invoicing.periods import Period


class Command(BaseCommand):
    help = (
        "Close a past billing period (calendar month, UTC): run the usage rollup, then issue one invoice "
        "per account with usage in it (late usage of earlier months as adjustment lines). Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("period", help="YYYY-MM")
        parser.add_argument("--account", action="append", default=[], help="acc_… (repeatable): only these")
        parser.add_argument("--dry-run", action="store_true", help="Print what would be invoiced; write nothing")
        parser.add_argument("--no-rollup", action="store_true", help="Skip the usage rollup before closing")
        parser.add_argument(
            "--no-pdfs",
            action="store_true",
            help="Do not queue PDF rendering (each PDF is then rendered and stored on its first download)",
        )
        parser.add_argument("--chunk-size", type=int, default=services.CHUNK_ACCOUNTS, help="Accounts per transaction")

    def handle(self, *args: Any, **options: Any) -> None:
        account_ids = None
        if options["account"]:
            account_ids = []
            for public_id in options["account"]:
                decoded = ids.decode("acc", public_id)
                if decoded is None:
                    raise CommandError(f"{public_id!r} is not an account id (acc_…)")
                account_ids.append(decoded)
        try:
            report = services.period_close(
                period=Period.parse(options["period"]),
                actor=Actor.system("bill_period"),
                account_ids=account_ids,
                dry_run=options["dry_run"],
                run_rollup=not options["no_rollup"],
                render_pdfs=not options["no_pdfs"],
                chunk_size=max(1, options["chunk_size"]),
            )
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(report.summary())
