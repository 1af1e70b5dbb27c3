"""A staff member lost their authenticator device (and their backup codes): delete their
second-factor devices so that, after their password at the next sign-in, they enrol a new one.
Their open sessions lose the second factor at once. One log line (``operator.second_factor_reset``)
records whose, by whom and why."""

from __future__ import annotations

import getpass
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import services
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError


class Command(BaseCommand):
    help = "Reset a staff member's second factor (a lost device): they enrol a new one at their next sign-in."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True, help="The staff member's login.")
        parser.add_argument(
            "--reason", required=True, help="Why (kept in the log line), e.g. 'phone lost, ticket 1234'."
        )

    def handle(self, *args: Any, email: str, reason: str, **options: Any) -> None:
        actor = Actor.system(f"operator_reset_second_factor:{getpass.getuser()}")
        try:
            deleted = services.operator_second_factor_reset(email=email, actor=actor, reason=reason)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"Second factor reset for {email}: {deleted} device(s) deleted; "
            "they set up a new one at their next sign-in."
        )
