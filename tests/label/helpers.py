"""Helpers shared by the labeling tests."""

from __future__ import annotations

from palate.label.store import PairIn

# hash_password("correct horse", bytes(range(16))) and hash_token("tok") as the single-file
# palate/label/store.py made them (commit ad2b0b7)
OLD_PASSWORD_HASH = (
    "scrypt$000102030405060708090a0b0c0d0e0f$25b376840366f4d3b0e21e414476676e3cd0e89af443035"
    "6a234ce0b65a021b56233e7b0b24f07bc9340195f19c90a1da7562514ed0762a6dae3c27ff5b07d62"
)
OLD_TOKEN_HASH = "1a7674eb4ee78df7e1ac439a93c3fa8e3c945784d4dec9fd8e3011738b2f1d62"


def pairs(n: int) -> list[PairIn]:
    """``n`` pairs whose response_a (``good i``) is the better one."""
    return [
        PairIn(prompt=f"question {i}", response_a=f"good {i}", response_b=f"bad {i}")
        for i in range(n)
    ]
