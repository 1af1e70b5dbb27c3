"""``money.allocate``: the parts of a split always make the whole, each part is its exact
share give or take one minor unit, the same split every time, and the units left after
flooring go to the largest remainders, ties to the earlier part."""

from __future__ import annotations

import os
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_site.common.money import allocate

# Weights as the rated amounts they are in practice: any sign, 12 places, up to 10^12.
weights = st.decimals(min_value=Decimal(-(10**12)), max_value=Decimal(10**12), places=12, allow_nan=False)
totals = st.integers(min_value=-(10**15), max_value=10**15)
PROPERTIES = settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")))


def exact_shares(total: int, parts: list[Decimal]) -> list[Fraction]:
    magnitudes = [abs(Fraction(w)) for w in parts]
    whole = sum(magnitudes)
    return [total * m / whole for m in magnitudes]


@PROPERTIES
@given(totals, st.lists(weights, min_size=1, max_size=30))
def test_the_parts_sum_to_the_whole_each_within_one_unit_of_its_exact_share(total: int, parts: list[Decimal]) -> None:
    split = allocate(total, parts)
    assert len(split) == len(parts) and all(isinstance(p, int) for p in split)
    assert sum(split) == total
    if any(parts):
        for part, share in zip(split, exact_shares(total, parts), strict=True):
            assert abs(part - share) < 1
            assert part == 0 or (part > 0) == (total > 0)  # never a part of the other sign
    else:
        assert split == [total] + [0] * (len(parts) - 1)  # all weights zero: the first part takes it


@PROPERTIES
@given(totals, st.lists(weights, min_size=1, max_size=30))
def test_the_same_split_every_time_and_larger_weights_never_get_less(total: int, parts: list[Decimal]) -> None:
    split = allocate(total, parts)
    assert allocate(total, list(parts)) == split
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            a, b = abs(parts[i]), abs(parts[j])
            if a > b:
                assert abs(split[i]) >= abs(split[j])
            elif a < b:
                assert abs(split[i]) <= abs(split[j])
            elif a == b and any(parts):
                assert abs(split[i]) - abs(split[j]) in (0, 1)  # a tie: the earlier part gets the unit


@PROPERTIES
@given(totals, st.lists(weights, min_size=1, max_size=30).filter(any))
def test_the_units_left_after_flooring_go_to_the_largest_remainders_ties_to_the_earlier(
    total: int, parts: list[Decimal]
) -> None:
    split = allocate(total, parts)
    shares = [abs(share) for share in exact_shares(total, parts)]
    rounded_up = [i for i, (part, share) in enumerate(zip(split, shares, strict=True)) if abs(part) > share // 1]
    floored = [i for i in range(len(parts)) if i not in rounded_up]
    for i in rounded_up:
        for j in floored:
            rest_i, rest_j = shares[i] % 1, shares[j] % 1
            assert rest_i > rest_j or (rest_i == rest_j and i < j)


def test_examples() -> None:
    assert allocate(100, [Decimal(1)] * 3) == [34, 33, 33]
    assert allocate(-100, [Decimal(1)] * 3) == [-34, -33, -33]
    assert allocate(1013, [Decimal("6.0625"), Decimal("4.0625")]) == [607, 406]
    assert allocate(10, [Decimal(-3), Decimal(1)]) == [8, 2]  # weights count by magnitude
    assert allocate(7, [Decimal(0), Decimal(0)]) == [7, 0]
    assert allocate(5, []) == []
