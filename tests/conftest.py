"""Cross-app stories use the metering fixtures (the price catalog, a producer's key) and, when
they commit for real, start from empty rollups and the seeded VAT rates (see the invoicing
tests' conftest, which does the same)."""

from invoicing.tests.conftest import _clean_rollup_tables  # noqa: F401
from metering.tests.conftest import catalog, producer  # noqa: F401
