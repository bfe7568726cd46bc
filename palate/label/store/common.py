"""What the store's modules share: the row count of a conditional UPDATE/DELETE, an UPDATE that
syncs only the rows it matched, and the check on user-given names."""

from __future__ import annotations

import unicodedata
from typing import Any, cast

from sqlalchemy import CursorResult, update

from palate.errors import ConfigError


def rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE changed (Session.execute is typed as the base Result)."""
    return cast("CursorResult[Any]", result).rowcount


def synced_update(model: Any) -> Any:
    """An ORM UPDATE that syncs only the rows it matched into the session ("fetch", via
    RETURNING). The default ("evaluate") tests every object of the model the session holds,
    which made a long-lived session (a simulated panel labelling thousands of pairs in one)
    quadratic: 85 s for the quickstart's 5,376 labels."""
    return update(model).execution_options(synchronize_session="fetch")


def clean_name(name: str, what: str, max_len: int) -> str:
    """A user or campaign name: stripped, non-empty, at most ``max_len`` characters, no
    control characters (line breaks included)."""
    name = (name or "").strip()
    if not name:
        raise ConfigError(f"{what}: must not be empty")
    if len(name) > max_len:
        raise ConfigError(f"{what}: at most {max_len} characters (got {len(name)})")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ConfigError(f"{what}: no control characters or line breaks")
    return name
