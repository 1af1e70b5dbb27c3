"""Ask the gateway about payments whose outcome is unknown or whose worker died mid-call
(what beat runs every minute), print what was found, and exit."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from payments import charging


class Command(BaseCommand):
    help = "Resolve unknown and stale payments by asking their gateway (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        counts = charging.payments_reconcile()
        self.stdout.write(", ".join(f"{key}: {value}" for key, value in counts.items()))
