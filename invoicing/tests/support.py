"""The invoicing tests' moment and periods: every invoicing test runs frozen at ``NOW``, two days
into November 2026, so October is the last closed month whatever the real date (a test moves the
clock on with the ``clock`` fixture or its own ``time_machine.travel``)."""

from __future__ import annotations

import datetime as dt

from django.test import Client

from billing_site.common.actors import Actor
from conftest import staff_login
from invoicing.periods import Period

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
OCTOBER = Period(dt.date(2026, 10, 1))
NOVEMBER = Period(dt.date(2026, 11, 1))
FINANCE = Actor.system("tests")


def operator(group: str) -> Client:
    """A browser logged in to the admin as a new operator of ``group`` (finance, support …)."""
    from accounts import services as account_services

    user = account_services.operator_create(email=f"{group}@ops.test", password="pw-long-enough", groups=[group])
    return staff_login(Client(), user)
