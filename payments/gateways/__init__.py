"""Card gateways behind one interface (``base.Gateway``): ``sandbox`` and ``stripe``."""

from __future__ import annotations

from functools import cache

from payments.gateways.base import Gateway


@cache
def gateway(name: str) -> Gateway:
    """The configured gateway called ``name`` (one instance per process)."""
    if name == "sandbox":
        from payments.gateways.sandbox import SandboxGateway

        return SandboxGateway.from_settings()
    if name == "stripe":
        from payments.gateways.stripe import StripeGateway

        return StripeGateway.from_settings()
    raise ValueError(f"Unknown gateway {name!r}")


def reset() -> None:
    """Forget the gateways built so far (tests that change their settings)."""
    gateway.cache_clear()
