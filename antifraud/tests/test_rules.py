"""Each rule firing, and not, on its edge; what it says it saw."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from antifraud import rules
from antifraud.models import AccountSignal, BindingFailure, CardSeen, DomainVerdict, EmailDomain, SignupEvent
from billing_site.common import ids

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
NL_IP, US_IP = "145.14.1.1", "8.8.8.8"  # by the bundled registry data


def subject(**fields: Any) -> rules.Subject:
    base: dict[str, Any] = {
        "account_id": 1000,
        "email": "ops@example.nl",
        "country": "NL",
        "tax_id": "",
        "created_at": NOW - dt.timedelta(days=1),
        "now": NOW,
    }
    return rules.Subject(**{**base, **fields})


def states(mapping: dict[int, str]) -> Callable[[set[int]], dict[int, str]]:
    return lambda account_ids: {a: mapping.get(a, "active") for a in account_ids}


ACTIVE = states({})


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
    fired = rules.disposable_email(subject(email="x@mailinator.com"), {}, ACTIVE)
    assert fired == {"domain": "mailinator.com", "listed": "mailinator.com", "source": "disposable-email-domains"}
    assert rules.disposable_email(subject(email="x@eu.mailinator.com"), {}, ACTIVE) is not None
    assert rules.disposable_email(subject(email="x@example.nl"), {}, ACTIVE) is None
    EmailDomain.objects.create(domain="mailinator.com", verdict=DomainVerdict.ALLOWED, reason="partner")
    assert rules.disposable_email(subject(email="x@mailinator.com"), {}, ACTIVE) is None
    EmailDomain.objects.create(domain="burner.example", verdict=DomainVerdict.DISPOSABLE, reason="seen in a ring")
    fired = rules.disposable_email(subject(email="x@burner.example"), {}, ACTIVE)
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
    assert rules.signup_velocity(subject(ip="203.0.113.5"), PARAMS, ACTIVE) is None
    _signups("203.0.113.5", 1, start=10)
    fired = rules.signup_velocity(subject(ip="203.0.113.5"), PARAMS, ACTIVE)
    assert fired is not None
    assert (fired["ip"], fired["signups_from_ip"], fired["network"]) == ("203.0.113.5", 3, "203.0.113.0/24")


@pytest.mark.django_db
def test_signup_velocity_from_one_network_v4_and_v6() -> None:
    for i in range(9):
        _signups(f"203.0.113.{i + 10}", 1, start=i + 1)
    assert rules.signup_velocity(subject(ip="203.0.113.200"), PARAMS, ACTIVE) is None
    _signups("203.0.113.99", 1, start=50)
    fired = rules.signup_velocity(subject(ip="203.0.113.200"), PARAMS, ACTIVE)
    assert fired is not None and fired["signups_from_network"] == 10 and fired["signups_from_ip"] == 0
    for i in range(10):
        _signups(f"2001:db8:1:2::{i + 1:x}", 1, start=200 + i)
    fired = rules.signup_velocity(subject(ip="2001:db8:1:2::ff"), PARAMS, ACTIVE)
    assert fired is not None and fired["network"] == "2001:db8:1:2::/64"
    assert rules.signup_velocity(subject(ip="2001:db8:1:3::ff"), PARAMS, ACTIVE) is None


def _cards(fingerprint: str, *account_ids: int) -> None:
    CardSeen.objects.bulk_create(
        CardSeen(account_id=a, fingerprint=fingerprint, brand="visa", last4="4242") for a in account_ids
    )


CARD = rules.Card(fingerprint="fp_visa", brand="visa", last4="4242", country="NL", funding="credit")


@pytest.mark.django_db
def test_card_reuse_on_more_than_n_accounts_and_any_blocked_one() -> None:
    _cards("fp_visa", 1)
    assert rules.card_reuse(subject(card=CARD), {"max_accounts": 2}, ACTIVE) is None  # 2 accounts: allowed
    _cards("fp_visa", 2)
    fired = rules.card_reuse(subject(card=CARD), {"max_accounts": 2}, ACTIVE)
    assert fired is not None and fired["accounts"] == 3
    assert fired["shared_with"] == sorted([ids.encode("acc", 1), ids.encode("acc", 2)])
    assert "insists" not in fired
    # One account, but blocked: block whatever the count.
    CardSeen.objects.all().delete()
    _cards("fp_visa", 7)
    fired = rules.card_reuse(subject(card=CARD), {"max_accounts": 2}, states({7: "blocked"}))
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
    assert rules.card_testing(subject(ip="198.51.100.7"), params, ACTIVE) is None
    BindingFailure.objects.create(account_id=3000, ip="198.51.100.7", created_at=NOW - dt.timedelta(minutes=1))
    fired = rules.card_testing(subject(ip="198.51.100.7"), params, ACTIVE)
    assert fired is not None and fired["over_threshold"] == ["ip"] and fired["failed_bindings"]["ip"] == 5


@pytest.mark.django_db
def test_country_mismatch_between_card_billing_and_ip() -> None:
    assert rules.country_mismatch(subject(ip=NL_IP, card=CARD), {}, ACTIVE) is None
    fired = rules.country_mismatch(subject(ip=US_IP, card=CARD), {}, ACTIVE)
    assert fired == {"countries": {"billing": "NL", "card": "NL", "ip": "US"}, "ip": US_IP}
    assert rules.country_mismatch(subject(ip="10.0.0.1", card=CARD), {}, ACTIVE) is None  # unknown: no opinion


def test_prepaid_cards_on_new_accounts_only() -> None:
    prepaid = rules.Card(fingerprint="fp", brand="visa", last4="1111", funding="prepaid")
    params = {"new_account_days": 30}
    assert rules.prepaid_card(subject(card=prepaid), params, ACTIVE) is not None
    old = subject(card=prepaid, created_at=NOW - dt.timedelta(days=31))
    assert rules.prepaid_card(old, params, ACTIVE) is None
    assert rules.prepaid_card(subject(card=CARD), params, ACTIVE) is None


@pytest.mark.django_db
def test_links_to_a_blocked_account_by_email_ip_tax_id_or_card() -> None:
    AccountSignal.objects.create(account_id=7, email_normalised="firstlast@gmail.com", ip="203.0.113.9", tax_id="")
    AccountSignal.objects.create(account_id=8, email_normalised="other@example.nl", ip=None, tax_id="NL004495445B01")
    me = subject(email="First.Last+2@gmail.com", tax_id="NL004495445B01")
    assert rules.linked_accounts(me, {}, ACTIVE) is None  # linked, but to accounts in good standing
    fired = rules.linked_accounts(me, {}, states({7: "blocked", 8: "blocked"}))
    assert fired is not None and fired["insists"] == "review"
    assert fired["linked_blocked_accounts"] == [
        {"account": ids.encode("acc", 7), "shared": ["email firstlast@gmail.com"]},
        {"account": ids.encode("acc", 8), "shared": ["tax id NL004495445B01"]},
    ]
    _cards("fp_visa", 9)
    fired = rules.linked_accounts(subject(card=CARD), {}, states({9: "blocked"}))
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
    assert rules.payment_trouble(subject(), params, ACTIVE) is None
    PaymentOutcome.objects.create(account_id=1000, kind="decline", reference="pay_3", created_at=NOW)
    fired = rules.payment_trouble(subject(), params, ACTIVE)
    assert fired is not None and (fired["declines"], fired["disputes"]) == (3, 0) and "insists" not in fired
    PaymentOutcome.objects.create(account_id=1000, kind="dispute", reference="dsp_1", created_at=NOW)
    fired = rules.payment_trouble(subject(), params, ACTIVE)
    assert fired is not None and fired["disputes"] == 1 and fired["insists"] == "review"
