"""``make demo``'s last words: the login, both keys and curl lines that work as printed, all at
the end; money as money in the period close; the embedded PostgreSQL stopped when it ends."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from django.core.management import call_command
from django.test import Client

from accounts.tests.test_second_factor import sign_in
from billing_site import database
from conftest import ROOT, client_with_key, database_url, free_port, wait_for
from invoicing import ledger
from payments.models import Payment

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)
SITE = "http://127.0.0.1:8000"
OPERATOR_EMAILS = (
    "operator@demo.test",
    "support@demo.test",
    "finance@demo.test",
    "finance2@demo.test",
    "fraud@demo.test",
    "readonly@demo.test",
)


def run(command: str) -> str:
    out = StringIO()
    call_command(command, "--force", stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)  # the rollup takes only committed events
def test_the_demo_prints_the_login_both_keys_and_working_curl_lines_together_at_the_end() -> None:
    with time_machine.travel(NOW, tick=False):
        loading = {
            name: run(name)
            for name in (
                "load_demo_data",
                "load_demo_usage",
                "load_demo_invoices",
                "load_demo_payments",
                "load_demo_fraud",
            )
        }
        access = run("demo_access")

        for name, out in loading.items():  # nothing to copy from the middle of the output
            assert "bku_" not in out and "bks_" not in out and "curl -H" not in out, name
        invoices = loading["load_demo_invoices"]
        assert "minor units" not in invoices
        assert re.search(
            r"Period close 2026-10: .* issued 4 invoices \(\d+\.\d\d EUR, \d+\.\d\d GBP, \d+\.\d\d USD\)", invoices
        )
        assert re.search(r"INV-2026-\d{6} Acme Cloud BV: total \d+\.\d\d EUR, domestic, PDF stored", invoices)

        # One paid, one declined and in dunning, one suspended for its unpaid invoice.
        payments = loading["load_demo_payments"]
        assert re.search(
            r"Acme Cloud BV \(acc_\w+\): visa •••• 4242; last charge paid \d+\.\d\d EUR; nothing owed", payments
        )
        assert re.search(
            r"Globex GmbH .* last charge failed \(card_declined\); INV-\S+ owes .*dunning: retrying; account active",
            payments,
        )
        assert re.search(
            r"Hooli Inc .* last charge failed \(lost_card\); INV-\S+ owes .*dunning: suspended; account suspended",
            payments,
        )
        again = run("load_demo_payments")  # idempotent: nothing bound or charged twice
        assert "0 retried, 0 suspended" in again
        # Acme's charge, and Northwind's threshold invoice (load_demo_fraud, below): nothing twice.
        assert Payment.objects.filter(status="succeeded").count() == 2
        assert ledger.check() == []

        # The fraud ring is caught and queued for review; the honest newcomers are let in.
        fraud = loading["load_demo_fraud"]
        assert re.search(r"Hashpower Three BV \(acc_\w+\): account blocked, blocked with the fraud team", fraud)
        assert re.search(r"Hashpower One BV \(acc_\w+\): account active, review with the fraud team", fraud)
        assert re.search(r"Northwind Traders BV \(acc_\w+\): account active, clear with the fraud team", fraud)
        # Its GPU box passes the credit limit: an early invoice, charged to its card at once.
        assert re.search(
            r"Threshold billing: Northwind Traders BV \(acc_\w+\) passed its credit limit of 500\.00 EUR: "
            r"threshold invoice \S+ of 665\.02 EUR, paid; account active",  # 240 GPU-hours at 2.29, VAT 21 %
            fraud,
        ), fraud
        assert run("load_demo_fraud").count("Threshold billing:") == 1  # idempotent: one threshold invoice

        assert f"{SITE}/admin/  login operator@demo.test / demo-operator-2026" in access
        # Every demo operator gets in at once with what is printed: the password, then the code
        # the printed command gives (or a printed backup code).
        assert "manage.py operator_totp --email" in access
        for email in OPERATOR_EMAILS:
            (row,) = [line.split() for line in access.splitlines() if line.strip().startswith(email + " ")]
            code = StringIO()
            call_command("operator_totp", "--email", email, "--force", stdout=code)
            browser = Client()
            signed_in = sign_in(browser, email, "demo-operator-2026", code=code.getvalue().strip())
            assert signed_in.status_code == 302 and browser.get("/admin/").status_code == 200, email
            backup = row[row.index("codes") + 1]
            other = Client()
            assert sign_in(other, email, "demo-operator-2026", backup=backup).status_code == 302, email
        (key,) = set(re.findall(r"bku_[A-Za-z0-9_-]+", access))
        (producer,) = set(re.findall(r"bks_[A-Za-z0-9_-]+", access))
        curls = [shlex.split(line) for line in access.splitlines() if line.strip().startswith("curl ")]
        assert len(curls) == 4
        for argv in curls:
            token = argv[argv.index("-H") + 1].removeprefix("Authorization: Bearer ")
            url = argv[-1].removeprefix(SITE)
            client = client_with_key(token)
            if "-d" in argv:
                assert token == producer
                response = client.post(url, json.loads(argv[argv.index("-d") + 1]), format="json")
                assert response.status_code == 200 and response.json()["accepted"] == 1, response.json()
            else:
                assert token == key
                response = client.get(url)
                assert response.status_code == 200, (url, response.content[:300])
                body = response.json()
                assert body.get("results") or body.get("rows"), url  # accounts, invoices; costs


def test_stopping_the_embedded_server_forgets_processes_that_died_and_spares_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(database, "EMBEDDED_DATA_DIR", tmp_path)
    assert database.embedded_stop() == "embedded PostgreSQL: not running"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "postmaster.pid").write_text(f"{dead_pid}\n{tmp_path}\n")
    users = tmp_path / ".handle_pids.json"
    # runserver's child, killed by the reloader before it could leave the list, and a shell
    # that still uses the server
    users.write_text(json.dumps([dead_pid, os.getppid()]))
    assert database.embedded_stop() == f"embedded PostgreSQL: left running, still used by processes [{os.getppid()}]"
    assert json.loads(users.read_text()) == [os.getppid()]

    users.write_text(json.dumps([dead_pid]))
    assert database.embedded_stop() == "embedded PostgreSQL: not running"  # its postmaster is gone too
    assert json.loads(users.read_text()) == []


def test_nothing_is_stopped_when_the_database_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://billing@db.internal:5432/billing")
    assert database.embedded_stop() == "DATABASE_URL is set: no embedded PostgreSQL to stop"


@pytest.mark.redis  # make demo starts a redis-server of its own
@pytest.mark.django_db(transaction=True)
def test_make_demo_runs_the_pipeline_usage_sent_after_start_is_in_the_costs_within_a_minute(
    catalog: None, tmp_path: Path
) -> None:
    """What ``make demo`` starts once its data is loaded (``make demo-serve``: a redis-server of
    its own, a worker, beat, runserver on the chosen port), against the test database: the
    printed producer curl line, sent after start, shows in the printed costs curl line within a
    minute; Ctrl-C stops every process it started."""
    if shutil.which("redis-server") is None or shutil.which("curl") is None or shutil.which("make") is None:
        pytest.skip("needs redis-server, curl and make")
    run("load_demo_data")  # the accounts and operator demo_access prints keys for
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DJANGO_SETTINGS_MODULE")
    }
    env.update(DATABASE_URL=database_url(), LOG_FORMAT="text")
    demo = subprocess.Popen(
        ["make", "--no-print-directory", "demo-serve", f"PORT={port}", f"DEMO_LOGS={tmp_path}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the test's Ctrl-C reaches what it started
        # As from a terminal: SIGINT at its default, whatever the test process inherited (a child
        # whose parent ignores SIGINT starts with it ignored, and runserver would not see Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(demo.stdout or []), daemon=True)
    reader.start()
    try:

        def printed(text: str) -> bool:
            return any(text in line for line in list(output)) or demo.poll() is not None

        assert wait_for(lambda: printed("Usage sent now"), 240) and demo.poll() is None, "".join(output)
        site = f"http://127.0.0.1:{port}"
        curls = [shlex.split(line) for line in list(output) if line.strip().startswith("curl ")]
        (send,) = [argv for argv in curls if "-d" in argv]
        (costs,) = [argv for argv in curls if "/costs?" in argv[-1]]
        assert send[-1].startswith(site) and costs[-1].startswith(site)

        def answers() -> bool:
            probe = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{site}/api/docs/"],
                capture_output=True,
                text=True,
            )
            return probe.stdout == "200"

        assert wait_for(answers, 60), "".join(output)
        before = json.loads(subprocess.run([*costs, "-s"], capture_output=True, text=True, check=True).stdout)
        assert not [row for row in before["rows"] if row["sku"] == "network.egress"]

        sent = subprocess.run([*send, "-s"], capture_output=True, text=True, check=True)
        assert json.loads(sent.stdout)["accepted"] == 1, sent.stdout
        started = time.monotonic()

        def egress_in_costs() -> bool:
            body = json.loads(subprocess.run([*costs, "-s"], capture_output=True, text=True, check=True).stdout)
            return [row["quantity"] for row in body["rows"] if row["sku"] == "network.egress"] == ["1.5"]

        assert wait_for(egress_in_costs, 60), "".join(output)
        assert time.monotonic() - started <= 60
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        demo.wait(120)
        reader.join(10)
    (pipeline,) = [line for line in output if line.startswith("Pipeline:")]
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", pipeline)]
    assert len(pids) == 3  # redis-server, worker, beat

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_for(lambda: all(gone(pid) for pid in pids), 30), pipeline
