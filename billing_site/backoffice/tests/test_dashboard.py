"""The staff home page: the figures with their links, red past a threshold, the app list below;
the rollup-shards page with lag and backlog per shard."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from antifraud.models import AccountRisk, RiskStatus
from billing_site.outbox import services as outbox_services
from billing_site.outbox.models import OutboxMessage
from conftest import operator
from metering import selectors as metering_selectors
from metering.models import RollupShard
from metering.sharding import SHARDS
from metering.tests.support import used
from payments.models import WebhookEvent

pytestmark = pytest.mark.django_db


def figure(html: str, label: str) -> str:
    """The <li> of one figure (by its label's slug)."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    match = re.search(rf'<li class="ops-figure[^"]*"[^>]*data-figure="{slug}">.*?</li>', html, re.S)
    assert match, f"no figure {label!r} on the page"
    return match.group(0)


def is_red(fragment: str) -> bool:
    return 'class="ops-figure alert"' in fragment


def all_shards_ran(at: dt.datetime) -> None:
    for shard in range(SHARDS):
        RollupShard.objects.update_or_create(shard=shard, defaults={"txid_horizon": 0})
    RollupShard.objects.update(updated_at=at, last_duration_ms=42)


def test_home_page_shows_the_figures_with_links_and_keeps_the_app_list(account: BillingAccount) -> None:
    all_shards_ran(timezone.now())
    _, client = operator(["support", "finance", "fraud"])
    response = client.get("/admin/")
    assert response.status_code == 200
    html = response.content.decode()
    pending = figure(html, "Pending")
    assert f">{BillingAccount.objects.filter(state='pending').count():,}<" in pending
    assert 'href="/admin/accounts/billingaccount/?state__exact=pending"' in pending
    for label, link in (
        ("Review queue", "/admin/antifraud/accountrisk/?status__exact=review"),
        ("Webhooks not processed", "/admin/payments/webhookevent/?status__exact=pending"),
        ("Outbox backlog", "/admin/outbox/outboxmessage/?state=pending"),
        ("Charges outcome unknown", "/admin/payments/payment/?status__exact=unknown"),
        ("Rollup lag", "/admin/metering/rollupshard/"),
    ):
        fragment = figure(html, label)
        assert f'href="{link}"' in fragment, label
        assert not is_red(fragment), label
    assert html.count('<tr class="">') == SHARDS  # every shard, none behind
    assert 'id="ops-shards"' in html
    # The admin's app list is still there, below the figures.
    assert html.index("ops-pipeline") < html.index('class="app-accounts module')
    # Every figure's link answers for this operator.
    for link in set(re.findall(r'<li class="ops-figure[^>]*>\s*<a href="([^"]+)"', html)):
        assert client.get(link.replace("&amp;", "&")).status_code == 200, link


def test_figures_turn_red_past_their_thresholds(settings: Any, account: BillingAccount) -> None:
    settings.DASHBOARD_OUTBOX_AGE_SECONDS = 300
    settings.DASHBOARD_WEBHOOK_AGE_SECONDS = 600
    settings.DASHBOARD_REVIEW_QUEUE_HOURS = 24
    now = timezone.now()
    all_shards_ran(now)
    with transaction.atomic():
        message = outbox_services.enqueue_task("billing_site.worker_health", prompt=False)
    _, client = operator(["support"])

    html = client.get("/admin/").content.decode()
    assert ">1<" in figure(html, "Outbox backlog") and not is_red(figure(html, "Outbox backlog"))

    OutboxMessage.objects.filter(id=message).update(created_at=now - dt.timedelta(minutes=6))
    WebhookEvent.objects.create(
        gateway="stripe",
        event_id="evt_old",
        type="charge.succeeded",
        payload={},
        received_at=now - dt.timedelta(hours=1),
    )
    AccountRisk.objects.create(
        account_id=account.id, status=RiskStatus.REVIEW, score=90, flagged_at=now - dt.timedelta(days=2)
    )
    html = client.get("/admin/").content.decode()
    outbox = figure(html, "Outbox backlog")
    assert is_red(outbox) and "oldest waits 6 min" in outbox
    assert "red when the oldest message waits over 5 min" in outbox
    assert is_red(figure(html, "Webhooks not processed"))
    assert is_red(figure(html, "Review queue")) and "oldest waits 2 d 0 h" in figure(html, "Review queue")

    settings.DASHBOARD_OUTBOX_AGE_SECONDS = 3600  # the thresholds are settings
    assert not is_red(figure(client.get("/admin/").content.decode(), "Outbox backlog"))


def test_a_shard_that_stopped_with_events_waiting_is_red(usage_account: BillingAccount, producer: APIClient) -> None:
    now = timezone.now()
    all_shards_ran(now - dt.timedelta(minutes=35))
    events = [used(usage_account, f"late-{i}", now - dt.timedelta(minutes=30), "1") for i in range(4)]
    assert producer.post("/api/v1/usage/events", {"events": events}, format="json").json()["accepted"] == 4
    shard = next(p.shard for p in metering_selectors.rollup_progress() if p.events_waiting)
    _, client = operator(["support"])

    html = client.get("/admin/").content.decode()
    lag = figure(html, "Rollup lag")
    assert is_red(lag) and "shards behind:" in lag
    row = re.search(rf'<tr class="alert">\s*<td class="alert">{shard} ⚠</td>.*?</tr>', html, re.S)
    assert row, "the shard's row is not red"
    assert ">4<" in row.group(0) and "35 min" in row.group(0)
    assert ">4<" in figure(html, "Events waiting")


def test_rollup_shards_page_shows_lag_and_backlog(usage_account: BillingAccount, producer: APIClient) -> None:
    now = timezone.now()
    all_shards_ran(now - dt.timedelta(minutes=35))
    events = [used(usage_account, f"w-{i}", now - dt.timedelta(minutes=33), "1") for i in range(3)]
    assert producer.post("/api/v1/usage/events", {"events": events}, format="json").json()["accepted"] == 3
    with connection.cursor() as cursor:  # received 33 minutes ago, never rolled up
        cursor.execute("UPDATE metering_usageevent SET received_at = %s", [now - dt.timedelta(minutes=33)])
    waiting = next(p for p in metering_selectors.rollup_progress() if p.events_waiting)
    assert waiting.lag(now) >= dt.timedelta(minutes=33)
    _, client = operator(["support"])

    response = client.get("/admin/metering/rollupshard/")
    assert response.status_code == 200
    html = response.content.decode()
    for header in ("Since last run", "Lag (oldest waiting)", "Events waiting", "Dirty hours waiting", "Last run took"):
        assert header in html, header
    rows = re.findall(r"<tr>.*?</tr>", html, re.S)
    row = next(
        r for r in rows if f'<td class="field-shard_shown"><strong style="color: #ba2121">{waiting.shard} ⚠' in r
    )
    assert '<td class="field-events_waiting"><strong style="color: #ba2121">3 ⚠' in row
    assert "35 min" in row and "33 min" in row and "42 ms" in row

    RollupShard.objects.update(updated_at=timezone.now())  # it runs again, nothing taken yet: still behind
    html = client.get("/admin/metering/rollupshard/").content.decode()
    assert f'<strong style="color: #ba2121">{waiting.shard} ⚠' in html
    quiet = (waiting.shard + 1) % SHARDS
    assert f'<td class="field-shard_shown">{quiet}</td>' in html
