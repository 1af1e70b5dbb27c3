"""The staff home page: the figures with their links, red past a threshold, the app list below;
the rollup-shards page with lag and backlog per shard."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from accounts.tests.factories import BillingAccountFactory
from antifraud.models import AccountRisk, RiskStatus
from billing_site.backoffice import dashboard, tasks
from billing_site.outbox import services as outbox_services
from billing_site.outbox.models import OutboxMessage
from conftest import operator
from invoicing.models import Invoice, InvoicePayment
from metering import selectors as metering_selectors
from metering.models import RollupShard
from metering.sharding import SHARDS
from metering.tests.support import used
from payments.models import DunningCase, Payment, WebhookEvent

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
    # Stamped by PostgreSQL's now(), which a test session's clock (a year ahead in CI) does not move.
    OutboxMessage.objects.filter(id=message).update(created_at=now)
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


# --- Finance's figures (the money views' selectors), for finance and read-only only

FINANCE_NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)  # today 2026-11-03; last month 2026-10


def at(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=12, tzinfo=dt.UTC)


def invoice(account_id: int, *, due: str, total: int, issued: str, currency: str = "EUR", **amounts: Any) -> Invoice:
    return Invoice.objects.create(
        account_id=account_id, period_start=dt.date(2026, 8, 1), period_end=dt.date(2026, 9, 1), kind="threshold",
        status=amounts.pop("status", "issued"), currency=currency, number=f"D-{Invoice.objects.count() + 1:05d}",
        total_minor=total, subtotal_minor=total, issued_at=at(issued), due_at=at(due), **amounts,
    )  # fmt: skip


def first_charge(bill: Invoice, *, created: str, status: str) -> None:
    Payment.objects.create(
        account_id=bill.account_id, invoice_id=bill.id, attempt=1, trigger="after_issue", status=status,
        amount_minor=bill.total_minor, currency=bill.currency, gateway="sandbox", idempotency_key=f"k{bill.id}",
        created_at=at(created),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _no_kept_finance_figures() -> None:
    """Finance's figures are kept in the cache between loads: none from another test."""
    cache.delete(dashboard.FINANCE_CACHE_KEY)


@pytest.fixture
def money_figures() -> dict[str, int]:
    """EUR: 100.00 not yet due, 142.00 left of November's 242.00, 70.00 91 days past due (22.4 %
    of 312.00 owed); USD: 9.99 two days
    late. October: two first charges (120.00 and 20.00 EUR), the second failed and recovered.
    Invoiced: 242.00 EUR in November, 121.00 + 20.00 EUR in October; collected 121.00 EUR in
    October, 100.00 EUR in November."""
    eur, usd = BillingAccountFactory(currency="EUR").id, BillingAccountFactory(currency="USD").id
    invoice(eur, due="2026-11-10", total=10000, issued="2026-09-01")  # current
    invoice(eur, due="2026-08-04", total=7000, issued="2026-07-21")  # 91 days: 90+
    invoice(usd, due="2026-11-01", total=999, currency="USD", issued="2026-09-01")  # 1-30
    paid = invoice(eur, due="2026-10-20", total=12100, issued="2026-10-06", status="paid", amount_paid_minor=12100)
    failed = invoice(eur, due="2026-10-20", total=2000, issued="2026-10-06", status="paid", amount_paid_minor=2000)
    november = invoice(eur, due="2026-11-20", total=24200, issued="2026-11-01", amount_paid_minor=10000)
    first_charge(paid, created="2026-10-06", status="succeeded")
    first_charge(failed, created="2026-10-06", status="failed")
    DunningCase.objects.create(
        account_id=eur, invoice_id=failed.id, currency="EUR", status="resolved", first_failure_at=at("2026-10-06"),
        due_at=at("2026-10-20"),
    )  # fmt: skip
    for bill, received, amount in ((paid, "2026-10-30", 12100), (november, "2026-11-02", 10000)):
        InvoicePayment.objects.create(
            invoice=bill, account_id=eur, amount_minor=amount, received_minor=amount, currency="EUR",
            reference=f"pay_{bill.id}", received_at=at(received),
        )  # fmt: skip
    return {"eur": eur, "usd": usd}


