"""``/healthz`` and ``/readyz`` for load balancers and orchestrators (no login; they say
nothing about customers).

- ``/healthz``: the process is up and serves requests. It touches nothing else, so a database
  outage never makes an orchestrator restart every web process at once.
- ``/readyz``: this process can do its work: the database answers, every migration on disk is
  applied (the migration graph's leaf nodes, read from disk once per process, are all recorded
  in ``django_migrations``: one indexed query), and the Celery broker answers when one is
  configured. 200 when all hold, else 503 with each check's answer.
"""

from __future__ import annotations

import functools
import time

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.loader import MigrationLoader
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from billing_site.backoffice import broker


@functools.cache
def migration_leaves() -> tuple[tuple[str, str], ...]:
    """The latest migration of every app, as on disk (what ``migrate`` would bring the
    database to). Read once per process: the code does not change under it."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    return tuple(sorted(loader.graph.leaf_nodes()))


def unapplied_migrations() -> list[str]:
    """Leaf migrations not recorded as applied (``app.name``); raises if the database is down."""
    leaves = migration_leaves()
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            "SELECT app, name FROM django_migrations WHERE (app, name) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            [[app for app, _ in leaves], [name for _, name in leaves]],
        )
        applied = set(cursor.fetchall())
    return [f"{app}.{name}" for app, name in leaves if (app, name) not in applied]


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, dict[str, object]] = {}
    started = time.monotonic()
    try:
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = {"ok": True}
    except Exception as exc:  # unreachable, refused, timed out: all "not ready"
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()[:300]}
    if checks["database"]["ok"]:
        try:
            missing = unapplied_migrations()
            checks["migrations"] = {"ok": not missing, **({"unapplied": missing} if missing else {})}
        except Exception as exc:
            checks["migrations"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    else:
        checks["migrations"] = {"ok": False, "error": "database unreachable"}
    if broker.configured():
        error = broker.ping()
        checks["broker"] = {"ok": error is None, **({"error": error[:300]} if error else {})}
    ready = all(check["ok"] for check in checks.values())
    return JsonResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "ms": round((time.monotonic() - started) * 1000),
        },
        status=200 if ready else 503,
    )
