"""The Python routing of accounts to shards is PostgreSQL's own, on the real table."""

from __future__ import annotations

import random

import pytest
from django.db import connection

from metering.sharding import SHARDS, shard_of

pytestmark = pytest.mark.django_db


def test_every_account_id_goes_to_the_shard_postgresql_puts_it_in() -> None:
    rng = random.Random(20)
    ids = [rng.randint(-(2**63), 2**63 - 1) for _ in range(500)] + list(range(-20, 300)) + [2**63 - 1, -(2**63)]
    with connection.cursor() as cur:
        cur.execute(
            "SELECT a, r FROM unnest(%s::bigint[]) AS a CROSS JOIN generate_series(0, %s - 1) AS r "
            "WHERE satisfies_hash_partition('metering_usageevent'::regclass, %s, r, a)",
            [ids, SHARDS, SHARDS],
        )
        routed = dict(cur.fetchall())
    assert routed == {account: shard_of(account) for account in ids}
