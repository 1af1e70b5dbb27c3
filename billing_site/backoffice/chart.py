"""The customer page's cost chart: stacked bars per month by SKU family, as inline SVG drawn on
the server (no script, no CDN). Amounts are Decimals in the account's currency; the bar heights
are the only place they become pixels."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from billing_site.common import money

# Colour-blind-safe palette (Okabe-Ito), one per family in order of total cost; the rest grey.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
OTHER = "#999999"
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 640, 220, 90, 24, 10


@dataclass(frozen=True, slots=True)
class CostMonth:
    month: dt.date
    family: str
    amount: Decimal


def _px(value: float) -> str:
    return f"{value:.1f}"


def months_back(today: dt.date, count: int) -> list[dt.date]:
    """The first days of the last ``count`` calendar months, this one included, oldest first."""
    year, month = today.year, today.month
    firsts = []
    for _ in range(count):
        firsts.append(dt.date(year, month, 1))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return list(reversed(firsts))


def cost_chart(rows: list[CostMonth], *, months: list[dt.date], currency: str) -> SafeString:
    """An SVG of stacked bars, one per month in ``months``, one segment per family, with a
    legend; each segment's tooltip (``<title>``) says the family, month and amount as money."""
    by_month: dict[dt.date, dict[str, Decimal]] = defaultdict(dict)
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        by_month[row.month][row.family] = by_month[row.month].get(row.family, Decimal(0)) + row.amount
        totals[row.family] += row.amount
    families = sorted(totals, key=lambda f: (-totals[f], f))
    colours = {f: PALETTE[i] if i < len(PALETTE) else OTHER for i, f in enumerate(families)}
    peak = max((sum(by_month[m].values(), Decimal(0)) for m in months), default=Decimal(0))
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(len(months), 1)
    bar_w = slot * 0.6

    def shown(amount: Decimal) -> str:
        return f"{money.format_amount(amount, currency)} {currency}"

    parts: list[SafeString] = []
    for i, month in enumerate(months):
        x = LEFT + i * slot + (slot - bar_w) / 2
        y = float(HEIGHT - BOTTOM)
        for family in families:
            amount = by_month[month].get(family)
            if not amount or peak <= 0:
                continue
            h = float(amount / peak) * plot_h
            y -= h
            parts.append(
                format_html(
                    '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{} {}: {}</title></rect>',
                    _px(x),
                    _px(y),
                    _px(bar_w),
                    _px(h),
                    colours[family],
                    family,
                    f"{month:%Y-%m}",
                    shown(amount),
                )
            )
        total = sum(by_month[month].values(), Decimal(0))
        parts.append(
            format_html(
                '<text x="{}" y="{}" text-anchor="middle" font-size="11">{}</text>',
                _px(x + bar_w / 2),
                HEIGHT - 8,
                f"{month:%b %Y}",
            )
        )
        if total:
            parts.append(
                format_html(
                    '<text x="{}" y="{}" text-anchor="middle" font-size="10">{}</text>',
                    _px(x + bar_w / 2),
                    _px(max(y - 3, TOP + 8)),
                    money.format_amount(total, currency),
                )
            )
    axis = format_html(
        '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#666"/>'
        '<text x="{}" y="{}" text-anchor="end" font-size="10">{}</text>'
        '<text x="{}" y="{}" text-anchor="end" font-size="10">0 {}</text>',
        LEFT - 4,
        TOP,
        LEFT - 4,
        HEIGHT - BOTTOM,
        LEFT - 8,
        TOP + 8,
        shown(peak),
        LEFT - 8,
        HEIGHT - BOTTOM,
        currency,
    )
    legend = format_html_join(
        "",
        '<li><span class="swatch" style="background:{}"></span>{} <span class="total">{}</span></li>',
        ((colours[f], f, shown(totals[f])) for f in families),
    )
    title = f"Cost per month by SKU family, {months[0]:%b %Y} to {months[-1]:%b %Y}" if months else "Cost"
    return format_html(
        '<svg class="cost-chart" role="img" viewBox="0 0 {} {}" width="{}" height="{}" '
        'xmlns="http://www.w3.org/2000/svg"><title>{}</title>{}{}</svg><ul class="cost-legend">{}</ul>',
        WIDTH,
        HEIGHT,
        WIDTH,
        HEIGHT,
        title,
        axis,
        mark_safe("".join(parts)),  # noqa: S308 (each part built by format_html)
        legend,
    )
