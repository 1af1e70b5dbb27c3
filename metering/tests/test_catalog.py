from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from metering.models import Price, PriceTier, Sku

pytestmark = pytest.mark.django_db

CATALOG = Path(__file__).resolve().parent.parent / "fixtures" / "catalog.json"


def snapshot() -> tuple[list, list, list]:
    return (
        list(Sku.objects.values_list("code", "name", "unit", "kind", "updated_at")),
        list(Price.objects.values_list("sku__code", "currency", "valid_from", "unit_price")),
        list(PriceTier.objects.values_list("price_id", "position", "up_to", "unit_price")),
    )


def load(path: Path) -> str:
    out = StringIO()
    call_command("load_catalog", str(path), stdout=out)
    return out.getvalue()


def test_loading_the_same_file_twice_changes_nothing() -> None:
    first = load(CATALOG)
    assert "SKUs 6 created" in first and "prices 25 created" in first
    before = snapshot()
    second = load(CATALOG)
    assert "SKUs 0 created, 0 updated, 6 unchanged; prices 0 created, 25 unchanged" in second
    assert snapshot() == before
    egress = Price.objects.get(sku__code="network.egress", currency="USD")
    assert egress.is_tiered
    tiers = [(t.up_to, t.unit_price) for t in egress.tiers.all()]
    assert tiers == [(Decimal(100), Decimal(0)), (Decimal(10240), Decimal("0.09")), (None, Decimal("0.07"))]


def test_a_later_price_supersedes_and_names_may_change(tmp_path: Path) -> None:
    load(CATALOG)
    document = json.loads(CATALOG.read_text())
    document["skus"][0]["name"] = "Virtual CPU"
    document["skus"][0]["prices"].append(
        {"currency": "USD", "unit_price": "0.0100", "valid_from": "2026-12-01T00:00:00+01:00"}
    )
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(document))
    assert "SKUs 0 created, 1 updated" in load(path)
    assert Sku.objects.get(code="compute.vcpu").name == "Virtual CPU"
    assert Price.objects.filter(sku__code="compute.vcpu", currency="USD").count() == 3


def _mutate(change: object) -> dict:
    document = json.loads(CATALOG.read_text())
    change(document)  # type: ignore[operator]
    return document


BAD = {
    "both price forms": (lambda d: d["skus"][4]["prices"][0].update(unit_price="1"), "either unit_price or tiers"),
    "no price form": (lambda d: d["skus"][0]["prices"][0].pop("unit_price"), "either unit_price or tiers"),
    "tiers not rising": (lambda d: d["skus"][4]["prices"][0]["tiers"][1].update(up_to="50"), "tiers must rise"),
    "bounded last tier": (lambda d: d["skus"][4]["prices"][0]["tiers"][2].update(up_to="99999"), "last tier"),
    "negative price": (lambda d: d["skus"][1]["prices"][0].update(unit_price="-0.01"), ">= 0"),
    "unknown field": (lambda d: d["skus"][1].update(colour="red"), "colour"),
    "bad kind": (lambda d: d["skus"][1].update(kind="hourly"), "kind"),
    "naive time": (lambda d: d["skus"][1]["prices"][0].update(valid_from="2026-01-01T00:00:00"), "valid_from"),
    "duplicate code": (lambda d: d["skus"].append(dict(d["skus"][0])), "appears twice"),
    "unknown currency": (lambda d: d["skus"][5]["prices"][0].update(currency="CHF"), "CHF"),
    "huge price": (lambda d: d["skus"][5]["prices"][0].update(unit_price="1" + "0" * 20), "too large"),
    "year one": (lambda d: d["skus"][5]["prices"][0].update(valid_from="0001-01-01T00:00:00+01:00"), "out of range"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_file_is_refused_with_the_reason_and_nothing_loaded(tmp_path: Path, case: str) -> None:
    change, reason = BAD[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutate(change)))
    with pytest.raises(CommandError, match="nothing was loaded") as err:
        load(path)
    assert reason in str(err.value)
    assert snapshot() == ([], [], [])


def test_a_loaded_price_never_changes_and_the_whole_load_rolls_back(tmp_path: Path) -> None:
    load(CATALOG)
    before = snapshot()
    document = json.loads(CATALOG.read_text())
    document["skus"][0]["name"] = "Renamed first"  # would succeed on its own
    document["skus"].append({"code": "new.sku", "name": "New", "unit": "x", "kind": "quantity", "prices": []})
    document["skus"][5]["prices"][0]["unit_price"] = "0.0000005"  # a changed amount: refused
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(document))
    with pytest.raises(CommandError, match="prices never change"):
        load(path)
    assert snapshot() == before


def test_a_sku_cannot_change_kind(tmp_path: Path) -> None:
    load(CATALOG)
    path = tmp_path / "kind.json"
    path.write_text(json.dumps(_mutate(lambda d: d["skus"][0].update(kind="quantity"))))
    with pytest.raises(CommandError, match="cannot become quantity"):
        load(path)


def test_unreadable_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        load(tmp_path / "missing.json")
    path = tmp_path / "junk.json"
    path.write_text("{not json")
    with pytest.raises(CommandError, match="not JSON"):
        load(path)