@pytest.mark.clock(FINANCE_NOW)
def test_finance_sees_receivables_funnel_and_revenue_with_links(money_figures: dict[str, int]) -> None:
    _, client = operator(["finance"])
    html = client.get("/admin/").content.decode()

    owed = figure(html, "EUR owed")
    assert ">312.00 EUR<" in owed  # 100.00 + 70.00 + (242.00 - 100.00 paid)
    assert 'href="/admin/finance/"' in owed and "3 invoices unpaid" in owed
    late = figure(html, "EUR 90+ days past due")
    assert ">70.00 EUR<" in late and 'href="/admin/finance/receivables/EUR/90_plus/"' in late
    assert "22.4 % of owed; 1 invoices of 1 accounts" in late
    assert ">9.99 USD<" in figure(html, "USD owed")
    assert ">0.00 USD<" in figure(html, "USD 90+ days past due")

    assert "Dunning funnel, first charged in 2026-10" in html
    for stage, invoices, amount in (
        ("charged", 2, "141.00 EUR"),
        ("failed", 1, "20.00 EUR"),
        ("recovered", 1, "20.00 EUR"),
        ("suspended", 0, "0.00 EUR"),
        ("written off", 0, "0.00 EUR"),
    ):
        fragment = figure(html, f"EUR {stage}")
        assert f">{invoices}<" in fragment and amount in fragment, stage
        assert 'href="/admin/finance/?month=2026-10"' in fragment, stage

    assert ">242.00 EUR<" in figure(html, "EUR invoiced this month")
    assert ">141.00 EUR<" in figure(html, "EUR invoiced last month")
    assert ">100.00 EUR<" in figure(html, "EUR collected this month")
    assert ">121.00 EUR<" in figure(html, "EUR collected last month")
    # Every finance figure's link answers for finance.
    for link in set(re.findall(r'<li class="ops-figure[^>]*>\s*<a href="(/admin/finance/[^"]*)"', html)):
        assert client.get(link.replace("&amp;", "&")).status_code == 200, link


@pytest.mark.clock(FINANCE_NOW)
@pytest.mark.parametrize("groups", [["support"], ["fraud"]])
def test_no_finance_figures_for_support_or_fraud(money_figures: dict[str, int], groups: list[str]) -> None:
    _, client = operator(groups)
    html = client.get("/admin/").content.decode()
    assert 'id="ops-pipeline"' in html  # the page is there ...
    for absent in ("ops-receivables", "ops-funnel", "ops-revenue", "EUR owed", "70.00 EUR", "/admin/finance/"):
        assert absent not in html, absent  # ... finance's numbers are not


@pytest.mark.clock(FINANCE_NOW)
def test_90_plus_past_due_is_red_past_its_share_or_amount(settings: Any, money_figures: dict[str, int]) -> None:
    _, client = operator(["finance"])
    settings.DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS = {"EUR": "1000.00"}

    def late() -> str:
        return figure(client.get("/admin/").content.decode(), "EUR 90+ days past due")

    settings.DASHBOARD_RECEIVABLES_90_PLUS_PERCENT = Decimal("22")  # 70.00 of 312.00 is 22.44 %
    assert is_red(late()) and "red above 22 % of what EUR is owed or above 1000.00 EUR" in late()
    settings.DASHBOARD_RECEIVABLES_90_PLUS_PERCENT = Decimal("22.5")
    assert not is_red(late())
    settings.DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS = {"EUR": "69.99"}  # the amount alone
    assert is_red(late())
    settings.DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS = {"EUR": "70.00"}
    assert not is_red(late())
    assert not is_red(figure(client.get("/admin/").content.decode(), "USD 90+ days past due"))


@pytest.mark.clock(FINANCE_NOW)
def test_finance_figures_are_those_of_the_last_refresh_until_too_old(
    settings: Any, clock: Any, money_figures: dict[str, int]
) -> None:
    settings.DASHBOARD_FINANCE_MAX_AGE_SECONDS = 300
    _, client = operator(["finance"])

    def owed() -> str:
        return figure(client.get("/admin/").content.decode(), "EUR owed")

    assert ">312.00 EUR<" in owed()
    invoice(money_figures["eur"], due="2026-11-30", total=1000, issued="2026-11-02")
    clock.move_to(FINANCE_NOW + dt.timedelta(minutes=4))
    assert ">312.00 EUR<" in owed()  # kept: the page reads no receivable
    assert "as of 2026-11-03 09:00:00 UTC" in client.get("/admin/").content.decode()
    tasks.dashboard_finance_refresh()  # beat's refresh
    assert ">322.00 EUR<" in owed()
    invoice(money_figures["eur"], due="2026-11-30", total=500, issued="2026-11-02")
    clock.move_to(FINANCE_NOW + dt.timedelta(minutes=10))  # the refresh stopped: asked again
    page = client.get("/admin/").content.decode()
    assert ">327.00 EUR<" in figure(page, "EUR owed") and "as of 2026-11-03 09:10:00 UTC" in page
