"""Structured logs: the line of a transition, an ingest batch and a rollup shard, as an operator
reads them; both formats; and no secret in anything logged along a customer's first steps."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import pytest
import time_machine
from rest_framework.test import APIClient

from accounts import services
from accounts.models import BillingAccount
from billing_site.common.actors import Actor
from billing_site.common.logs import JsonFormatter, TextFormatter, fields_of, mask_email
from conftest import client_with_key
from metering import rollup

NOW = dt.datetime(2026, 11, 3, 12, 30, tzinfo=dt.UTC)


def record(event: str, **fields: Any) -> logging.LogRecord:
    made = logging.getLogger("accounts.services").makeRecord(
        "accounts.services", logging.INFO, __file__, 1, event, (), None, extra=fields
    )
    made.created = NOW.timestamp()
    return made


def only(caplog: pytest.LogCaptureFixture, event: str) -> logging.LogRecord:
    found = [r for r in caplog.records if r.getMessage() == event]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    return found[0]


def usage(account: BillingAccount | str, event_id: str, quantity: str = "1.5") -> dict[str, Any]:
    return {
        "id": event_id,
        "account_id": account if isinstance(account, str) else account.public_id,
        "time": "2026-11-03T10:15:00Z",
        "type": "usage",
        "sku": "network.egress",
        "quantity": quantity,
    }


def test_a_record_as_a_key_value_line_and_as_one_json_object() -> None:
    line = record("account.transition", account_id="acc_0k3x9m2q7t1vb", **{"from": "pending", "to": "active"})
    assert TextFormatter().format(line) == (
        "2026-11-03T12:30:00.000Z INFO accounts.services event=account.transition "
        "account_id=acc_0k3x9m2q7t1vb from=pending to=active"
    )
    assert json.loads(JsonFormatter().format(line)) == {
        "time": "2026-11-03T12:30:00.000Z",
        "level": "info",
        "logger": "accounts.services",
        "event": "account.transition",
        "account_id": "acc_0k3x9m2q7t1vb",
        "from": "pending",
        "to": "active",
    }


def test_values_are_quoted_so_a_value_never_fakes_a_field_or_a_line() -> None:
    from decimal import Decimal

    line = record("x", reason="paid late\nlevel=error", amount=Decimal("489.45"), shards=[1, 2], empty="", none=None)
    text = TextFormatter().format(line)
    assert text.endswith('event=x reason="paid late\\nlevel=error" amount=489.45 shards=1,2 empty="" none=null'), text
    assert "\n" not in text
    body = json.loads(JsonFormatter().format(line))
    assert body["amount"] == "489.45" and body["shards"] == [1, 2]  # money stays exact


def test_a_field_never_replaces_the_core_keys_of_a_json_line() -> None:
    body = json.loads(JsonFormatter().format(record("account.create", time="forged", logger="forged")))
    assert body["time"] == "2026-11-03T12:30:00.000Z" and body["logger"] == "accounts.services"


def test_celery_task_records_carry_no_arguments() -> None:
    # Celery's "Task … succeeded" and "received" records carry the task's kwargs as ``data``.
    line = logging.getLogger("celery.app.trace").makeRecord(
        "celery.app.trace",
        logging.INFO,
        __file__,
        1,
        "Task %(name)s[%(id)s] succeeded",
        ({"name": "invoicing.close_period", "id": "t-1"},),
        None,
        extra={"data": {"kwargs": "{'operator_email': 'ops.person@example.test'}"}},
    )
    for formatter in (TextFormatter(), JsonFormatter()):
        rendered = formatter.format(line)
        assert "invoicing.close_period[t-1] succeeded" in rendered and "ops.person" not in rendered


def test_emails_are_masked() -> None:
    assert mask_email("john.doe@example.com") == "j***@example.com"
    assert mask_email("@example.com") == "***@example.com"
    assert mask_email("not-an-email") == "***"
    assert mask_email("") == ""


def test_log_format_follows_the_setting_and_debug() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def formatter(**env: str) -> str:
        clean = {k: v for k, v in os.environ.items() if k not in {"LOG_FORMAT", "DEBUG"}}
        code = "import django, logging; django.setup(); print(type(logging.getLogger().handlers[0].formatter).__name__)"
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**clean, "DJANGO_SETTINGS_MODULE": "billing_site.settings.base", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    assert formatter(DEBUG="1") == "TextFormatter"
    assert formatter(DEBUG="0") == "JsonFormatter"
    assert formatter(DEBUG="1", LOG_FORMAT="json") == "JsonFormatter"
    assert formatter(DEBUG="0", LOG_FORMAT="text") == "TextFormatter"


@pytest.mark.django_db
def test_an_account_transition_is_one_line_with_the_account_and_both_states(
    caplog: pytest.LogCaptureFixture, account: BillingAccount
) -> None:
    staff = services.operator_create(email="ops.person@example.test", password="an-operator-passphrase", groups=[])
    caplog.set_level(logging.INFO, logger="billing_site.common.transitions")
    operator = Actor.operator(staff.id, staff.email)
    services.billing_account_transition(account_id=account.id, transition="activate", actor=operator)
    line = only(caplog, "account.transition")
    # Logged by the one transition helper every state machine uses.
    assert line.name == "billing_site.common.transitions" and line.levelno == logging.INFO
    assert fields_of(line) == {
        "account_id": account.public_id,
        "cause": "staff",
        "transition": "activate",
        "from": "pending",
        "to": "active",
        "actor_kind": "operator",
        "actor_user_id": staff.id,  # the operator's id, never their email
    }
    assert "ops.person" not in TextFormatter().format(line)


@pytest.mark.django_db
def test_an_ingest_batch_is_one_line_with_its_counts(
    caplog: pytest.LogCaptureFixture, catalog: None, producer: APIClient, account: BillingAccount
) -> None:
    events = [usage(account, "e-1"), usage(account, "e-2"), {**usage(account, "e-3"), "sku": "no.such.sku"}]
    caplog.set_level(logging.INFO, logger="metering")
    with time_machine.travel(NOW, tick=False):
        producer.post("/api/v1/usage/events", {"events": events[:1]}, format="json")
        caplog.clear()
        response = producer.post("/api/v1/usage/events", {"events": events}, format="json")
    assert response.status_code == 200
    line = only(caplog, "ingest.batch")
    assert line.name == "metering.ingest"
    fields = fields_of(line)
    assert {k: fields[k] for k in ("events", "accepted", "duplicates", "rejected")} == {
        "events": 3,
        "accepted": 1,
        "duplicates": 1,
        "rejected": 1,
    }
    assert isinstance(fields["duration_ms"], int) and fields["duration_ms"] >= 0


@pytest.mark.django_db(transaction=True)
def test_each_rollup_shard_that_did_work_is_one_line_with_events_and_duration(
    caplog: pytest.LogCaptureFixture, catalog: None, producer: APIClient, account: BillingAccount
) -> None:
    with time_machine.travel(NOW, tick=False):
        producer.post("/api/v1/usage/events", {"events": [usage(account, "e-1"), usage(account, "e-2")]}, format="json")
    shard = rollup.shard_of(account.id)
    caplog.set_level(logging.INFO, logger="metering")
    rollup.rollup(now=NOW)
    lines = [r for r in caplog.records if r.getMessage() == "rollup.shard"]
    assert [fields_of(r)["shard"] for r in lines] == [shard]  # idle shards are DEBUG lines
    fields = fields_of(lines[0])
    assert fields["events"] == 2 and fields["usage_rows"] == 1 and fields["rated_rows"] == 1
    assert fields["watermark"] == dt.datetime(2026, 11, 3, 12, tzinfo=dt.UTC)
    assert isinstance(fields["duration_ms"], int) and fields["horizon"] > 0
    run = only(caplog, "rollup.run")
    assert fields_of(run)["events"] == 2 and fields_of(run)["shards"] == rollup.SHARDS


@pytest.mark.django_db
def test_no_key_password_or_email_in_the_logs_of_a_customers_first_steps(
    caplog: pytest.LogCaptureFixture, catalog: None
) -> None:
    email, password = "Jane.Roe@Example.test", "a-long-and-secret-passphrase-42"
    caplog.set_level(logging.DEBUG)  # everything any logger says
    with time_machine.travel(NOW, tick=False):
        signup = APIClient().post("/api/v1/users", {"email": email, "password": password}, format="json")
        assert signup.status_code == 201
        first_key = signup.json()["api_key"]
        again = APIClient().post("/api/v1/users", {"email": email, "password": password}, format="json")
        assert again.status_code == 409  # a warning from django.request, too
        jane = client_with_key(first_key)
        created = jane.post("/api/v1/api-keys", {"name": "ci"}, format="json")
        assert created.status_code == 201
        second_key = created.json()["api_key"]
        account = jane.post(
            "/api/v1/billing-accounts",
            {
                "name": "Jane Roe",
                "email": email,
                "kind": "individual",
                "country": "NL",
                "currency": "EUR",
                "address": {"line1": "Dam 1", "city": "Amsterdam", "postal_code": "1012 JS"},
            },
            format="json",
        )
        assert account.status_code == 201, account.json()
        account_id = account.json()["id"]
        service = services.service_key_create(name="producer-2", scopes=["usage:write"], created_by_id=None)
        ingested = client_with_key(service.raw).post(
            "/api/v1/usage/events",
            {"events": [usage(account_id, "e-1")]},
            format="json",
        )
        assert ingested.status_code == 200 and ingested.json()["accepted"] == 1
        assert jane.delete(f"/api/v1/api-keys/{created.json()['id']}").status_code == 204

    events = {r.getMessage() for r in caplog.records}
    assert {"user.signup", "api_key.create", "account.create", "ingest.batch", "api_key.revoke"} <= events
    rendered = "\n".join(f.format(r) for r in caplog.records for f in (TextFormatter(), JsonFormatter()))
    for secret in (first_key, second_key, service.raw, password, email, email.lower()):
        assert secret not in rendered
    assert "j***@example.test" in rendered  # the signup line says who, masked
