"""Events as producers write them, for the metering tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from accounts.models import BillingAccount


def lifecycle(
    account: BillingAccount,
    event_id: str,
    moment: dt.datetime,
    action: str,
    resource_id: str = "vm-1",
    spec: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": event_id,
        "account_id": account.public_id,
        "time": moment.isoformat(),
        "type": "resource",
        "resource_id": resource_id,
        "action": action,
    }
    if action != "stop":
        # Units go over the wire as decimal strings, the API's one grammar for them.
        event["spec"] = {
            code: str(units) for code, units in (spec if spec is not None else {"compute.vcpu": 2}).items()
        }
    if labels is not None:
        event["labels"] = labels
    return event


def used(
    account: BillingAccount,
    event_id: str,
    moment: dt.datetime,
    quantity: str,
    sku: str = "network.egress",
    resource_id: str | None = None,
) -> dict[str, Any]:
    event = {
        "id": event_id,
        "account_id": account.public_id,
        "time": moment.isoformat(),
        "type": "usage",
        "sku": sku,
        "quantity": quantity,
    }
    if resource_id:
        event["resource_id"] = resource_id
    return event
