"""A rule's parameters are checked against its schema wherever a rule is written (the admin,
the service), and evaluation survives a rule it cannot run: the rule is skipped, logged and
recorded on the assessment, and the checkpoint still decides (issue 19: ``{"max_accounts":
"x"}`` made every card binding answer 500)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.db import connection

from accounts.models import AccountState
from antifraud import rules, services
from antifraud.models import RiskAssessment, RiskRule, RulesVersion
from antifraud.tests.test_checkpoints import NL_IP, bind, latest, open_account
from antifraud.tests.test_review import staff
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from conftest import Customer
from tests.pages import press


def rule_url(code: str) -> str:
    return f"/admin/antifraud/riskrule/{RiskRule.objects.get(code=code).pk}/change/"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"max_accounts": "x"}, "max_accounts"),
        ([1, 2], "JSON object"),
        ({"max_accounts": 0}, "max_accounts"),
        ({"max_acounts": 3}, "max_acounts"),  # a misspelt threshold would be ignored in silence
    ],
)
def test_the_admin_refuses_parameters_the_rule_cannot_read_naming_the_parameter(params: Any, named: str) -> None:
    fraud = staff("fraud")
    versions = RulesVersion.objects.count()
    response = press(fraud, rule_url("card_reuse"), "Save", params=json.dumps(params))
    assert response.status_code == 200  # the form again, with the error
    page = response.content.decode()
    assert "errorlist" in page and named in page
    assert RiskRule.objects.get(code="card_reuse").params == {"max_accounts": 2}
    assert RulesVersion.objects.count() == versions


@pytest.mark.django_db
def test_a_valid_change_through_the_admin_is_a_new_audited_rules_version() -> None:
    fraud = staff("fraud")
    response = press(fraud, rule_url("card_reuse"), "Save", params='{"max_accounts": 3}', weight="45")
    assert response.status_code == 302
    rule = RiskRule.objects.get(code="card_reuse")
    assert (rule.params, rule.weight) == ({"max_accounts": 3}, 45)
    version = RulesVersion.objects.order_by("-version").first()
    assert version is not None and version.created_by == "fraud@ops.test"
    assert version.created_by_user_id is not None
    assert version.changes == {
        "card_reuse.params": [{"max_accounts": 2}, {"max_accounts": 3}],
        "card_reuse.weight": [50, 45],
    }
    assert version.snapshot["rules"]["card_reuse"]["params"] == {"max_accounts": 3}


@pytest.mark.django_db
def test_the_service_refuses_bad_parameters_with_a_stable_code_and_the_field_named() -> None:
    with pytest.raises(ApplicationError) as refused:
        services.risk_rule_update(
            code="payment_trouble", actor=Actor.system("tests"), params={"window_days": "soon", "max_declines": 3}
        )
    assert refused.value.code == "invalid_params"
    assert [e["field"] for e in refused.value.errors] == ["params.window_days"]
    assert RiskRule.objects.get(code="payment_trouble").params["window_days"] == 30


@pytest.mark.django_db
def test_a_bad_row_written_past_the_service_skips_the_rule_and_binding_still_succeeds(
    customer: Customer, caplog: pytest.LogCaptureFixture
) -> None:
    with connection.cursor() as cursor:  # as an old release, or SQL by hand, would have left it
        cursor.execute("""UPDATE antifraud_riskrule SET params = '{"max_accounts": "x"}' WHERE code = 'card_reuse'""")
        cursor.execute("UPDATE antifraud_riskrule SET params = '[1, 2]' WHERE code = 'card_testing'")
    services.rules_cache_clear()
    account = open_account(customer, NL_IP)
    with caplog.at_level(logging.ERROR, logger="antifraud"):
        response = bind(customer, account, "pm_card_visa")
    assert response.status_code == 201, response.content
    assert account.state == AccountState.ACTIVE  # the checkpoint still decided: allow
    assessment = latest(account, "card_binding")
    assert assessment.decision == "allow"
    skipped = {s["rule"]: s["error"] for s in assessment.skipped}
    assert set(skipped) == {"card_reuse", "card_testing"}
    assert "max_accounts" in skipped["card_reuse"] and "JSON object" in skipped["card_testing"]
    assert any(r.getMessage() == "antifraud.rule_invalid" for r in caplog.records)


@pytest.mark.django_db
def test_a_rule_that_raises_is_skipped_and_the_others_still_decide(
    customer: Customer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> None:
        raise ValueError("invalid literal for int() with base 10: 'x'")

    monkeypatch.setitem(rules.RULES, "disposable_email", broken)
    with caplog.at_level(logging.ERROR, logger="antifraud"):
        account = open_account(customer, "8.8.8.8", email="x@mailinator.com")  # the IP abroad still counts
    signup = latest(account, "signup")
    assert [f["rule"] for f in signup.fired] == ["country_mismatch"]
    error = "ValueError: invalid literal for int() with base 10: 'x'"
    assert signup.skipped == [{"rule": "disposable_email", "error": error}]
    failed = next(r for r in caplog.records if r.getMessage() == "antifraud.rule_failed")
    assert failed.exc_info is not None and failed.rule == "disposable_email"  # type: ignore[attr-defined]
    assert RiskAssessment.objects.filter(account_id=account.id).count() == 1
