"""API key material: ``bku_<12-char prefix><43-char secret>`` (user keys) or ``bks_…``
(service keys). Only the prefix and the SHA-256 of the whole key are stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from billing_site.common.ids import ALPHABET

PREFIX_LENGTH = 12
USER_KEY_HEAD = "bku"
SERVICE_KEY_HEAD = "bks"


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    raw: str  # shown once, never stored
    prefix: str
    secret_hash: str


def generate(*, service: bool) -> KeyMaterial:
    prefix = "".join(secrets.choice(ALPHABET) for _ in range(PREFIX_LENGTH))
    raw = f"{SERVICE_KEY_HEAD if service else USER_KEY_HEAD}_{prefix}{secrets.token_urlsafe(32)}"
    return KeyMaterial(raw=raw, prefix=prefix, secret_hash=hash_key(raw))


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


_KEY_SHAPE = re.compile(
    rf"(?:{USER_KEY_HEAD}|{SERVICE_KEY_HEAD})_[{ALPHABET}]{{{PREFIX_LENGTH}}}[A-Za-z0-9_\-]{{20,100}}"
)


def parse_prefix(raw: str) -> str | None:
    """The lookup prefix of a well-formed key, else None (nothing odd reaches the database)."""
    if not _KEY_SHAPE.fullmatch(raw):
        return None
    return raw.partition("_")[2][:PREFIX_LENGTH]


def matches(raw: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_key(raw), secret_hash)
