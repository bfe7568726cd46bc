"""Browser sessions (palate/label/store/sessions.py) on a fresh database per test."""

from __future__ import annotations

import datetime as dt

from palate.label.store import (
    create_user,
    end_session,
    end_sessions,
    session_of,
    set_active,
    start_session,
)


def test_sessions_end_on_logout_sign_out_deactivation_and_expiry(db) -> None:
    user = create_user(db, "rita")[0]
    first, second = start_session(db, user), start_session(db, user)
    live = session_of(db, first)
    assert live is not None and live[1].id == user.id
    end_session(db, first)  # logout: only this session
    assert session_of(db, first) is None and session_of(db, second) is not None
    assert end_sessions(db, user) == 1  # everywhere
    assert session_of(db, second) is None
    third = start_session(db, user)
    set_active(db, user, False)  # deactivating ends every session
    assert session_of(db, third) is None
    set_active(db, user, True)
    assert session_of(db, start_session(db, user, ttl=dt.timedelta(seconds=-1))) is None
    assert session_of(db, "no-such-token") is None
