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


# lookup3's mix(a, b, c): six steps ``x -= z; x ^= rot(z, k); z += y`` for (x, y, z) = (a, b, c),
# (b, c, a), (c, a, b), (a, b, c) …, with these k.
_MIX_ROTATIONS = (4, 6, 8, 16, 19, 4)
# lookup3's final(a, b, c): seven steps ``x ^= y; x -= rot(y, k)`` for (x, y) = (c, b), (a, c),
# (b, a), (c, b) …, with these k.
_FINAL_ROTATIONS = (14, 11, 25, 16, 4, 14, 24)


def _hash_uint32_extended(k: int, seed: int) -> int:
    abc = [(0x9E3779B9 + 4 + 3923095) & _M32] * 3
    if seed:
        abc[0] = (abc[0] + (seed >> 32)) & _M32
        abc[1] = (abc[1] + seed) & _M32
        for step, rotation in enumerate(_MIX_ROTATIONS):
            x, y, z = step % 3, (step + 1) % 3, (step + 2) % 3
            abc[x] = (abc[x] - abc[z]) & _M32
            abc[x] ^= _rot(abc[z], rotation)
            abc[z] = (abc[z] + abc[y]) & _M32
    abc[0] = (abc[0] + k) & _M32
    for step, rotation in enumerate(_FINAL_ROTATIONS):
        x, y = (step + 2) % 3, (step + 1) % 3
        abc[x] ^= abc[y]
        abc[x] = (abc[x] - _rot(abc[y], rotation)) & _M32
    return (abc[1] << 32) | abc[2]


def _hashint8extended(value: int, seed: int) -> int:
    unsigned = value & _M64
    lohalf, hihalf = unsigned & _M32, unsigned >> 32
    lohalf ^= hihalf if value >= 0 else (~hihalf & _M32)
    return _hash_uint32_extended(lohalf, seed)


def shard_of(account_id: int, shards: int = SHARDS) -> int:
    """The hash partition remainder PostgreSQL puts ``account_id`` in."""
    return ((_hashint8extended(account_id, _PARTITION_SEED) + _COMBINE) & _M64) % shards
