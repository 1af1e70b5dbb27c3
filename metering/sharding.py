"""Which shard holds an account, computed in Python exactly as PostgreSQL routes a row.

A shard is one hash partition (remainder modulo ``SHARDS``) of every metering table. The event
store (``metering.eventstore``) keeps each event's shard in a column, so that an hour of one
shard is one contiguous range of its sorting key and the rollup of that shard reads only it;
the sink cannot ask PostgreSQL for every event, so the routing is reproduced here: PostgreSQL's
``hashint8extended`` (Bob Jenkins' lookup3 ``hash_bytes_uint32_extended`` over the folded
64-bit value) with the partitioning seed, combined as ``hash_combine64(0, h)``, modulo the
number of partitions (``src/backend/partitioning/partbounds.c``). ``test_sharding.py`` checks
it against ``satisfies_hash_partition`` on the real table for many ids.
"""

from __future__ import annotations

SHARDS = 16  # the hash partitions of migrations 0002/0004

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_PARTITION_SEED = 0x7A5B22367996DCFD  # HASH_PARTITION_SEED
_COMBINE = 0x49A0F4DD15E5A8E3  # hash_combine64's constant


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _hash_uint32_extended(k: int, seed: int) -> int:
    a = b = c = (0x9E3779B9 + 4 + 3923095) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + seed) & _M32
        # mix(a, b, c)
        a = (a - c) & _M32
        a ^= _rot(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rot(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 4)
        b = (b + a) & _M32
    a = (a + k) & _M32
    # final(a, b, c)
    c ^= b
    c = (c - _rot(b, 14)) & _M32
    a ^= c
    a = (a - _rot(c, 11)) & _M32
    b ^= a
    b = (b - _rot(a, 25)) & _M32
    c ^= b
    c = (c - _rot(b, 16)) & _M32
    a ^= c
    a = (a - _rot(c, 4)) & _M32
    b ^= a
    b = (b - _rot(a, 14)) & _M32
    c ^= b
    c = (c - _rot(b, 24)) & _M32
    return (b << 32) | c


def _hashint8extended(value: int, seed: int) -> int:
    unsigned = value & _M64
    lohalf, hihalf = unsigned & _M32, unsigned >> 32
    lohalf ^= hihalf if value >= 0 else (~hihalf & _M32)
    return _hash_uint32_extended(lohalf, seed)


def shard_of(account_id: int, shards: int = SHARDS) -> int:
    """The hash partition remainder PostgreSQL puts ``account_id`` in."""
    return ((_hashint8extended(account_id, _PARTITION_SEED) + _COMBINE) & _M64) % shards
