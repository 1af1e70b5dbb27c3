from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from metering import rollup


class Command(BaseCommand):
    help = "Roll up and rate everything pending (all shards), print what was done, and exit."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--shard", type=int, action="append", help="Only these shards (repeatable).")

    def handle(self, *args: Any, shard: list[int] | None = None, **options: Any) -> None:
        report = rollup.rollup(shards=shard)
        self.stdout.write(report.summary())
