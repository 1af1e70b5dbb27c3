"""Exactly once under re-runs, two runs at once and a run killed half-way; gapless numbers
under concurrent issuing. These tests commit for real (``transaction=True``)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections, transaction

from accounts.models import BillingAccount
from conftest import (
    Customer,
    backend_alive,
    backend_terminate,
    backend_waiting,
    database_url,
    in_threads,
    manage_py,
    wait_for,
)
from invoicing import ledger, numbering, services
from invoicing.models import Invoice
from invoicing.tests.factories import rated
from invoicing.tests.support import FINANCE, NOW, OCTOBER

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.clock(NOW)]

NUMBERS = [f"INV-{NOW.year}-{n:06d}" for n in range(1, 7)]  # numbered in the year they are issued


@pytest.fixture
def accounts(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> list[BillingAccount]:
    made = [make_account(customer.user, currency="EUR", country="NL") for _ in range(6)]
    for i, account in enumerate(made):
        rated(account.id, "2026-10-02", "compute.vcpu", "100", f"{10 + i}.125")
        rated(account.id, "2026-10-09", "network.egress", "500", "36")
    return sorted(made, key=lambda a: a.id)


def content() -> dict[int, tuple[Any, ...]]:
    """What each account was invoiced, without ids, numbers and times."""
    result = {}
    for invoice in Invoice.objects.prefetch_related("lines"):
        lines = tuple((line.sku, line.quantity, line.amount_minor) for line in invoice.lines.all())
        result[invoice.account_id] = (
            invoice.status,
            invoice.subtotal_minor,
            invoice.tax_minor,
            invoice.total_minor,
            lines,
        )
    return result


def numbers() -> list[str]:
    return sorted(Invoice.objects.values_list("number", flat=True))


def close(chunk_size: int = 2) -> services.CloseReport:
    return services.period_close(
        period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False, chunk_size=chunk_size
    )


def test_two_runs_at_once_issue_one_invoice_per_account(accounts: list[BillingAccount]) -> None:
    reports = in_threads(2, lambda i: close(chunk_size=1 + i))
    assert not [r for r in reports if isinstance(r, Exception)], reports
    assert sum(r.issued for r in reports) == 6
    assert Invoice.objects.count() == 6
    assert numbers() == NUMBERS
    assert ledger.check() == []
    first = content()
    assert close().issued == 0 and content() == first  # and a third run changes nothing


def test_a_run_killed_half_way_then_rerun_gives_one_invoice_each_with_the_same_content(
    accounts: list[BillingAccount],
) -> None:
    blocker = accounts[3]  # the killed run commits chunks of accounts 0, 1, 2 and waits on 3's lock row
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
        "PGAPPNAME": "killed-billing",
        "DATABASE_URL": database_url(),
    }
    holder = connections.create_connection("default")
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("INSERT INTO invoicing_billinglock (account_id) VALUES (%s)", [blocker.id])
            worker = subprocess.Popen(
                manage_py("bill_period", OCTOBER.label, "--no-rollup", "--chunk-size", "1"),  # on the tests' clock
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                # It waits for the fourth account's lock row once the first three chunks are in (its
                # charges' threads may wait on a lock for a moment before that: not what we wait for).
                reached = wait_for(
                    lambda: (
                        (Invoice.objects.count() >= 3 and backend_waiting("killed-billing"))
                        or worker.poll() is not None
                    ),
                    seconds=60,
                )
                if worker.poll() is not None or not reached:
                    worker.kill()
                    output = worker.communicate(timeout=10)[0].decode(errors="replace")[-3000:]
                    raise AssertionError(f"the run never reached the fourth account's lock: {output!r}")
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
            finally:
                cursor.execute("ROLLBACK")
    finally:
        holder.close()
    backend_terminate("killed-billing")
    assert wait_for(lambda: not backend_alive("killed-billing"))
    assert Invoice.objects.count() == 3  # whole chunks only, nothing half-written
    assert ledger.check() == []
    report = close()
    assert (report.issued, report.already_issued) == (3, 3)
    assert numbers() == NUMBERS
    killed = content()
    # The same content as an uninterrupted run over the same usage.
    with connection.cursor() as cursor:
        # (TRUNCATE is not stopped by the ledger's append-only row trigger)
        cursor.execute("TRUNCATE invoicing_invoice, invoicing_documentsequence, invoicing_ledgerentry CASCADE")
    close()
    assert content() == killed


def test_numbers_stay_gapless_when_issuers_race_and_one_rolls_back(db: None) -> None:
    def issue(i: int) -> list[str]:
        taken: list[str] = []
        for round_ in range(10):
            try:
                with transaction.atomic():
                    got = numbering.take("RACE", 2026, 1 + (i + round_) % 3)
                    if (i + round_) % 4 == 0:
                        raise RuntimeError("issuing failed after taking numbers")  # rolled back: numbers return
                    taken += got
            except RuntimeError:
                pass
        return taken

    results = in_threads(4, issue)
    taken = [n for r in results for n in r]
    assert len(taken) == len(set(taken))
    assert sorted(taken) == [f"RACE-2026-{n:06d}" for n in range(1, len(taken) + 1)]
