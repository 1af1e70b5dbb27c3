"""How the tests read what a customer or an operator sees: the API as a service key with
``accounts:read`` gets it, the admin as an operator logged in, a PDF as the text laid out on
its pages."""

from __future__ import annotations

from typing import Any

from django.test import Client

from accounts import services as account_services
from accounts.models import BillingAccount, Scope
from conftest import client_with_key, staff_login


def operator(group: str) -> Client:
    user = account_services.operator_create(email=f"{group}@ops.test", password="pw-long-enough", groups=[group])
    return staff_login(Client(), user)


def laid_out(html: str) -> tuple[list[str], set[tuple[str, ...]], set[str]]:
    """The PDF rendered from ``html`` as a reader gets it: the text of every box laid out on
    its pages (footers included), the font families asked for, the families embedded."""
    import weasyprint  # type: ignore[import-untyped]

    document = weasyprint.HTML(string=html).render()
    texts, asked = [], set()
    for page in document.pages:
        for box in page._page_box.descendants():
            if getattr(box, "text", "").strip():
                texts.append(box.text.strip())
                asked.add(tuple(box.style["font_family"]))
    document.write_pdf()
    return texts, asked, {font.family for font in document.fonts.values()}


def api_invoice(account: BillingAccount, period_start: str = "2026-10-01") -> dict[str, Any]:
    reader = account_services.service_key_create(name="reader", scopes=[Scope.ACCOUNTS_READ], created_by_id=None)
    response = client_with_key(reader.raw).get(f"/api/v1/billing-accounts/{account.public_id}/invoices")
    assert response.status_code == 200, response.json()
    [invoice] = [body for body in response.json()["results"] if body["period_start"] == period_start]
    return dict(invoice)
