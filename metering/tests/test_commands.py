from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import BillingAccount
from metering.models import Sku, UsageEvent

pytestmark = pytest.mark.django_db


def test_demo_usage_goes_through_the_endpoint_and_is_rerunnable() -> None:
    call_command("load_demo_data", "--force", stdout=StringIO())
    out = StringIO()
    call_command("load_demo_usage", "--force", stdout=out)
    assert "0 rejected" in out.getvalue() and Sku.objects.count() == 6
    acme = BillingAccount.objects.get(name="Acme Cloud BV")
    events = UsageEvent.objects.filter(account_id=acme.id)
    kinds = set(events.values_list("kind", "action"))
    assert {("resource", "start"), ("resource", "update"), ("resource", "stop"), ("usage", None)} <= kinds
    assert events.filter(sku="network.egress").count() > 600  # hourly for a month
    total = UsageEvent.objects.count()
    again = StringIO()
    call_command("load_demo_usage", "--force", stdout=again)
    assert "skipped" in again.getvalue()
    assert UsageEvent.objects.count() == total


def test_demo_usage_refuses_with_debug_off() -> None:
    with pytest.raises(CommandError, match="DEBUG"):
        call_command("load_demo_usage", stdout=StringIO())
