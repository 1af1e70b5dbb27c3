"""The outbox's promise, with a real crash: a process that commits a state change and its side
effect, then dies before delivering it, loses nothing; the periodic drain delivers it, once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core import mail
from django.db import connections

from accounts.models import AccountState, BillingAccount
from accounts.tests.factories import BillingAccountFactory
from billing_site.outbox import services as outbox
from billing_site.outbox.models import OutboxMessage
from conftest import ROOT, database_url

# The child: suspend-for-debt's shape (a state change, an account transition queued and an email
# queued, in one transaction); its first on-commit callback kills it, so the outbox's own
# prompt delivery, registered after, never runs: the crash between commit and enqueue.
CHILD = """
import os, django
django.setup()
from django.db import transaction
from billing_site.outbox import services as outbox
with transaction.atomic():
    transaction.on_commit(lambda: os._exit(0))
    outbox.enqueue_task(
        "payments.account_suspend", account_id={account_id}, reason="debt", dedupe_key="crash:{account_id}"
    )
    outbox.enqueue_email(
        "payments/email/account_suspended", to="ap@crash.test", account_id={account_id},
        context={{"account_name": "Crash BV", "invoice_number": "INV-1"}}, dedupe_key="crash-mail:{account_id}",
    )
raise SystemExit("not reached: the process died at commit")
"""


@pytest.mark.django_db(transaction=True)
def test_a_crash_between_commit_and_delivery_loses_nothing_and_the_drain_delivers_once() -> None:
    account: BillingAccount = BillingAccountFactory(state=AccountState.ACTIVE)  # type: ignore[assignment]
    env = {**os.environ, "DATABASE_URL": database_url(), "DJANGO_SETTINGS_MODULE": "billing_site.settings.test"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(account_id=account.id)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]  # os._exit(0) at commit, not the SystemExit
    connections.close_all()

    pending = list(OutboxMessage.objects.filter(account_id=account.id).order_by("id"))
    assert [(m.kind, m.delivered_at) for m in pending] == [("task", None), ("email", None)]
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE  # committed, not yet delivered
    assert mail.outbox == []

    assert outbox.drain() == 2  # the periodic task, after the restart
    account.refresh_from_db()
    assert account.state == AccountState.SUSPENDED
    assert [m.to for m in mail.outbox] == [["ap@crash.test"]]
    assert mail.outbox[0].extra_headers["Message-ID"].startswith(f"<outbox-{pending[1].id}@")
    assert outbox.drain() == 0  # delivered once
    assert len(mail.outbox) == 1
    assert OutboxMessage.objects.filter(account_id=account.id, delivered_at__isnull=True).count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_side_effect_is_never_delivered() -> None:
    from django.db import transaction

    account: BillingAccount = BillingAccountFactory(state=AccountState.ACTIVE)  # type: ignore[assignment]
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.enqueue_task("payments.account_suspend", account_id=account.id, reason="debt")
        raise RuntimeError("the state change failed")
    assert not OutboxMessage.objects.exists()
    assert outbox.drain() == 0
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE
