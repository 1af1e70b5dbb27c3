from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import services
from accounts.models import Scope
from billing_site.common.errors import ApplicationError


class Command(BaseCommand):
    help = "Create a service key for an internal producer and print it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--scope", action="append", required=True, choices=Scope.values, help="Repeat for several scopes."
        )

    def handle(self, *args: Any, name: str, scope: list[str], **options: Any) -> None:
        try:
            issued = services.service_key_create(name=name, scopes=scope, created_by_id=None)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"Service key {name} ({', '.join(issued.key.scopes)}); it is shown once:")
        self.stdout.write(issued.raw)
