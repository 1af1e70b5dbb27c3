"""Cross-app stories use the metering fixtures (the price catalog, a producer's key)."""

from metering.tests.conftest import catalog, producer  # noqa: F401
