from __future__ import annotations

import pytest

# The price catalog, and the emptying of the hand-made metering tables for committing tests.
from metering.tests.conftest import _clean_metering_tables, catalog  # noqa: F401


@pytest.fixture(autouse=True)
def _seeded_tax_rates(request: pytest.FixtureRequest) -> None:
    """Committing tests are cleaned by Django's flush, which empties the VAT rates seeded by
    migration 0002 too: seed them again. (The ledger's append-only trigger does not stop the
    TRUNCATE that flush uses.)"""
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        return
    request.getfixturevalue("transactional_db")
    from invoicing.taxes import seed_rates

    seed_rates()
