"""python manage.py ledger_check: verify the ledger's invariants; exit 1 on any violation."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from invoicing import ledger


class Command(BaseCommand):
    help = "Check every ledger invariant (balanced entries, one posting per source, receivables and credit "
    "matching the documents, gapless numbers). Exits 1 and lists the violations if any fails."

    def handle(self, *args: Any, **options: Any) -> None:
        problems = ledger.check()
        if problems:
            for problem in problems:
                self.stderr.write(problem)
            self.stderr.write(f"{len(problems)} ledger violations")
            raise SystemExit(1)
        self.stdout.write("ledger ok")
