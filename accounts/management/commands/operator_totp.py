"""The code a demo operator's authenticator app would show now (DEBUG only): the demo publishes
its operators' TOTP secrets, so that a newcomer signs in without a phone. Never in production,
where the secret is the operator's alone."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import normalize_email


class Command(BaseCommand):
    help = "Print a demo operator's current TOTP code (DEBUG only)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True, help="The operator's login.")
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off (never in production).")

    def handle(self, *args: Any, email: str, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("Codes are printed for demo operators only: DEBUG must be on (or --force).")
        device = TOTPDevice.objects.filter(user__email=normalize_email(email), confirmed=True).first()
        if device is None:
            raise CommandError(f"{email} has no authenticator device.")
        code = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits, drift=device.drift)
        self.stdout.write(f"{code:0{device.digits}d}")
