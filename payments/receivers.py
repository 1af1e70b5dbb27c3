"""What the payments app answers when other apps ask (they import nothing of payments):
``ledger_check``'s per-payment invariant, through ``invoicing.signals.ledger_checking``."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from invoicing.signals import ledger_checking
from payments import selectors


@receiver(ledger_checking, dispatch_uid="payments.beyond_captured")
def payments_within_captured(sender: Any, **kwargs: Any) -> list[str]:
    return selectors.payments_beyond_captured()
