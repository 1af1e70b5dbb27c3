"""Opaque public ids: ``acc_0k3x9m2q7t1vb``.

Rows keyed by public ids use a random positive 63-bit integer primary key (``new_id``), so
foreign keys and the shard key ``account_id`` stay 8-byte integers on the hot tables, while
the outside world sees ``<prefix>_<13 base32 chars>``: not sequential, not guessable, and
decodable without a lookup. Crockford's base32 alphabet (lowercase, no i, l, o, u).
"""

from __future__ import annotations

import secrets

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}
WIDTH = 13  # 13 * 5 = 65 bits >= 63
MAX_ID = 2**63 - 1


def new_id() -> int:
    """A random id in [1, 2**63 - 1]; collisions are caught by the primary key."""
    return secrets.randbelow(MAX_ID) + 1


def encode(prefix: str, value: int) -> str:
    chars = []
    for _ in range(WIDTH):
        value, rem = divmod(value, 32)
        chars.append(ALPHABET[rem])
    return f"{prefix}_{''.join(reversed(chars))}"


def decode(prefix: str, public_id: str) -> int | None:
    """The integer behind ``public_id``, or None if it is not a well-formed id of ``prefix``."""
    head = f"{prefix}_"
    if not isinstance(public_id, str) or not public_id.startswith(head):
        return None
    body = public_id[len(head) :]
    if len(body) != WIDTH:
        return None
    value = 0
    for ch in body:
        digit = _INDEX.get(ch)
        if digit is None:
            return None
        value = value * 32 + digit
    if not 1 <= value <= MAX_ID:
        return None
    return value


class PublicIdConverter:
    """URL converter: ``<acc:account_id>`` matches ``acc_…`` and hands the view the integer."""

    prefix = ""
    regex = ""

    def to_python(self, value: str) -> int:
        decoded = decode(self.prefix, value)
        if decoded is None:
            raise ValueError(value)
        return decoded

    def to_url(self, value: int) -> str:
        return encode(self.prefix, value)


def converter(prefix: str) -> type[PublicIdConverter]:
    regex = f"{prefix}_[{ALPHABET}]{{{WIDTH}}}"
    return type(f"{prefix.title()}IdConverter", (PublicIdConverter,), {"prefix": prefix, "regex": regex})
