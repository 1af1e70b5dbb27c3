"""Cross-app stories use the metering fixtures (the price catalog, a producer's key) and, when
they commit for real, start from empty rollups and the seeded VAT rates."""

from invoicing.tests.conftest import _seeded_tax_rates  # noqa: F401
from metering.tests.conftest import _clean_metering_tables, catalog, producer  # noqa: F401
