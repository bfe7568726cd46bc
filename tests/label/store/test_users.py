"""Users and their access (palate/label/store/users.py) on a fresh database per test."""

from __future__ import annotations

import datetime as dt

import pytest

from palate.errors import ConfigError
from palate.label.store import (
    authenticate,
    change_access,
    create_user,
    invite_status,
    set_active,
    user_by_token,
)
from tests.label.helpers import OLD_PASSWORD_HASH


def test_a_password_hashed_before_the_split_still_signs_in(db) -> None:
    user = create_user(db, "old", role="admin", password="new")[0]
    user.password_hash = OLD_PASSWORD_HASH
    db.commit()
    signed_in = authenticate(db, "old", "correct horse")
    assert signed_in is not None and signed_in.id == user.id
    assert authenticate(db, "old", "new") is None
    assert authenticate(db, "nobody", "correct horse") is None
    set_active(db, user, False)
    assert authenticate(db, "old", "correct horse") is None


def test_invites_tokens_and_access_changes(db) -> None:
    user, invite, api = create_user(db, "rita", attributes={"region": "EU"})
    assert user.attributes == {"region": "EU"} and user.kind == "human"
    assert invite_status(db, invite) == (user, "ok")
    assert user_by_token(db, api) is user
    new_api = change_access(db, user, "api-token")["api_token"]
    assert user_by_token(db, api) is None and user_by_token(db, new_api) is user
    new_invite = change_access(db, user, "invite")["invite"]
    assert invite_status(db, invite) == (None, "unknown")  # the old link stops working
    assert change_access(db, user, "revoke-invite") == {}
    assert invite_status(db, new_invite) == (None, "revoked")
    change_access(db, user, "deactivate")
    assert user_by_token(db, new_api) is None
    change_access(db, user, "activate")
    assert user_by_token(db, new_api) is user
    with pytest.raises(ConfigError, match="action"):
        change_access(db, user, "explode")
    _, late_invite, _ = create_user(db, "late", invite_ttl=dt.timedelta(seconds=-1))
    assert invite_status(db, late_invite) == (None, "expired")


def test_user_names_and_roles_are_checked(db) -> None:
    create_user(db, "rita")
    with pytest.raises(ConfigError, match="already exists"):
        create_user(db, " rita ")  # stripped first
    with pytest.raises(ConfigError, match="control characters"):
        create_user(db, "a\nb")
    with pytest.raises(ConfigError, match="role"):
        create_user(db, "x", role="owner")
    with pytest.raises(ConfigError, match="attribute"):
        create_user(db, "y", attributes={"1bad": "x"})
