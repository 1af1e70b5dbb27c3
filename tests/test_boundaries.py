"""The app boundaries of pyproject.toml's import-linter contracts (run by `make lint`) hold,
and the contracts catch a new leak or import cycle: shown on a copy of the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("accounts", "metering", "invoicing", "payments", "antifraud", "billing_site")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The project's Python packages and pyproject.toml, copied (no templates, fixtures or caches)."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "templates", "fixtures")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "code", "contract"),
    [
        ("metering/leak.py", "from accounts.models import BillingAccount\n", "accounts' internals are its own"),
        ("invoicing/leak.py", "from metering import rollup\n", "metering's internals are its own"),
        ("accounts/leak.py", "from invoicing import selectors\n", "accounts imports no other app"),
        ("billing_site/common/leak.py", "from accounts import selectors\n", "shared helpers import no app"),
        # services would import the tasks that import services: a cycle inside invoicing
        ("invoicing/services.py", "\nfrom invoicing import tasks  # noqa\n", "No import cycle"),
        ("invoicing/leak.py", "from payments import selectors\n", "invoicing knows nothing of payments"),
        ("accounts/leak.py", "from payments.models import Payment\n", "payments' internals are its own"),
        ("payments/services.py", "\nimport stripe  # noqa\n", "the stripe SDK is imported in exactly one module"),
        ("metering/ingest.py", "\nimport nats  # noqa\n", "the nats client is imported in exactly one module"),
        ("metering/hours.py", "\nimport chdb  # noqa\n", "the ClickHouse engines are imported in exactly one module"),
    ],
)
def test_a_new_leak_breaks_a_contract(tree: Path, module: str, code: str, contract: str) -> None:
    path = tree / module
    path.write_text((path.read_text() if path.exists() else "") + code)
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    # "<name> BROKEN", or "<name> BROKEN (1 ignored import)" for a contract with an exception
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN") or " BROKEN (" in line]
    assert any(line.startswith(contract) for line in broken), result.stdout
