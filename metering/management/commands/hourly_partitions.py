"""``manage.py hourly_partitions``: what the daily task ``metering.hourly_partitions_maintain`` does."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from metering import services


class Command(BaseCommand):
    help = (
        "Create the hourly usage's monthly partitions ahead (moving rows found in DEFAULT into them) and drop "
        "the months older than METERING_HOURLY_RETENTION_MONTHS whose daily rows are complete; print what was done."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Say what would be created and dropped; change nothing."
        )

    def handle(self, *args: Any, dry_run: bool = False, **options: Any) -> None:
        report = services.hourly_partitions_maintain(dry_run=dry_run)
        if dry_run or options.get("verbosity", 1) >= 2:
            self._list(report, dry_run=dry_run)
        for name in report.kept:  # always: someone must look
            self.stdout.write(f"kept {name} (past the retention; see the log)")
        self.stdout.write(report.summary())

    def _list(self, report: Any, *, dry_run: bool) -> None:
        for name in report.created:
            self.stdout.write(f"{'would create' if dry_run else 'created'} {name}")
        for name in report.dropped:
            self.stdout.write(f"{'would drop' if dry_run else 'dropped'} {name}")
