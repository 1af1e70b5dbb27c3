from __future__ import annotations

import pytest
from django.db import connection

from metering.tests.conftest import catalog  # noqa: F401  (the price catalog fixture)


@pytest.fixture(autouse=True)
def _clean_rollup_tables(request: pytest.FixtureRequest) -> None:
    """Committing tests are cleaned by Django's flush, which does not know the hand-made
    metering tables (emptied here) and empties the seeded VAT rates (seeded again here).
    The ledger's append-only trigger does not stop TRUNCATE, which flush uses."""
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        return
    request.getfixturevalue("transactional_db")
    from invoicing.taxes import seed_rates

    seed_rates()  # flushed with the rest after the previous committing test
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE metering_usageevent, metering_resourceevent, metering_resourcestate, metering_hourlyusage, "
            "metering_dailyusage"
        )
