"""The OpenAPI schema is valid, and the API honours it: schemathesis drives every
operation with generated requests (as a signed-up customer with a real account) and checks
for 5xx, undocumented status codes, content types and response bodies off the schema."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from django.core import signals
from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation

from accounts import services
from accounts.models import Membership
from accounts.tests.factories import BillingAccountFactory

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())


def test_schema_is_valid_with_no_warnings(tmp_path: object) -> None:
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")


@pytest.fixture
def keep_test_connection() -> Iterator[None]:
    """Schemathesis calls the WSGI app directly: keep Django from closing the test's
    connection (and its transaction) at the end of each request, as its test client does."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def caller(db: None, keep_test_connection: None) -> dict[str, str]:
    user, issued = services.user_signup(email="fuzz@example.test", password="correct-horse-battery-staple")
    account = BillingAccountFactory()
    Membership.objects.create(account=account, user=user, role="owner")
    producer = services.service_key_create(name="fuzz", scopes=["usage:write"], created_by_id=None)
    return {"key": issued.raw, "producer_key": producer.raw, "account_id": account.public_id}


@pytest.mark.django_db
@schema.parametrize()
# Random locally, so new runs explore; fixed in CI, so a landing is never decided by luck.
@settings(
    max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=bool(os.environ.get("CI"))
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, caller: dict[str, str]) -> None:
    positive_path = case.meta is None or not case.meta.is_negative_at(ParameterLocation.PATH)
    if positive_path and case.path_parameters and "account_id" in case.path_parameters:
        case.path_parameters["account_id"] = caller["account_id"]  # reach past the 404
    excluded = [schemathesis.checks.positive_data_acceptance]
    key = caller["key"]
    if case.path.startswith("/api/v1/usage/"):
        key = caller["producer_key"]
        # By contract, events that break the documented event schema are rejected one by one
        # inside a 200 (good events in the batch still go in), not with a 4xx for the batch.
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.call_and_validate(
        headers={"Authorization": f"Bearer {key}"},
        # "Schema-valid must be accepted" cannot hold for an API with semantic validation
        # (VAT checksums, ISO country codes, opaque cursors, the caller's roles): those get a
        # documented 4xx. Every other check runs: no 5xx, documented statuses, content types,
        # headers and bodies that conform, and schema-invalid input rejected.
        excluded_checks=excluded,
    )
