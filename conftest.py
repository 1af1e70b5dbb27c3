"""Fixtures shared by every app's tests: API clients with real keys, accounts with owners."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from accounts import services
from accounts.models import BillingAccount, Membership, User
from accounts.tests.factories import BillingAccountFactory

_emails = itertools.count()


@dataclass
class Customer:
    user: User
    key: str
    client: APIClient


def client_with_key(key: str | None) -> APIClient:
    client = APIClient()
    if key:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def make_customer(db: None) -> Callable[..., Customer]:
    def make(email: str | None = None) -> Customer:
        email = email or f"customer{next(_emails)}@example.test"
        user, issued = services.user_signup(email=email, password="correct-horse-battery-staple")
        return Customer(user=user, key=issued.raw, client=client_with_key(issued.raw))

    return make


@pytest.fixture
def customer(make_customer: Callable[..., Customer]) -> Customer:
    return make_customer()


@pytest.fixture
def make_account(db: None) -> Callable[..., BillingAccount]:
    def make(owner: User, **fields: object) -> BillingAccount:
        account: BillingAccount = BillingAccountFactory(**fields)  # type: ignore[assignment]
        Membership.objects.create(account=account, user=owner, role="owner")
        return account

    return make


@pytest.fixture
def account(customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user)
