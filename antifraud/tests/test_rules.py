"""Each rule firing, and not, on its edge; what it says it saw."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from antifraud import rules
from antifraud.models import (
    AccountRisk,
    AccountSignal,
    BindingFailure,
    CardSeen,
    DomainVerdict,
    EmailDomain,
    SignupEvent,
)
from billing_site.common import ids

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
NL_IP, US_IP = "145.14.1.1", "8.8.8.8"  # by the bundled registry data


def subject(**fields: Any) -> rules.Subject:
    base: dict[str, Any] = {"account_id": 1000, "email": "ops@example.nl", "country": "NL", "tax_id": "", "now": NOW}
    return rules.Subject(**{**base, **fields})


def fire(code: str, subj: rules.Subject, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What the rule says of ``subj``, with the facts read from the tables as evaluation does."""
    params = params or {}
    facts = rules.gather(subj, {code: params})
    return rules.RULES[code](subj, facts, params)


def blocked(*account_ids: int) -> None:
    """Antifraud's record that these accounts are blocked (what the rules read)."""
    for account_id in account_ids:
        AccountRisk.objects.update_or_create(account_id=account_id, defaults={"status": "blocked"})


@pytest.mark.parametrize(
    ("email", "normalised"),
    [
        ("First.Last+cloud@Gmail.com", "firstlast@gmail.com"),
        ("first.last@googlemail.com", "firstlast@gmail.com"),
        ("first.last+x@outlook.com", "first.last@outlook.com"),
        ("first.last+x@example.nl", "first.last+x@example.nl"),
    ],
)
def test_emails_are_normalised_as_their_provider_delivers_them(email: str, normalised: str) -> None:
    assert rules.normalise_email(email)[0] == normalised


