from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import AccountState, ApiKey, BillingAccount, BillingAccountTransition, User
from conftest import client_with_key

pytestmark = pytest.mark.django_db


def test_create_service_key_prints_a_working_scoped_key_once() -> None:
    out = StringIO()
    call_command(
        "create_service_key",
        "metering",
        "--scope",
        "usage:write",
        "--scope",
        "accounts:read",
        stdout=out,
        stderr=StringIO(),
    )
    raw = out.getvalue().strip()
    key = ApiKey.objects.get(name="metering")
    assert key.is_service and key.scopes == ["accounts:read", "usage:write"]
    assert raw.startswith("bks_") and raw not in (key.prefix, key.secret_hash)
    assert client_with_key(raw).get("/api/v1/billing-accounts").status_code == 200


def test_create_service_key_refuses_unknown_scopes() -> None:
    with pytest.raises(CommandError):
        call_command("create_service_key", "x", "--scope", "root", stdout=StringIO(), stderr=StringIO())
    assert not ApiKey.objects.exists()


def test_demo_data_covers_every_state_with_history_and_is_rerunnable() -> None:
    out = StringIO()
    call_command("load_demo_data", "--force", stdout=out)
    call_command("load_demo_data", "--force", stdout=StringIO())
    states = set(BillingAccount.objects.values_list("state", flat=True))
    assert states == {AccountState.PENDING, AccountState.ACTIVE, AccountState.BLOCKED, AccountState.CLOSED}
    assert BillingAccount.objects.count() == 6
    assert BillingAccountTransition.objects.filter(transition="suspend").exists()
    operator = User.objects.get(email="operator@demo.test")
    assert operator.is_staff and operator.check_password("demo-operator-2026")
    assert set(operator.groups.values_list("name", flat=True)) == {"support", "finance", "fraud"}
    assert "operator login operator@demo.test" in out.getvalue()  # the password: demo_access, tests/test_demo.py


def test_create_operator() -> None:
    out = StringIO()
    call_command("create_operator", "ops@example.test", "--group", "support", "--password", "pw-1234-long", stdout=out)
    user = User.objects.get(email="ops@example.test")
    assert user.is_staff and not user.is_superuser and user.check_password("pw-1234-long")
    assert user.has_perm("accounts.transition_billingaccount")
    assert not user.has_perm("accounts.block_billingaccount")


def test_demo_data_refuses_to_run_with_debug_off() -> None:
    with pytest.raises(CommandError, match="DEBUG"):
        call_command("load_demo_data", stdout=StringIO())
    assert not User.objects.filter(email="operator@demo.test").exists()
