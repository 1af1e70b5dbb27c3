import secrets
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts import services


class Command(BaseCommand):
    help = "Create or update a staff login for the admin, in operator groups; prints the password."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("--group", action="append", default=[], choices=sorted(services.OPERATOR_GROUPS))
        parser.add_argument("--superuser", action="store_true")
        parser.add_argument("--password", help="Default: a random one, printed.")

    def handle(self, *args: Any, email: str, group: list[str], superuser: bool, password: str | None, **o: Any) -> None:
        password = password or secrets.token_urlsafe(12)
        user = services.operator_create(email=email, password=password, groups=group, superuser=superuser)
        self.stdout.write(f"Operator {user.email} / {password}  groups: {', '.join(group) or '-'}")
