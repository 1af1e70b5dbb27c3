"""The signup checkpoint, on the accounts app's signals. A failure of antifraud never fails
the customer's request: it is logged, and the card-binding checkpoint (which runs every rule
again) still stands between the account and its activation."""

from __future__ import annotations

import logging
from typing import Any

from django.db.backends.signals import connection_created
from django.dispatch import receiver

from accounts.signals import billing_account_opened, user_signed_up
from antifraud import rules, services
from billing_site.common import ids

log = logging.getLogger(__name__)


@receiver(user_signed_up, dispatch_uid="antifraud.user_signed_up")
def _user_signed_up(sender: Any, *, user_id: int, client_ip: str | None, **kwargs: Any) -> None:
    try:
        services.user_signup_record(user_id=user_id, ip=client_ip)
    except Exception:
        log.exception("antifraud.signup_record_failed", extra={"user_id": ids.encode("usr", user_id)})


@receiver(billing_account_opened, dispatch_uid="antifraud.billing_account_opened")
def _billing_account_opened(
    sender: Any, *, account_id: int, user_id: int | None, client_ip: str | None, **kwargs: Any
) -> None:
    try:
        services.signup_assess(account_id=account_id, user_id=user_id, ip=client_ip)
    except Exception:
        log.exception("antifraud.signup_assessment_failed", extra={"account_id": ids.encode("acc", account_id)})


@receiver(connection_created, dispatch_uid="antifraud.generic_plans")
def _connection_created(sender: Any, *, connection: Any, **kwargs: Any) -> None:
    rules.generic_plans(connection)
