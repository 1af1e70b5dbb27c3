"""The staff home page (``/admin/``): what needs someone now, above the admin's app list.

Accounts by state; the fraud review queue (size, oldest wait); the pipeline's health (per
rollup shard: last run, lag, events waiting; Stripe webhook events not processed; the outbox's
backlog and oldest message; payments whose outcome is unknown; the last period close). Each
figure links to the admin list behind it and turns red past its threshold (``DASHBOARD_*``
settings, README). For those who may see the finance page (``invoicing.view_receivables``):
what is owed and 90+ days past due per currency, last month's dunning funnel, revenue invoiced
and collected this month and last (``finance_sections``: the finance page's selectors, called
once each; nothing re-derived here but the 90+ share).

Every figure is one set-based statement through an app's selector, the same reads as
``/metrics`` (``billing_site/backoffice/metrics.py``); ``bench/backoffice.py`` times the page at
1,000,000 accounts and 10,000,000 invoices.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from accounts import selectors as account_selectors
from antifraud import selectors as antifraud_selectors
from billing_site.backoffice import finance
from billing_site.common import money
from billing_site.common.backlogs import Backlog
from billing_site.common.durations import duration_text
from billing_site.outbox import selectors as outbox_selectors
from invoicing import selectors as invoicing_selectors
from metering import selectors as metering_selectors
from payments import selectors as payment_selectors

TEMPLATE = "admin/backoffice/dashboard.html"


@dataclass
class Figure:
    label: str
    value: str
    url: str | None = None
    alert: bool = False
    note: str = ""  # e.g. "oldest 4 min ago"
    why: str = ""  # what red means here (the threshold), shown as the figure's title


@dataclass
class ShardRow:
    shard: int
    last_run_at: dt.datetime | None
    since_last_run: str
    lag: str
    events_waiting: str
    hours_waiting: int
    duration: str
    alert: bool


@dataclass
class Dashboard:
    now: dt.datetime
    accounts: list[Figure] = field(default_factory=list)
    fraud: list[Figure] = field(default_factory=list)
    pipeline: list[Figure] = field(default_factory=list)
    shards: list[ShardRow] = field(default_factory=list)
    shards_url: str | None = None


def _list_url(request: HttpRequest, model: str, query: str = "") -> str | None:
    """The admin list of ``app.model`` (with a filter), if this user may view it."""
    app_label, model_name = model.split(".")
    if not request.user.has_perm(f"{app_label}.view_{model_name}"):
        return None
    return reverse(f"admin:{app_label}_{model_name}_changelist") + (f"?{query}" if query else "")


def _backlog_figure(
    label: str, backlog: Backlog, *, now: dt.datetime, url: str | None, max_age: dt.timedelta, why: str
) -> Figure:
    age = backlog.age(now)
    return Figure(
        label=label,
        value=f"{backlog.count:,}",
        url=url,
        alert=age is not None and age > max_age,
        note=f"oldest waits {duration_text(age)}" if age is not None else "",
        why=why,
    )


def accounts_figures(request: HttpRequest) -> list[Figure]:
    counts = account_selectors.billing_account_counts_by_state()
    return [
        Figure(
            label=state.capitalize(),
            value=f"{count:,}",
            url=_list_url(request, "accounts.billingaccount", f"state__exact={state}"),
        )
        for state, count in counts.items()
    ]


def fraud_figures(request: HttpRequest, now: dt.datetime) -> list[Figure]:
    queue = antifraud_selectors.review_queue_backlog()
    age = queue.age(now)
    max_age = dt.timedelta(hours=settings.DASHBOARD_REVIEW_QUEUE_HOURS)
    return [
        Figure(
            label="Review queue",
            value=f"{queue.count:,}",
            url=_list_url(request, "antifraud.accountrisk", "status__exact=review"),
            alert=queue.count > settings.DASHBOARD_REVIEW_QUEUE_SIZE or (age is not None and age > max_age),
            note=f"oldest waits {duration_text(age)}" if age is not None else "",
            why=f"red above {settings.DASHBOARD_REVIEW_QUEUE_SIZE} accounts or when one waits over "
            f"{settings.DASHBOARD_REVIEW_QUEUE_HOURS} h",
        )
    ]


def shard_rows(now: dt.datetime, progress: list[metering_selectors.ShardProgress]) -> list[ShardRow]:
    return [
        ShardRow(
            shard=shard.shard,
            last_run_at=shard.last_run_at,
            since_last_run=duration_text(shard.since_last_run(now)),
            lag=duration_text(shard.lag(now)),
            events_waiting=f"{shard.events_waiting:,}{'+' if shard.capped else ''}",
            hours_waiting=shard.hours_waiting,
            duration="-" if shard.last_duration_ms is None else f"{shard.last_duration_ms:,} ms",
            alert=shard.behind(now),
        )
        for shard in progress
    ]


def pipeline_figures(
    request: HttpRequest, now: dt.datetime, shards: list[ShardRow], progress: list[metering_selectors.ShardProgress]
) -> list[Figure]:
    figures = []
    shards_url = _list_url(request, "metering.rollupshard")
    worst_lag = max((p.lag(now) for p in progress), default=dt.timedelta(0))
    last_run = min((p.last_run_at for p in progress if p.last_run_at is not None), default=None)
    waiting = sum(p.events_waiting for p in progress)
    behind = [row.shard for row in shards if row.alert]
    figures.append(
        Figure(
            label="Rollup lag",
            value=duration_text(worst_lag),
            url=shards_url,
            alert=bool(behind),
            note=(f"shards behind: {', '.join(map(str, behind))}; " if behind else "")
            + (f"slowest shard last ran {duration_text(now - last_run)} ago" if last_run else "never ran"),
            why=f"red when a shard's oldest waiting event or its last run is older than "
            f"{duration_text(dt.timedelta(seconds=settings.DASHBOARD_ROLLUP_LAG_SECONDS))}, "
            f"or more than {settings.DASHBOARD_EVENTS_WAITING:,} events wait in one",
        )
    )
    figures.append(
        Figure(
            label="Events waiting",
            value=f"{waiting:,}{'+' if any(p.capped for p in progress) else ''}",
            url=shards_url,
            alert=any(p.events_waiting > settings.DASHBOARD_EVENTS_WAITING for p in progress),
            note=f"{sum(p.hours_waiting for p in progress):,} dirty hours waiting"
            if any(p.hours_waiting for p in progress)
            else "",
            why=f"red above {settings.DASHBOARD_EVENTS_WAITING:,} in one shard",
        )
    )
    webhooks = payment_selectors.webhook_backlog()
    webhook_age = dt.timedelta(seconds=settings.DASHBOARD_WEBHOOK_AGE_SECONDS)
    figures.append(
        _backlog_figure(
            "Webhooks not processed",
            webhooks["pending"],
            now=now,
            url=_list_url(request, "payments.webhookevent", "status__exact=pending"),
            max_age=webhook_age,
            why=f"red when the oldest waits over {duration_text(webhook_age)}",
        )
    )
    failed = webhooks["failed"]
    figures.append(
        Figure(
            label="Webhooks failed",
            value=f"{failed.count:,}",
            url=_list_url(request, "payments.webhookevent", "status__exact=failed"),
            alert=failed.count > 0,
            note=f"oldest received {duration_text(failed.age(now))} ago" if failed.count else "",
            why="red when any failed: each needs a look (its error is on its page)",
        )
    )
    outbox_age = dt.timedelta(seconds=settings.DASHBOARD_OUTBOX_AGE_SECONDS)
    figures.append(
        _backlog_figure(
            "Outbox backlog",
            outbox_selectors.backlog(),
            now=now,
            url=_list_url(request, "outbox.outboxmessage", "state=pending"),
            max_age=outbox_age,
            why=f"red when the oldest message waits over {duration_text(outbox_age)}",
        )
    )
    unknown_age = dt.timedelta(seconds=settings.DASHBOARD_PAYMENT_UNKNOWN_SECONDS)
    figures.append(
        _backlog_figure(
            "Charges outcome unknown",
            payment_selectors.payments_open()["unknown"],
            now=now,
            url=_list_url(request, "payments.payment", "status__exact=unknown"),
            max_age=unknown_age,
            why=f"red when one stays unknown over {duration_text(unknown_age)}",
        )
    )
    figures.append(period_close_figure(request, now))
    return figures


def period_close_figure(request: HttpRequest, now: dt.datetime) -> Figure:
    """The newest month with monthly invoices. Red once last month should have been closed
    (beat tries on the 1st to the 3rd) and no monthly invoice of it exists, or some are drafts.
    (How many were issued is on /metrics, ``billing_period_close_invoices``: counting a month of a
    million invoices is not for every page load.)"""
    last = invoicing_selectors.last_period_closed()
    last_month = (now.astimezone(dt.UTC).date().replace(day=1) - dt.timedelta(days=1)).replace(day=1)
    overdue = now.astimezone(dt.UTC).day > 3
    why = "red after the 3rd when last month has no monthly invoices, or while any are drafts"
    if last is None:
        return Figure(label="Last period close", value="never", alert=overdue, why=why)
    note = f"last invoice issued {duration_text(now - last.last_issued_at)} ago" if last.last_issued_at else ""
    if last.has_drafts:
        note += "; drafts remain"
    return Figure(
        label="Last period close",
        value=last.label,
        url=_list_url(request, "invoicing.invoice", f"period={last.label}&kind__exact=period"),
        alert=last.has_drafts or (overdue and last.period_start < last_month),
        note=note,
        why=why,
    )


def build(request: HttpRequest, *, now: dt.datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    progress = metering_selectors.rollup_progress()
    shards = shard_rows(now, progress)
    return Dashboard(
        now=now,
        accounts=accounts_figures(request),
        fraud=fraud_figures(request, now),
        pipeline=pipeline_figures(request, now, shards, progress),
        shards=shards,
        shards_url=_list_url(request, "metering.rollupshard"),
    )


@dataclass
class Section:
    """A block of figures on the page (finance's: receivables, the funnel, revenue)."""

    key: str  # the block's html id: ``ops-<key>``
    title: str
    figures: list[Figure]
    note: str = ""


def receivables_section(ageing: list[invoicing_selectors.CurrencyAgeing]) -> Section:
    """Per currency: all that is owed (the finance page) and what is 90+ days past due (that
    bucket's accounts), from ``receivables_ageing`` (its buckets and total, not re-derived). The
    90+ figure is red past ``DASHBOARD_RECEIVABLES_90_PLUS_PERCENT`` of the owed or past the
    currency's ``DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS``."""
    share = settings.DASHBOARD_RECEIVABLES_90_PLUS_PERCENT
    figures = []
    for row in ageing:
        total, late = row.total, row.buckets["90_plus"]
        figures.append(
            Figure(
                label=f"{row.currency} owed",
                value=money.display(total.amount_minor, row.currency, grouped=True),
                url=reverse("backoffice:finance"),
                note=f"{total.invoices:,} invoices unpaid",
            )
        )
        limit = settings.DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS.get(row.currency)
        percent = Decimal(late.amount_minor) * 100 / total.amount_minor if total.amount_minor else None
        figures.append(
            Figure(
                label=f"{row.currency} 90+ days past due",
                value=money.display(late.amount_minor, row.currency, grouped=True),
                url=reverse("backoffice:receivables_bucket", args=[row.currency, "90_plus"]),
                alert=(percent is not None and percent > share)
                or (limit is not None and late.amount_minor > money.to_minor(Decimal(limit), row.currency)),
                note=f"{percent or 0:.1f} % of owed; {late.invoices:,} invoices of {late.accounts:,} accounts",
                why=f"red above {share} % of what {row.currency} is owed"
                + (f" or above {limit} {row.currency}" if limit is not None else ""),
            )
        )
    return Section(key="receivables", title="Receivables", figures=figures, note="" if figures else "nothing owed")


def funnel_section(month: dt.date, funnel: list[payment_selectors.CurrencyFunnel]) -> Section:
    """Last month's dunning funnel per currency (``dunning_funnel``), each stage's invoices with
    the amount asked for; each links to the finance page of that month."""
    url = reverse("backoffice:finance") + f"?month={month:%Y-%m}"
    figures = [
        Figure(
            label=f"{row.currency} {key.replace('_', ' ')}",
            value=f"{row.stages[key].invoices:,}",
            url=url,
            note=money.display(row.stages[key].amount_minor, row.currency, grouped=True),
            why=meaning,
        )
        for row in funnel
        for key, meaning in payment_selectors.FUNNEL_STAGES
    ]
    return Section(
        key="funnel",
        title=f"Dunning funnel, first charged in {month:%Y-%m}",
        figures=figures,
        note="" if figures else "no first charge that month",
    )


def revenue_section(revenue: dict[dt.date, list[invoicing_selectors.CurrencyRevenue]]) -> Section:
    """Revenue invoiced and collected per currency, this month and last (``revenue``: gross,
    with the net of credit notes and refunds beside it)."""
    url = reverse("backoffice:finance")
    figures = []
    for (start, rows), when in zip(revenue.items(), ("this month", "last month"), strict=True):
        for row in rows:
            c = row.currency
            for what, gross, less, net in (
                ("invoiced", row.invoiced_minor, "credit notes", row.net_invoiced_minor),
                ("collected", row.collected_minor, "refunds", row.net_collected_minor),
            ):
                figures.append(
                    Figure(
                        label=f"{c} {what} {when}",
                        value=money.display(gross, c, grouped=True),
                        url=url,
                        note=f"{start:%Y-%m}; net of {less} {money.display(net, c, grouped=True)}",
                    )
                )
    return Section(key="revenue", title="Revenue", figures=figures, note="" if figures else "none this month or last")


FINANCE_CACHE_KEY = "backoffice:dashboard:finance-figures"


@dataclass(frozen=True)
class FinanceFigures:
    """What the money views' selectors answered at ``as_of``: the ageing, last month's funnel,
    revenue of this month and last (in that order)."""

    as_of: dt.datetime
    funnel_month: dt.date
    ageing: list[invoicing_selectors.CurrencyAgeing]
    funnel: list[payment_selectors.CurrencyFunnel]
    revenue: dict[dt.date, list[invoicing_selectors.CurrencyRevenue]]


def finance_figures_refresh(*, now: dt.datetime | None = None) -> FinanceFigures:
    """Ask the selectors (each once; the month arithmetic is the finance page's) and keep the
    answers for the home page (beat, every 2 minutes: ``billing_site.dashboard_finance_refresh``).
    At 1,000,000 accounts they read millions of index entries, seconds together: too slow for
    every load of the page, fine in the background."""
    now = now or timezone.now()
    this_month = finance.month_start(now)
    last_month = finance.previous_month(this_month)
    figures = FinanceFigures(
        as_of=now,
        funnel_month=last_month,
        ageing=invoicing_selectors.receivables_ageing(as_of=now),
        funnel=payment_selectors.dunning_funnel(month=last_month),
        revenue={month: invoicing_selectors.revenue(month=month) for month in (this_month, last_month)},
    )
    cache.set(FINANCE_CACHE_KEY, figures, timeout=settings.DASHBOARD_FINANCE_MAX_AGE_SECONDS)
    return figures


def finance_figures(now: dt.datetime) -> FinanceFigures:
    """The figures kept by the last refresh, unless older than ``DASHBOARD_FINANCE_MAX_AGE_SECONDS``
    or of another month (then asked now, and kept)."""
    kept = cache.get(FINANCE_CACHE_KEY)
    max_age = dt.timedelta(seconds=settings.DASHBOARD_FINANCE_MAX_AGE_SECONDS)
    if (
        isinstance(kept, FinanceFigures)
        and now - max_age <= kept.as_of <= now
        and finance.month_start(kept.as_of) == finance.month_start(now)
    ):
        return kept
    return finance_figures_refresh(now=now)


def finance_sections(request: HttpRequest, *, now: dt.datetime | None = None) -> list[Section]:
    """Finance's figures (the money views' selectors, one implementation each, as of their last
    refresh): only for those who may see the finance page."""
    if not request.user.has_perm(finance.VIEW_FIGURES):
        return []
    figures = finance_figures(now or timezone.now())
    sections = [
        receivables_section(figures.ageing),
        funnel_section(figures.funnel_month, figures.funnel),
        revenue_section(figures.revenue),
    ]
    sections[0].note = (
        f"as of {figures.as_of:%Y-%m-%d %H:%M:%S} UTC (finance's figures are refreshed every few minutes; "
        "the finance page is live)" + (f"; {sections[0].note}" if sections[0].note else "")
    )
    return sections


def index(request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
    """The admin's index with the figures above its app list (the admin builds the app list
    and checks access; this adds the context and the template)."""
    dashboard = build(request)
    context = {
        "dashboard": dashboard,
        "finance_sections": finance_sections(request, now=dashboard.now),
        **(extra_context or {}),
    }
    response = admin.site.index(request, extra_context=context)
    if isinstance(response, TemplateResponse):
        response.template_name = TEMPLATE
    return response
