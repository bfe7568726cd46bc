"""What the web pages, the JSON API and the programmatic raters (AI judges, the simulated panel)
all call, by concern:

* :mod:`~palate.label.store.users` — accounts, attributes, invites, API tokens, passwords;
* :mod:`~palate.label.store.sessions` — browser sessions;
* :mod:`~palate.label.store.campaigns` — campaigns, their status, guidelines and raters;
* :mod:`~palate.label.store.assignment` — handing out pairs, labels, skips, progress (and why no
  interleaving of requests can double-count);
* :mod:`~palate.label.store.export` — votes aggregated into comparison rows.

Each name below is re-exported here, so callers write ``from palate.label.store import
next_assignment``. Secrets at rest are hashes (:mod:`palate.label.hashing`).
"""

from __future__ import annotations

from palate.label.store.assignment import (
    MAX_SECONDS,
    LabelIn,
    check_label,
    flip,
    next_assignment,
    progress,
    release_assignments,
    remaining_for,
    shown_responses,
    skip_assignment,
    submit_label,
)
from palate.label.store.campaigns import (
    CAMPAIGN_STATUSES,
    MAX_OVERLAP,
    PairIn,
    campaign_raters,
    create_campaign,
    delete_campaign,
    may_rate,
    set_guidelines,
    set_raters,
    set_status,
)
from palate.label.store.common import clean_name
from palate.label.store.export import AGGREGATES, aggregate, export_rows
from palate.label.store.sessions import (
    SESSION_TTL,
    end_session,
    end_sessions,
    session_of,
    start_session,
)
from palate.label.store.users import (
    ACCESS_ACTIONS,
    ATTRIBUTE_KEY,
    INVITE_TTL,
    MAX_ATTRIBUTES,
    authenticate,
    change_access,
    clean_attributes,
    create_user,
    invite_status,
    issue_invite,
    parse_attributes,
    revoke_invite,
    rotate_api_token,
    set_active,
    set_attributes,
    user_by_name,
    user_by_token,
)

__all__ = [
    # users
    "ACCESS_ACTIONS",
    "ATTRIBUTE_KEY",
    "INVITE_TTL",
    "MAX_ATTRIBUTES",
    "authenticate",
    "change_access",
    "clean_attributes",
    "clean_name",
    "create_user",
    "invite_status",
    "issue_invite",
    "parse_attributes",
    "revoke_invite",
    "rotate_api_token",
    "set_active",
    "set_attributes",
    "user_by_name",
    "user_by_token",
    # sessions
    "SESSION_TTL",
    "end_session",
    "end_sessions",
    "session_of",
    "start_session",
    # campaigns
    "CAMPAIGN_STATUSES",
    "MAX_OVERLAP",
    "PairIn",
    "campaign_raters",
    "create_campaign",
    "delete_campaign",
    "may_rate",
    "set_guidelines",
    "set_raters",
    "set_status",
    # assignment
    "MAX_SECONDS",
    "LabelIn",
    "check_label",
    "flip",
    "next_assignment",
    "progress",
    "release_assignments",
    "remaining_for",
    "shown_responses",
    "skip_assignment",
    "submit_label",
    # export
    "AGGREGATES",
    "aggregate",
    "export_rows",
]
