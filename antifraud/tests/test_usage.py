"""Checkpoint 4: new accounts' spend velocity from the hourly rollup, set-based, each account
assessed at most once a day."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from decimal import Decimal

import pytest
import time_machine
from django.db import connection

from accounts.models import BillingAccount
from antifraud import services
from antifraud.models import AccountRisk, AccountSignal, RiskAssessment, RiskStatus
from antifraud.tests.test_checkpoints import NL_IP, open_account
from conftest import Customer

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


pytestmark = pytest.mark.clock(NOW)


def hourly(account: BillingAccount, hours: range, sku: str, quantity: str, amount: str) -> None:
    """Rated usage in the hourly rollup, as the rollup leaves it: one row per hour."""
    with connection.cursor() as cursor:
        for h in hours:
            cursor.execute(
                "INSERT INTO metering_hourlyusage (account_id, hour, sku, resource_id, labels, quantity, amount) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    account.id,
                    NOW + dt.timedelta(hours=h),
                    sku,
                    "r1",
                    json.dumps({}),
                    Decimal(quantity),
                    Decimal(amount),
                ],
            )


@pytest.mark.django_db
def test_a_new_account_burning_gpu_hours_is_flagged_and_its_typical_peers_are_not(
    make_customer: Callable[..., Customer], clock: time_machine.Traveller
) -> None:
    peers = [open_account(make_customer(), NL_IP, name=f"Peer {i} BV", email=f"ap@peer{i}.test") for i in range(3)]
    for peer in peers:
        hourly(peer, range(24), "compute.vcpu", "4", "0.05")  # 1.20 EUR a day
    miner = open_account(make_customer(), NL_IP, name="Miner BV", email="ap@miner.test")
    hourly(miner, range(24), "compute.gpu.a100", "4", "12.00")  # 96 GPU-hours, 288 EUR
    old = open_account(make_customer(), NL_IP, name="Old BV", email="ap@old.test")
    AccountSignal.objects.filter(account_id=old.id).update(created_at=NOW - dt.timedelta(days=8))
    hourly(old, range(24), "compute.gpu.a100", "4", "12.00")

    clock.move_to(NOW + dt.timedelta(hours=25))
    report = services.usage_sweep()
    assert report == {"accounts": 4, "assessed": 1}  # the old account is not new any more
    assessment = RiskAssessment.objects.get(account_id=miner.id, checkpoint="usage")
    (fired,) = assessment.fired
    assert fired["rule"] == "spend_velocity"
    assert fired["evidence"]["first_day_gpu_hours"] == "96.0"
    assert any("GPU-hours" in why for why in fired["evidence"]["why"])
    assert any("typical new account" in why for why in fired["evidence"]["why"])
    assert assessment.decision == "review"
    assert AccountRisk.objects.get(account_id=miner.id).status == RiskStatus.REVIEW

    assert services.usage_sweep()["assessed"] == 0  # once a day
    clock.move_to(NOW + dt.timedelta(hours=50))
    assert services.usage_sweep()["assessed"] == 1


@pytest.mark.django_db
def test_spend_beyond_twice_the_credit_limit_fires(customer: Customer, clock: time_machine.Traveller) -> None:
    account = open_account(customer, NL_IP)
    BillingAccount.objects.filter(id=account.id).update(credit_limit=Decimal("100"))
    hourly(account, range(10), "compute.vcpu", "10", "20.00")  # 200 EUR: not beyond 2 x 100
    clock.move_to(NOW + dt.timedelta(hours=30))
    assert services.usage_sweep()["assessed"] == 0
    hourly(account, range(10, 11), "compute.vcpu", "1", "0.01")
    assert services.usage_sweep()["assessed"] == 1
    evidence = RiskAssessment.objects.get(account_id=account.id, checkpoint="usage").fired[0]["evidence"]
    assert evidence["why"] == ["spend 200.01 > 2 x the credit limit 100.00"]
