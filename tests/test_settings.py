"""Production settings are safe, and the zero-configuration defaults behave as documented."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG"}}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


PRODUCTION = {
    "DJANGO_SETTINGS_MODULE": "billing_site.settings.production",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "billing.example.com",
    "DATABASE_URL": "postgres://billing@db.internal:5432/billing",
    "REDIS_URL": "redis://cache.internal:6379/0",
}


def test_check_deploy_is_clean_under_production_settings() -> None:
    result = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stderr


@pytest.mark.parametrize("missing", ["SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL"])
def test_production_refuses_to_start_without_its_secrets(missing: str) -> None:
    env = {k: v for k, v in PRODUCTION.items() if k != missing}
    result = _manage("check", **env)
    assert result.returncode != 0
    assert f"{missing} must be set in production" in result.stderr


@pytest.mark.django_db
def test_without_a_broker_tasks_run_inline() -> None:
    from billing_site.celery import app
    from billing_site.tasks import worker_health

    assert app.conf.task_always_eager is True  # the test settings configure no broker
    assert worker_health.delay().get(timeout=5)["status"] == "ok"


@pytest.mark.parametrize("grace", ["-1", "4320"])
def test_a_grace_time_beat_could_never_honour_is_refused_at_start(grace: str) -> None:
    result = _manage("check", INVOICING_GRACE_MINUTES=grace)
    assert result.returncode != 0
    assert "INVOICING_GRACE_MINUTES must be between 0 and 4319" in result.stderr


def test_an_hourly_retention_shorter_than_the_acceptance_window_and_the_close_is_refused_at_start() -> None:
    result = _manage("check", METERING_HOURLY_RETENTION_MONTHS="2")  # 35 days + the close + a month: 3
    assert result.returncode != 0
    assert "METERING_HOURLY_RETENTION_MONTHS must cover METERING_MAX_EVENT_AGE_DAYS" in result.stderr
    assert "at least 3, not 2" in result.stderr
    assert _manage("check", METERING_HOURLY_RETENTION_MONTHS="3").returncode == 0
