"""``POST /api/v1/usage/events``: every validation code on its edge, partial acceptance,
exactly once within a batch, across batches and across concurrent requests."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from rest_framework.test import APIClient

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from conftest import Customer, client_with_key, in_threads
from metering.models import UsageEvent

pytestmark = pytest.mark.django_db


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def usage(account: BillingAccount, event_id: str = "u-1", **over: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "account_id": account.public_id,
        "time": iso(now() - dt.timedelta(minutes=1)),
        "type": "usage",
        "sku": "network.egress",
        "quantity": "1.5",
        **over,
    }


def resource(account: BillingAccount, event_id: str = "r-1", **over: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "account_id": account.public_id,
        "time": iso(now() - dt.timedelta(minutes=1)),
        "type": "resource",
        "resource_id": "vm-1",
        "action": "start",
        "spec": {"compute.vcpu": "2", "compute.ram": "4.5"},
        "labels": {"project": "web"},
        **over,
    }


def result(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    return response.json()


@time_machine.travel(dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.UTC), tick=False)  # half an hour after the event
def test_events_are_stored_exactly_as_sent(usage_account: BillingAccount, send: Callable) -> None:
    moment = dt.datetime(2026, 11, 25, 11, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    body = result(
        send(
            [
                resource(usage_account, time="2026-11-25T11:00:00+02:00"),
                usage(usage_account, resource_id="bucket-1", quantity="2.75", labels={"project": "data"}),
            ]
        )
    )
    assert body == {"accepted": 2, "duplicates": 0, "rejected": []}
    stored = {e.event_id: e for e in UsageEvent.objects.filter(account_id=usage_account.id)}
    vm = stored["r-1"]
    assert vm.occurred_at == moment and vm.occurred_at.utcoffset() == dt.timedelta(0)
    assert (vm.kind, vm.resource_id, vm.action, vm.sku, vm.quantity) == ("resource", "vm-1", "start", None, None)
    assert vm.spec == {"compute.vcpu": 2, "compute.ram": 4.5} and vm.labels == {"project": "web"}
    egress = stored["u-1"]
    assert (egress.sku, egress.quantity, egress.resource_id, egress.labels) == (
        "network.egress",
        Decimal("2.75"),
        "bucket-1",
        {"project": "data"},
    )


EDGES: list[tuple[str, Callable[[BillingAccount], dict[str, Any]], str | None, str]] = [
    # (name, event, expected code or None for accepted, a word the message must contain)
    ("id 128 chars", lambda a: usage(a, "x" * 128), None, ""),
    ("id 129 chars", lambda a: usage(a, "x" * 129), "invalid", "id"),
    ("empty id", lambda a: usage(a, ""), "invalid", "id"),
    ("id with NUL", lambda a: usage(a, "a\x00b"), "invalid", "id"),
    ("no offset", lambda a: usage(a, time="2026-11-25T10:00:00"), "invalid", "time"),
    ("not a time", lambda a: usage(a, time="yesterday"), "invalid", "time"),
    ("bad type", lambda a: usage(a, type="metric"), "invalid", "type"),
    ("unknown field", lambda a: usage(a, region="eu"), "invalid", "region"),
    ("quantity zero", lambda a: usage(a, quantity="0"), None, ""),
    ("quantity negative", lambda a: usage(a, quantity="-0.000000000001"), "invalid", "quantity"),
    ("quantity 12 digits", lambda a: usage(a, quantity="999999999999.999999999999"), None, ""),
    ("quantity 13 digits", lambda a: usage(a, quantity="1000000000000"), "invalid", "quantity"),
    ("quantity leading zeros", lambda a: usage(a, quantity="007.50"), None, ""),
    ("quantity 12 places", lambda a: usage(a, quantity="0.000000000001"), None, ""),
    ("quantity 13 places", lambda a: usage(a, quantity="0.0000000000001"), "invalid", "quantity"),
    ("quantity as number", lambda a: usage(a, quantity=3), "invalid", "decimal string"),
    ("quantity as float", lambda a: usage(a, quantity=2.5), "invalid", "decimal string"),
    ("quantity not a number", lambda a: usage(a, quantity="lots"), "invalid", "quantity"),
    ("quantity NaN", lambda a: usage(a, quantity="NaN"), "invalid", "quantity"),
    ("quantity sNaN", lambda a: usage(a, quantity="sNaN"), "invalid", "quantity"),
    ("quantity Infinity", lambda a: usage(a, quantity="Infinity"), "invalid", "quantity"),
    ("quantity exponent", lambda a: usage(a, quantity="1e3"), "invalid", "quantity"),
    ("quantity leading space", lambda a: usage(a, quantity=" 1"), "invalid", "quantity"),
    ("quantity spaces", lambda a: usage(a, quantity=" 2 "), "invalid", "quantity"),
    ("quantity trailing newline", lambda a: usage(a, quantity="1\n"), "invalid", "quantity"),
    ("quantity underscores", lambda a: usage(a, quantity="1_000"), "invalid", "quantity"),
    ("quantity Arabic-Indic digits", lambda a: usage(a, quantity="\u0661\u0662\u0663"), "invalid", "quantity"),
    ("quantity full-width digits", lambda a: usage(a, quantity="\uff11"), "invalid", "quantity"),
    ("quantity plus sign", lambda a: usage(a, quantity="+1"), "invalid", "quantity"),
    ("quantity bare point", lambda a: usage(a, quantity="1."), "invalid", "quantity"),
    ("quantity no integer part", lambda a: usage(a, quantity=".5"), "invalid", "quantity"),
    ("quantity bool", lambda a: usage(a, quantity=True), "invalid", "quantity"),
    ("usage without sku", lambda a: {k: v for k, v in usage(a).items() if k != "sku"}, "invalid", "sku"),
    ("usage with spec", lambda a: usage(a, spec={"compute.vcpu": "1"}), "invalid", "spec"),
    ("resource_id 256", lambda a: resource(a, resource_id="r" * 256), None, ""),
    ("resource_id 257", lambda a: resource(a, resource_id="r" * 257), "invalid", "resource_id"),
    ("bad action", lambda a: resource(a, action="pause"), "invalid", "action"),
    ("start without spec", lambda a: {k: v for k, v in resource(a).items() if k != "spec"}, "invalid", "spec"),
    ("stop without spec", lambda a: {k: v for k, v in resource(a, action="stop").items() if k != "spec"}, None, ""),
    ("negative spec", lambda a: resource(a, spec={"compute.vcpu": "-1"}), "invalid", "spec"),
    ("spec sNaN", lambda a: resource(a, spec={"compute.vcpu": "sNaN"}), "invalid", "spec"),
    ("spec as number", lambda a: resource(a, spec={"compute.vcpu": 2}), "invalid", "decimal string"),
    ("spec exponent", lambda a: resource(a, spec={"compute.vcpu": "2E0"}), "invalid", "spec"),
    ("resource with quantity", lambda a: resource(a, quantity="1"), "invalid", "quantity"),
    ("16 labels", lambda a: usage(a, labels={f"k{i}": "v" for i in range(16)}), None, ""),
    ("17 labels", lambda a: usage(a, labels={f"k{i}": "v" for i in range(17)}), "invalid", "labels"),
    ("label key 64", lambda a: usage(a, labels={"k" * 64: "v"}), None, ""),
    ("label key 65", lambda a: usage(a, labels={"k" * 65: "v"}), "invalid", "labels"),
    ("label value 256", lambda a: usage(a, labels={"k": "v" * 256}), None, ""),
    ("label value 257", lambda a: usage(a, labels={"k": "v" * 257}), "invalid", "labels"),
    ("label value not a string", lambda a: usage(a, labels={"k": 1}), "invalid", "labels"),
    ("malformed account", lambda a: usage(a, account_id="12345"), "invalid", "account_id"),
    ("unknown account", lambda a: usage(a, account_id="acc_0000000000001"), "unknown_account", "acc_0000000000001"),
    ("unknown sku", lambda a: usage(a, sku="compute.quantum"), "unknown_sku", "compute.quantum"),
    ("duration sku on usage", lambda a: usage(a, sku="compute.vcpu"), "unknown_sku", "duration"),
    ("quantity sku in spec", lambda a: resource(a, spec={"network.egress": "1"}), "unknown_sku", "network.egress"),
    ("35 days minus a minute", lambda a: usage(a, time=iso(now() - dt.timedelta(days=35, seconds=-60))), None, ""),
    (
        "35 days and a minute",
        lambda a: usage(a, time=iso(now() - dt.timedelta(days=35, seconds=60))),
        "too_old",
        "time",
    ),
    ("4 minutes ahead", lambda a: usage(a, time=iso(now() + dt.timedelta(minutes=4))), None, ""),
    ("6 minutes ahead", lambda a: usage(a, time=iso(now() + dt.timedelta(minutes=6))), "in_future", "time"),
]


@pytest.mark.parametrize(("name", "make", "code", "word"), EDGES, ids=[e[0] for e in EDGES])
def test_validation_edges(
    usage_account: BillingAccount, send: Callable, name: str, make: Callable, code: str | None, word: str
) -> None:
    event = make(usage_account)
    body = result(send([event]))
    if code is None:
        assert body == {"accepted": 1, "duplicates": 0, "rejected": []}
        return
    assert body["accepted"] == 0
    (rejection,) = body["rejected"]
    assert rejection["index"] == 0 and rejection["code"] == code, rejection
    assert word in rejection["message"], rejection
    assert rejection["id"] == (
        event["id"] if isinstance(event.get("id"), str) and "\x00" not in event["id"] else rejection["id"]
    )
    assert not UsageEvent.objects.filter(account_id=usage_account.id).exists()


def test_the_acceptance_window_follows_the_setting(
    usage_account: BillingAccount, send: Callable, settings: Any
) -> None:
    settings.METERING_MAX_EVENT_AGE_DAYS = 3
    body = result(send([usage(usage_account, time=iso(now() - dt.timedelta(days=4)))]))
    assert body["rejected"][0]["code"] == "too_old" and "3-day" in body["rejected"][0]["message"]


def test_bad_events_do_not_stop_good_ones(usage_account: BillingAccount, send: Callable) -> None:
    events = [
        usage(usage_account, "a"),
        usage(usage_account, "b", quantity="-1"),
        resource(usage_account, "c"),
        usage(usage_account, "d", sku="nope"),
        {"not": "an event"},
    ]
    body = result(send(events))
    assert body["accepted"] == 2
    assert [(r["index"], r["id"], r["code"]) for r in body["rejected"]] == [
        (1, "b", "invalid"),
        (3, "d", "unknown_sku"),
        (4, None, "invalid"),
    ]
    assert set(UsageEvent.objects.values_list("event_id", flat=True)) == {"a", "c"}


def test_resend_is_a_duplicate_and_changes_nothing(usage_account: BillingAccount, send: Callable) -> None:
    events = [usage(usage_account, f"e{i}") for i in range(5)] + [resource(usage_account)]
    assert result(send(events)) == {"accepted": 6, "duplicates": 0, "rejected": []}
    before = list(UsageEvent.objects.order_by("seq").values())
    assert result(send(events)) == {"accepted": 0, "duplicates": 6, "rejected": []}
    assert list(UsageEvent.objects.order_by("seq").values()) == before


def test_same_id_different_content_is_a_conflict(usage_account: BillingAccount, send: Callable) -> None:
    result(send([usage(usage_account, "e1", quantity="1")]))
    body = result(send([usage(usage_account, "e1", quantity="2"), usage(usage_account, "e2")]))
    assert body["accepted"] == 1 and body["duplicates"] == 0
    assert body["rejected"] == [
        {"index": 0, "id": "e1", "code": "conflict", "message": "id: already accepted with different content"}
    ]
    assert UsageEvent.objects.get(event_id="e1").quantity == Decimal(1)


def test_same_content_in_another_notation_is_a_duplicate(usage_account: BillingAccount, send: Callable) -> None:
    first = usage(usage_account, "e1", quantity="1.50", time="2026-11-25T12:00:00+01:00")
    first["time"] = iso(now().replace(microsecond=0) - dt.timedelta(hours=1))
    result(send([first]))
    again = dict(
        first,
        quantity="1.500",
        time=dt.datetime.fromisoformat(first["time"]).astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat(),
    )
    assert result(send([again])) == {"accepted": 0, "duplicates": 1, "rejected": []}


def test_duplicates_and_conflicts_within_one_batch(usage_account: BillingAccount, send: Callable) -> None:
    first = usage(usage_account, "e1")
    body = result(send([first, dict(first), dict(first, quantity="9")]))
    assert (body["accepted"], body["duplicates"]) == (1, 1)
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(2, "conflict")]
    assert UsageEvent.objects.get(event_id="e1").quantity == Decimal("1.5")  # the first one wins


def test_ids_are_unique_per_account_not_globally(
    usage_account: BillingAccount, send: Callable, customer: Customer, make_account: Callable
) -> None:
    other = make_account(customer.user)
    body = result(send([usage(usage_account, "same"), usage(other, "same", quantity="7")]))
    assert body == {"accepted": 2, "duplicates": 0, "rejected": []}


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_the_same_events_store_each_once(
    catalog: None, make_customer: Callable, make_account: Callable
) -> None:
    account = make_account(make_customer().user)
    raw = account_services.service_key_create(name="p", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    events = [usage(account, f"e{i}", quantity=str(i)) for i in range(300)]
    events += [resource(account, f"r{i}", resource_id=f"vm-{i}") for i in range(200)]
    responses = in_threads(
        4, lambda _: client_with_key(raw).post("/api/v1/usage/events", {"events": events}, format="json")
    )
    bodies = [r.json() for r in responses]
    assert len(bodies) == 4
    assert sum(b["accepted"] for b in bodies) == 500
    assert sum(b["duplicates"] for b in bodies) == 1500
    assert all(b["rejected"] == [] for b in bodies)
    assert UsageEvent.objects.filter(account_id=account.id).count() == 500


# --- The batch as a whole


def test_too_many_events_is_413(usage_account: BillingAccount, send: Callable) -> None:
    events = [usage(usage_account, f"e{i}") for i in range(10_001)]
    response = send(events)
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert not UsageEvent.objects.exists()


def test_10000_events_are_fine(usage_account: BillingAccount, send: Callable) -> None:
    events = [usage(usage_account, f"e{i}") for i in range(10_000)]
    assert result(send(events))["accepted"] == 10_000


def test_too_many_bytes_is_413(usage_account: BillingAccount, producer: APIClient) -> None:
    padding = "x" * (10 * 1024 * 1024)
    response = producer.post(
        "/api/v1/usage/events", '{"events": [], "pad": "' + padding + '"}', content_type="application/json"
    )
    assert response.status_code == 413
    assert response["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "malformed_request"),
        ("[]", 400, "invalid"),
        ('{"events": {}}', 400, "invalid"),
        ('{"events": [], "extra": 1}', 400, "invalid"),
    ],
)
def test_unusable_bodies(producer: APIClient, catalog: None, body: str, status: int, code: str) -> None:
    response = producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert (response.status_code, response.json()["code"]) == (status, code)


def test_an_empty_batch_is_fine(send: Callable) -> None:
    assert result(send([])) == {"accepted": 0, "duplicates": 0, "rejected": []}


def test_keys(usage_account: BillingAccount, customer: Customer, send: Callable) -> None:
    event = [usage(usage_account)]
    assert send(event, APIClient()).status_code == 401
    assert send(event, client_with_key("bks_nonsense")).status_code == 401
    assert send(event, customer.client).status_code == 403  # a user's key, even the account owner's
    reader = account_services.service_key_create(name="r", scopes=[Scope.ACCOUNTS_READ], created_by_id=None).raw
    assert send(event, client_with_key(reader)).status_code == 403
    revoked = account_services.service_key_create(name="x", scopes=[Scope.USAGE_WRITE], created_by_id=None)
    account_services.api_key_revoke(key_id=revoked.key.id, user_id=None)
    assert send(event, client_with_key(revoked.raw)).status_code == 401
    assert not UsageEvent.objects.exists()


# --- A byte-identical resend of a clean batch


def test_a_byte_identical_resend_is_answered_from_its_fingerprint(
    usage_account: BillingAccount, producer: APIClient
) -> None:
    from metering.models import IngestBatch

    body = json.dumps({"events": [usage(usage_account, f"e{i}") for i in range(60)]})
    first = producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert first.json() == {"accepted": 60, "duplicates": 0, "rejected": []}
    assert IngestBatch.objects.count() == 1
    before = list(UsageEvent.objects.order_by("seq").values())
    again = producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert again.json() == {"accepted": 0, "duplicates": 60, "rejected": []}
    assert list(UsageEvent.objects.order_by("seq").values()) == before


def test_small_batches_are_not_fingerprinted(usage_account: BillingAccount, producer: APIClient) -> None:
    from metering.models import IngestBatch

    body = json.dumps({"events": [usage(usage_account, f"e{i}") for i in range(49)]})
    producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert not IngestBatch.objects.exists()
    assert producer.post("/api/v1/usage/events", body, content_type="application/json").json()["duplicates"] == 49


def test_batches_with_rejections_are_not_fingerprinted(usage_account: BillingAccount, producer: APIClient) -> None:
    from metering.models import IngestBatch

    body = json.dumps({"events": [usage(usage_account, "ok"), usage(usage_account, "bad", sku="nope")]})
    producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert not IngestBatch.objects.exists()
    again = producer.post("/api/v1/usage/events", body, content_type="application/json").json()
    assert again["duplicates"] == 1 and [r["code"] for r in again["rejected"]] == ["unknown_sku"]


def test_a_fingerprint_answers_only_inside_the_acceptance_window(
    usage_account: BillingAccount, producer: APIClient, settings: Any
) -> None:
    from metering import services
    from metering.models import IngestBatch

    old = iso(now() - dt.timedelta(days=3))
    body = json.dumps({"events": [usage(usage_account, f"old{i}", time=old) for i in range(60)]})
    producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert IngestBatch.objects.count() == 1
    settings.METERING_MAX_EVENT_AGE_DAYS = 2  # the events have now left the window
    again = producer.post("/api/v1/usage/events", body, content_type="application/json").json()
    assert {r["code"] for r in again["rejected"]} == {"too_old"}  # the same answer as the full path
    assert services.ingest_batches_prune() == 1
    assert not IngestBatch.objects.exists()


# --- Found by review: inputs that used to be 500s, and spellings that used to conflict


def test_bad_utf8_in_one_event_rejects_that_event(usage_account: BillingAccount, producer: APIClient) -> None:
    good = json.dumps(usage(usage_account, "good")).encode()
    bad = json.dumps(usage(usage_account, "PLACEHOLDER")).encode().replace(b"PLACEHOLDER", b"bad\xff")
    response = producer.post(
        "/api/v1/usage/events", b'{"events": [' + good + b", " + bad + b"]}", content_type="application/json"
    )
    body = result(response)
    assert body["accepted"] == 1 and [(r["index"], r["code"]) for r in body["rejected"]] == [(1, "invalid")]


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_times_at_the_ends_of_the_calendar_are_rejected(
    usage_account: BillingAccount, send: Callable, moment: str
) -> None:
    body = result(send([usage(usage_account, "edge", time=moment), usage(usage_account, "fine")]))
    assert body["accepted"] == 1 and body["rejected"][0]["code"] in {"invalid", "too_old", "in_future"}


def test_no_labels_and_empty_labels_are_the_same_content(usage_account: BillingAccount, send: Callable) -> None:
    event = usage(usage_account, "e1")
    result(send([event]))
    assert result(send([dict(event, labels={})])) == {"accepted": 0, "duplicates": 1, "rejected": []}


def test_zero_written_with_many_places_is_zero(usage_account: BillingAccount, send: Callable) -> None:
    assert result(send([usage(usage_account, "z", quantity="000000000000.000000000000")]))["accepted"] == 1
    assert UsageEvent.objects.get(event_id="z").quantity == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_batches_with_the_same_events_in_opposite_orders(
    catalog: None, make_customer: Callable, make_account: Callable
) -> None:
    account = make_account(make_customer().user)
    raw = account_services.service_key_create(name="p", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    events = [usage(account, f"e{i}", quantity=str(i)) for i in range(2000)]
    batches = [events, list(reversed(events)), events[1000:] + events[:1000]]
    responses = in_threads(
        len(batches),
        lambda i: client_with_key(raw).post("/api/v1/usage/events", {"events": batches[i]}, format="json"),
    )
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert sum(r.json()["accepted"] for r in responses) == 2000
    assert UsageEvent.objects.filter(account_id=account.id).count() == 2000


def test_a_bad_number_is_that_event_invalid_and_the_rest_of_the_batch_is_accepted(
    usage_account: BillingAccount, send: Callable
) -> None:
    body = result(
        send(
            [
                usage(usage_account, "good-1"),
                usage(usage_account, "snan", quantity="sNaN"),
                resource(usage_account, "spec-snan", spec={"compute.vcpu": "sNaN"}),
                usage(usage_account, "good-2", quantity="2"),
            ]
        )
    )
    assert body["accepted"] == 2
    assert [(r["index"], r["id"], r["code"]) for r in body["rejected"]] == [
        (1, "snan", "invalid"),
        (2, "spec-snan", "invalid"),
    ]
    assert set(UsageEvent.objects.values_list("event_id", flat=True)) == {"good-1", "good-2"}


def test_usage_after_an_account_is_closed_is_refused_usage_before_it_is_billable(
    usage_account: BillingAccount, send: Callable
) -> None:
    import time_machine

    from billing_site.common.actors import Actor

    closed_at = dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.UTC)
    with time_machine.travel(closed_at, tick=False):
        account_services.billing_account_transition(
            account_id=usage_account.id, transition="close", actor=Actor.system("tests"), reason="customer left"
        )
    with time_machine.travel(closed_at + dt.timedelta(hours=2), tick=False):
        body = result(
            send(
                [
                    usage(usage_account, "before", time="2026-11-20T09:59:59Z"),
                    usage(usage_account, "at", time="2026-11-20T10:00:00Z"),
                    usage(usage_account, "after", time="2026-11-20T11:00:00+01:00"),  # 10:00 UTC
                    resource(usage_account, "start-after", time="2026-11-20T11:30:00Z"),
                ]
            )
        )
    assert body["accepted"] == 1
    assert [(r["id"], r["code"]) for r in body["rejected"]] == [
        ("at", "account_closed"),
        ("after", "account_closed"),
        ("start-after", "account_closed"),
    ]
    assert usage_account.public_id in body["rejected"][0]["message"]
    assert "2026-11-20T10:00:00Z" in body["rejected"][0]["message"]
    assert list(UsageEvent.objects.values_list("event_id", flat=True)) == ["before"]


@pytest.mark.parametrize("transition", ["suspend", "block", None])
def test_usage_of_an_account_that_is_not_active_is_accepted_and_counted(
    usage_account: BillingAccount, send: Callable, transition: str | None
) -> None:
    from billing_site.common.actors import Actor
    from metering import selectors

    actor = Actor.system("tests")
    steps = {"suspend": ["activate", "suspend"], "block": ["block"], None: []}[transition]  # None: left pending
    for step in steps:
        account_services.billing_account_transition(
            account_id=usage_account.id, transition=step, actor=actor, reason="tests"
        )
    state = BillingAccount.objects.get(id=usage_account.id).state
    assert state in ("pending", "suspended", "blocked")
    events = [usage(usage_account, "u-1"), usage(usage_account, "u-2")]
    assert result(send(events))["accepted"] == 2
    assert result(send(events))["duplicates"] == 2  # a resend counts nothing
    quality = selectors.data_quality(account_id=usage_account.id)
    assert quality[f"events_while_{state}"] == 2
    assert sum(quality[f"events_while_{s}"] for s in ("pending", "suspended", "blocked")) == 2


def test_a_closed_account_without_a_closure_record_refuses_usage_after_its_last_change(
    usage_account: BillingAccount, send: Callable
) -> None:
    # Imported data: closed, but no transition row says when. Its row's last change stands in.
    BillingAccount.objects.filter(id=usage_account.id).update(state="closed", updated_at=now() - dt.timedelta(hours=1))
    body = result(
        send(
            [
                usage(usage_account, "before", time=iso(now() - dt.timedelta(hours=2))),
                usage(usage_account, "after", time=iso(now() - dt.timedelta(minutes=30))),
            ]
        )
    )
    assert body["accepted"] == 1
    assert [(r["id"], r["code"]) for r in body["rejected"]] == [("after", "account_closed")]


@pytest.mark.django_db
def test_inactive_usage_rows_fold_into_one_per_account_state_and_day_and_the_counts_do_not_move() -> None:
    from django.utils import timezone

    from metering import selectors, services
    from metering.models import InactiveAccountUsage

    now = timezone.now()
    old = now - dt.timedelta(hours=3)
    rows = [
        InactiveAccountUsage(account_id=1, account_state="pending", events=n, received_at=old - dt.timedelta(minutes=n))
        for n in range(1, 11)
    ] + [
        InactiveAccountUsage(account_id=1, account_state="suspended", events=5, received_at=old),
        InactiveAccountUsage(account_id=1, account_state="pending", events=7, received_at=now),  # too recent
    ]
    InactiveAccountUsage.objects.bulk_create(rows)
    before = selectors.data_quality(account_id=1)
    removed = services.inactive_usage_compact()
    assert selectors.data_quality(account_id=1) == before
    assert before["events_while_pending"] == 55 + 7 and before["events_while_suspended"] == 5
    days = {r.received_at.date() for r in InactiveAccountUsage.objects.filter(received_at__lt=now)}
    assert removed == 12 - InactiveAccountUsage.objects.count()
    assert InactiveAccountUsage.objects.filter(received_at=now).count() == 1
    assert InactiveAccountUsage.objects.filter(received_at__lt=now).count() == 2 * len(days)  # per state and day
    assert services.inactive_usage_compact() == 0  # folded rows stay as they are
