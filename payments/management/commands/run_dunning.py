"""Apply the dunning policy now (what beat runs daily at 06:00 UTC), print what it did, and
exit. Safe to run again or beside the beat task: each step is done once per case."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from payments import dunning


class Command(BaseCommand):
    help = "Run dunning: retries, warnings, suspensions and write-offs that are due (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        counts = dunning.dunning_run()
        self.stdout.write(", ".join(f"{key}: {value}" for key, value in counts.items()))
