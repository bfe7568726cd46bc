"""Password and token hashes (palate/label/hashing.py) keep the format existing databases hold:
a hash made before the store was split (fixed salt) still checks."""

from __future__ import annotations

from palate.label.hashing import DUMMY_HASH, check_password, hash_password, hash_token
from tests.label.helpers import OLD_PASSWORD_HASH, OLD_TOKEN_HASH


def test_hashes_keep_their_format() -> None:
    assert hash_password("correct horse", bytes(range(16))) == OLD_PASSWORD_HASH
    assert hash_token("tok") == OLD_TOKEN_HASH


def test_check_password() -> None:
    assert check_password("correct horse", OLD_PASSWORD_HASH)
    assert not check_password("correct horsE", OLD_PASSWORD_HASH)
    for stored in (None, "", "correct horse", "sha256$x$y"):
        assert not check_password("correct horse", stored)
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second  # a fresh salt each time
    assert check_password("pw", first) and check_password("pw", second)


def test_the_dummy_hash_costs_a_real_check() -> None:
    """Unknown user names are checked against it (same scrypt work as a known name)."""
    assert DUMMY_HASH.startswith("scrypt$") and len(DUMMY_HASH.split("$")) == 3
    assert check_password("palate: no such user", DUMMY_HASH)
