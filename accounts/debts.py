"""What a billing account owes, as the apps that know say: accounts imports no other app, so
the readers are named in ``ACCOUNTS_DEBT_READERS`` (dotted paths of other apps' selectors,
``reader(account_id=...) -> {currency: minor units owed}``; today invoicing's
``account_outstanding``). Asked before an account is closed or reactivated by staff."""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

from billing_site.common import money


def billing_account_debt(*, account_id: int) -> dict[str, int]:
    """Per currency, in minor units, what the account owes (only currencies with a debt)."""
    owed: dict[str, int] = {}
    for path in settings.ACCOUNTS_DEBT_READERS:
        reader = import_string(path)
        for currency, minor in reader(account_id=account_id).items():
            owed[currency] = owed.get(currency, 0) + int(minor)
    return {currency: minor for currency, minor in sorted(owed.items()) if minor > 0}


def debt_display(owed: dict[str, int]) -> str:
    """``{"USD": 72894, "EUR": 10043}`` → ``'100.43 EUR, 728.94 USD'`` (money as money)."""
    return ", ".join(f"{money.format_minor(minor, currency)} {currency}" for currency, minor in sorted(owed.items()))
