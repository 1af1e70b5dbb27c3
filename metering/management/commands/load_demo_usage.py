"""A month of synthetic usage for the demo accounts, sent through the real endpoint.

VMs are started, resized and stopped; disks come with them; a GPU box runs for a few days;
egress and object-storage requests arrive hourly. Event ids are deterministic and an
account that already has events is skipped, so running it again changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from io import StringIO
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.authentication import Scope
from metering import rollup, selectors

CATALOG = Path(__file__).resolve().parents[2] / "fixtures" / "catalog.json"
DEMO_ACCOUNTS = ("Acme Cloud BV", "Globex GmbH", "Initech Ltd", "Hooli Inc")
DAYS = 30


def synthetic_month(account: Any, *, now: dt.datetime, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311 (synthetic data, not secrets)
    start = (now - dt.timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0)
    events: list[dict[str, Any]] = []

    def add(event_id: str, moment: dt.datetime, **fields: Any) -> None:
        events.append({"id": event_id, "account_id": account.public_id, "time": moment.isoformat(), **fields})

    projects = ["web", "data", "ml"]
    for vm in range(6):
        project = projects[vm % 3]
        labels = {"project": project, "env": "prod" if vm % 2 == 0 else "staging"}
        spec = {
            "compute.vcpu": rng.choice(["2", "4", "8"]),
            "compute.ram": rng.choice(["4", "8", "16", "32"]),
            "storage.disk.ssd": rng.choice(["50", "100", "200"]),
        }
        moment = start + dt.timedelta(hours=rng.randrange(0, 72), minutes=rng.randrange(60))
        add(f"vm-{vm}-start", moment, type="resource", resource_id=f"vm-{vm}", action="start", spec=spec, labels=labels)
        for resize in range(rng.randrange(0, 3)):
            moment += dt.timedelta(days=rng.randrange(3, 9), minutes=rng.randrange(60))
            if moment >= now:
                break
            spec = {
                **spec,
                "compute.vcpu": str(int(spec["compute.vcpu"]) * 2),
                "compute.ram": str(int(spec["compute.ram"]) * 2),
            }
            add(
                f"vm-{vm}-resize-{resize}",
                moment,
                type="resource",
                resource_id=f"vm-{vm}",
                action="update",
                spec=spec,
                labels=labels,
            )
        if vm % 3 == 2:  # some VMs are stopped before the month is out
            stop = moment + dt.timedelta(days=rng.randrange(2, 10))
            if stop < now:
                add(f"vm-{vm}-stop", stop, type="resource", resource_id=f"vm-{vm}", action="stop", labels=labels)
    gpu_start = start + dt.timedelta(days=12, hours=3)
    add(
        "gpu-1-start",
        gpu_start,
        type="resource",
        resource_id="gpu-1",
        action="start",
        spec={"compute.gpu.a100": "1", "compute.vcpu": "12", "compute.ram": "85"},
        labels={"project": "ml"},
    )
    add(
        "gpu-1-stop",
        gpu_start + dt.timedelta(days=3, hours=5),
        type="resource",
        resource_id="gpu-1",
        action="stop",
        labels={"project": "ml"},
    )
    hour = start
    while hour < now - dt.timedelta(hours=1):
        stamp = hour.strftime("%Y%m%d%H")
        add(
            f"egress-{stamp}",
            hour + dt.timedelta(minutes=rng.randrange(60)),
            type="usage",
            sku="network.egress",
            quantity=f"{rng.uniform(0.05, 2.5):.6f}",
            resource_id=f"vm-{rng.randrange(6)}",
            labels={"project": rng.choice(projects)},
        )
        add(
            f"requests-{stamp}",
            hour + dt.timedelta(minutes=rng.randrange(60)),
            type="usage",
            sku="storage.object.requests",
            quantity=str(rng.randrange(1_000, 250_000)),
            resource_id="bucket-assets",
            labels={"project": "web"},
        )
        hour += dt.timedelta(hours=1)
    return events


class Command(BaseCommand):
    help = "Load the price catalog and ingest a month of synthetic usage for the demo accounts."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even with DEBUG off (never in production).")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not (settings.DEBUG or force):
            raise CommandError("Demo usage is for demo databases: DEBUG must be on (or --force).")
        out = StringIO()
        call_command("load_catalog", str(CATALOG), stdout=out)
        self.stdout.write(out.getvalue().strip())
        selectors.sku_cache_clear()
        # A key of its own to send through the endpoint, revoked when done (demo_access prints
        # a producer key to try).
        key = account_services.service_key_create(name="demo-loader", scopes=[Scope.USAGE_WRITE], created_by_id=None)
        client = Client(HTTP_AUTHORIZATION=f"Bearer {key.raw}", SERVER_NAME="127.0.0.1")
        now = dt.datetime.now(dt.UTC)
        for seed, account in enumerate(account_selectors.billing_accounts_named(names=list(DEMO_ACCOUNTS))):
            if selectors.usage_event_count(account_id=account.id):
                self.stdout.write(f"{account.name}: has usage already, skipped")
                continue
            events = synthetic_month(account, now=now, seed=seed)
            totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
            for i in range(0, len(events), 5_000):
                response = client.post(
                    "/api/v1/usage/events",
                    json.dumps({"events": events[i : i + 5_000]}),
                    content_type="application/json",
                )
                if response.status_code != 200:
                    raise CommandError(f"ingestion failed: {response.status_code} {response.content[:500]!r}")
                body = response.json()
                totals["accepted"] += body["accepted"]
                totals["duplicates"] += body["duplicates"]
                totals["rejected"] += len(body["rejected"])
            self.stdout.write(
                f"{account.name}: {totals['accepted']} events accepted, {totals['duplicates']} duplicates, "
                f"{totals['rejected']} rejected"
            )
        account_services.api_key_revoke(key_id=key.key.id, user_id=None)
        report = rollup.rollup(now=now)
        self.stdout.write(f"Rollup: {report.summary()}")
