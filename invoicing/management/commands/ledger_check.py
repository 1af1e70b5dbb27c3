"""python manage.py ledger_check: verify the ledger's invariants; exit 1 on any violation."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from invoicing import ledger


class Command(BaseCommand):
    help = (
        "Check every ledger invariant (balanced entries, one posting per source, receivables and credit "
        "matching the documents, gapless numbers, each closed usage month billed exactly as rated). "
        "Exits 1 and lists the violations if any fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--usage-since",
            metavar="YYYY-MM",
            help="compare billed with rated usage for usage months from this one (default: twelve months ago)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        since = None
        if options["usage_since"]:
            try:
                since = dt.datetime.strptime(options["usage_since"], "%Y-%m").date()
            except ValueError as exc:
                raise CommandError(f"--usage-since: '{options['usage_since']}' is not a month (YYYY-MM)") from exc
        problems = ledger.check(usage_since=since)
        if problems:
            for problem in problems:
                self.stderr.write(problem)
            self.stderr.write(f"{len(problems)} ledger violations")
            raise SystemExit(1)
        self.stdout.write("ledger ok")
