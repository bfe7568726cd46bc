"""Secrets at rest are hashes: passwords (scrypt), API tokens, invite tokens and browser sessions
(sha256 of 192-256 random bits, so a fast hash is enough).

The formats are what databases already hold: ``scrypt$<salt hex>$<digest hex>`` (n=2**14, r=8,
p=1, 16-byte salt) and a sha256 hex digest. Changing either locks out every existing user.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str | None) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        return False
    _, salt, digest = stored.split("$")
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Checked against when a login names no such user, so an unknown name costs the same scrypt work
# as a known one (the response time does not reveal which names exist).
DUMMY_HASH = hash_password("palate: no such user")
