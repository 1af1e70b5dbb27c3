"""The back office's own tasks (autodiscovered: ``billing_site.backoffice`` is an installed app)."""

from __future__ import annotations

from celery import shared_task

from billing_site.backoffice import dashboard


@shared_task(name="billing_site.dashboard_finance_refresh")
def dashboard_finance_refresh() -> str:
    """Finance's figures for the staff home page, asked of the selectors and kept (beat, every
    2 minutes): the page shows them without reading millions of rows on each load."""
    return dashboard.finance_figures_refresh().as_of.isoformat()