def test_ip_networks() -> None:
    assert rules.ip_prefix("203.0.113.77") == "203.0.113.0/24"
    assert rules.ip_prefix("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert rules.ip_prefix("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert rules.ip_country(NL_IP) == "NL" and rules.ip_country("10.0.0.1") == ""


@pytest.mark.django_db
def test_disposable_email_from_the_list_its_subdomains_and_the_analysts_overrides() -> None:
    fired = fire("disposable_email", subject(email="x@mailinator.com"), {})
    assert fired == {"domain": "mailinator.com", "listed": "mailinator.com", "source": "disposable-email-domains"}
    assert fire("disposable_email", subject(email="x@eu.mailinator.com"), {}) is not None
    assert fire("disposable_email", subject(email="x@example.nl"), {}) is None
    EmailDomain.objects.create(domain="mailinator.com", verdict=DomainVerdict.ALLOWED, reason="partner")
    assert fire("disposable_email", subject(email="x@mailinator.com"), {}) is None
    EmailDomain.objects.create(domain="burner.example", verdict=DomainVerdict.DISPOSABLE, reason="seen in a ring")
    fired = fire("disposable_email", subject(email="x@burner.example"), {})
    assert fired is not None and fired["source"] == "analysts"


def _signups(ip: str, count: int, *, hours_ago: float = 1, start: int = 1) -> None:
    SignupEvent.objects.bulk_create(
        SignupEvent(
            kind="account",
            subject_id=start + i,
            ip=ip,
            ip_prefix=rules.ip_prefix(ip),
            created_at=NOW - dt.timedelta(hours=hours_ago),
        )
        for i in range(count)
    )


PARAMS = {"window_hours": 24, "max_per_ip": 3, "max_per_prefix": 10}


@pytest.mark.django_db
def test_signup_velocity_from_one_ip_fires_at_its_threshold() -> None:
    _signups("203.0.113.5", 2)
    _signups("203.0.113.5", 5, hours_ago=25, start=100)  # outside the window
    assert fire("signup_velocity", subject(ip="203.0.113.5"), PARAMS) is None
    _signups("203.0.113.5", 1, start=10)
    fired = fire("signup_velocity", subject(ip="203.0.113.5"), PARAMS)
    assert fired is not None
    assert (fired["ip"], fired["signups_from_ip"], fired["network"]) == ("203.0.113.5", 3, "203.0.113.0/24")


@pytest.mark.django_db
def test_signup_velocity_from_one_network_v4_and_v6() -> None:
    for i in range(9):
        _signups(f"203.0.113.{i + 10}", 1, start=i + 1)
    assert fire("signup_velocity", subject(ip="203.0.113.200"), PARAMS) is None
    _signups("203.0.113.99", 1, start=50)
    fired = fire("signup_velocity", subject(ip="203.0.113.200"), PARAMS)
    assert fired is not None and fired["signups_from_network"] == 10 and fired["signups_from_ip"] == 0
    for i in range(10):
        _signups(f"2001:db8:1:2::{i + 1:x}", 1, start=200 + i)
    fired = fire("signup_velocity", subject(ip="2001:db8:1:2::ff"), PARAMS)
    assert fired is not None and fired["network"] == "2001:db8:1:2::/64"
    assert fire("signup_velocity", subject(ip="2001:db8:1:3::ff"), PARAMS) is None


def _cards(fingerprint: str, *account_ids: int) -> None:
    CardSeen.objects.bulk_create(
        CardSeen(account_id=a, fingerprint=fingerprint, brand="visa", last4="4242") for a in account_ids
    )


CARD = rules.Card(fingerprint="fp_visa", brand="visa", last4="4242", country="NL", funding="credit")


@pytest.mark.django_db
def test_card_reuse_on_more_than_n_accounts_and_any_blocked_one() -> None:
    _cards("fp_visa", 1)
    assert fire("card_reuse", subject(card=CARD), {"max_accounts": 2}) is None  # 2 accounts: allowed
    _cards("fp_visa", 2)
    fired = fire("card_reuse", subject(card=CARD), {"max_accounts": 2})
    assert fired is not None and fired["accounts"] == 3
    assert fired["shared_with"] == sorted([ids.encode("acc", 1), ids.encode("acc", 2)])
    assert "insists" not in fired
    # One account, but blocked: block whatever the count.
    CardSeen.objects.all().delete()
    _cards("fp_visa", 7)
    blocked(7)
    fired = fire("card_reuse", subject(card=CARD), {"max_accounts": 2})
    assert fired is not None and fired["insists"] == "block"
    assert fired["blocked_accounts"] == [ids.encode("acc", 7)]


@pytest.mark.django_db
def test_card_testing_by_account_user_or_ip_within_the_window() -> None:
    params = {"window_minutes": 60, "max_failures": 5}
    BindingFailure.objects.bulk_create(
        BindingFailure(account_id=2000 + i, user_id=None, ip="198.51.100.7", created_at=NOW - dt.timedelta(minutes=10))
        for i in range(4)
    )
    BindingFailure.objects.create(account_id=1, ip="198.51.100.7", created_at=NOW - dt.timedelta(minutes=61))
    assert fire("card_testing", subject(ip="198.51.100.7"), params) is None
    BindingFailure.objects.create(account_id=3000, ip="198.51.100.7", created_at=NOW - dt.timedelta(minutes=1))
    fired = fire("card_testing", subject(ip="198.51.100.7"), params)
    assert fired is not None and fired["over_threshold"] == ["ip"] and fired["failed_bindings"]["ip"] == 5


@pytest.mark.django_db
def test_country_mismatch_between_card_billing_and_ip() -> None:
    assert fire("country_mismatch", subject(ip=NL_IP, card=CARD), {}) is None
    fired = fire("country_mismatch", subject(ip=US_IP, card=CARD), {})
    assert fired == {"countries": {"billing": "NL", "card": "NL", "ip": "US"}, "ip": US_IP}
    assert fire("country_mismatch", subject(ip="10.0.0.1", card=CARD), {}) is None  # unknown: no opinion


@pytest.mark.django_db
def test_prepaid_cards_on_new_accounts_only() -> None:
    prepaid = rules.Card(fingerprint="fp", brand="visa", last4="1111", funding="prepaid")
    params = {"new_account_days": 30}
    AccountSignal.objects.create(account_id=1000, created_at=NOW - dt.timedelta(days=30))
    assert fire("prepaid_card", subject(card=prepaid), params) is not None
    AccountSignal.objects.filter(account_id=1000).update(created_at=NOW - dt.timedelta(days=31))
    assert fire("prepaid_card", subject(card=prepaid), params) is None
    assert fire("prepaid_card", subject(card=CARD), params) is None


@pytest.mark.django_db
def test_links_to_a_blocked_account_by_email_ip_tax_id_phone_or_card() -> None:
    AccountSignal.objects.create(account_id=7, email_normalised="firstlast@gmail.com", ip="203.0.113.9", tax_id="")
    AccountSignal.objects.create(account_id=8, email_normalised="other@example.nl", ip=None, tax_id="NL004495445B01")
    AccountSignal.objects.create(account_id=6, email_normalised="third@example.nl", phone="+31201234567")
    me = subject(email="First.Last+2@gmail.com", tax_id="NL004495445B01", phone="+31201234567")
    assert fire("linked_accounts", me, {}) is None  # linked, but to accounts in good standing
    blocked(6, 7, 8)
    fired = fire("linked_accounts", me, {})
    assert fired is not None and fired["insists"] == "review"
    assert fired["linked_blocked_accounts"] == [
        {"account": ids.encode("acc", 6), "shared": ["phone +31201234567"]},
        {"account": ids.encode("acc", 7), "shared": ["email firstlast@gmail.com"]},
        {"account": ids.encode("acc", 8), "shared": ["tax id NL004495445B01"]},
    ]
    # Another number: no link by phone.
    fired = fire("linked_accounts", subject(email="x@example.nl", phone="+31201234568"), {})
    assert fired is None
    _cards("fp_visa", 9)
    blocked(9)
    fired = fire("linked_accounts", subject(card=CARD), {})
    assert fired is not None and fired["linked_blocked_accounts"][0]["shared"] == ["card visa •••• 4242"]


@pytest.mark.django_db
def test_repeated_declines_and_any_dispute() -> None:
    from antifraud.models import PaymentOutcome

    params = {"window_days": 30, "max_declines": 3, "max_disputes": 1}
    for i in range(2):
        PaymentOutcome.objects.create(account_id=1000, kind="decline", reference=f"pay_{i}", created_at=NOW)
    PaymentOutcome.objects.create(
        account_id=1000, kind="decline", reference="pay_old", created_at=NOW - dt.timedelta(days=31)
    )
    PaymentOutcome.objects.create(account_id=1001, kind="decline", reference="pay_other", created_at=NOW)
    assert fire("payment_trouble", subject(), params) is None
    PaymentOutcome.objects.create(account_id=1000, kind="decline", reference="pay_3", created_at=NOW)
    fired = fire("payment_trouble", subject(), params)
    assert fired is not None and (fired["declines"], fired["disputes"]) == (3, 0) and "insists" not in fired
    PaymentOutcome.objects.create(account_id=1000, kind="dispute", reference="dsp_1", created_at=NOW)
    fired = fire("payment_trouble", subject(), params)
    assert fired is not None and fired["disputes"] == 1 and fired["insists"] == "review"


@pytest.mark.django_db
def test_every_look_up_of_the_facts_statement_has_an_index_under_its_generic_plan() -> None:
    """The facts statement is prepared once per connection and planned for any parameters: each
    of its look-ups must have an index to probe whatever the values (a phone look-up that missed
    its partial index scanned every account's signals: 175 ms on 1,000,000 accounts). With
    sequential scans priced out, any left in the plan is a look-up without an index."""
    import re

    from django.db import connection

    every_rule = {code: {} for code in rules.RULES}
    me = subject(user_id=5, ip=NL_IP, tax_id="NL004495445B01", phone="+31201234567", card=CARD)
    sql, params = rules.facts_statement(me, every_rule)
    names: list[str] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", positional, sql).replace("%%", "%")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("PREPARE facts_plan AS " + prepared.replace("%", "%%"))
        values = [params[name] for name in names]
        cursor.execute(f"EXPLAIN EXECUTE facts_plan({', '.join(['%s'] * len(values))})", values)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE facts_plan")
    assert "Seq Scan" not in plan, plan
