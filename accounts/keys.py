"""API key material: ``bku_<12-char prefix><43-char secret>`` (user keys) or ``bks_…``
(service keys). Only the prefix and the SHA-256 of the whole key are stored."""

from __future__ import annotations

import hashlib
import hmac
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


def parse_prefix(raw: str) -> str | None:
    head, sep, rest = raw.partition("_")
    if not sep or head not in (USER_KEY_HEAD, SERVICE_KEY_HEAD) or len(rest) <= PREFIX_LENGTH:
        return None
    return rest[:PREFIX_LENGTH]


def matches(raw: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_key(raw), secret_hash)
