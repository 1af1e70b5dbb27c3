from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import catalog, services


class Command(BaseCommand):
    help = "Load SKUs and prices from a catalog JSON file. Idempotent; a bad file loads nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)

    def handle(self, *args: Any, file: Path, **options: Any) -> None:
        try:
            document = catalog.parse(file.read_bytes())
            result = services.catalog_load(document=document)
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc}") from exc
        except catalog.CatalogError as exc:
            raise CommandError(f"{file}: {exc} (nothing was loaded)") from exc
        self.stdout.write(
            f"{file}: SKUs {result.skus_created} created, {result.skus_updated} updated, "
            f"{result.skus_unchanged} unchanged; prices {result.prices_created} created, "
            f"{result.prices_unchanged} unchanged"
        )
