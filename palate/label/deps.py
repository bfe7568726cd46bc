"""Dependencies and small helpers shared by the labeling app's routers.

The app (``palate.label.app.create_app``) puts the session factory and the templates on
``app.state``; everything here reads them from the request, so the routers hold no state.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from palate.errors import ConfigError
from palate.label.db import Assignment, Campaign, User, WebSession
from palate.label.quality import flagged_raters
from palate.label.store import export_rows, session_of, user_by_token


def get_db(request: Request) -> Iterator[Session]:
    """One database session per request, from the app's session factory."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as db:
        yield db


DB = Annotated[Session, Depends(get_db)]


def web_session(request: Request, db: Session) -> tuple[WebSession, User] | None:
    """The request's live server-side session and its user (the signed cookie carries only a
    random session token and the CSRF token)."""
    token = request.session.get("sid")
    return session_of(db, token) if token else None


def current_user(request: Request, db: DB) -> User:
    """The logged-in user of a page; without a live session, a redirect to the login page."""
    found = web_session(request, db)
    if found is None:
        request.session.pop("sid", None)
        raise HTTPException(status_code=303, headers={"Location": "/login"})
    return found[1]


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    """The logged-in user of a page, who must be an admin (403 otherwise)."""
    if user.role != "admin":
        raise HTTPException(status_code=403, detail="admins only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


def api_user(request: Request, db: DB) -> User:
    """The caller of the JSON API, from its ``Authorization: Bearer`` token (401 otherwise)."""
    authorization = request.headers.get("authorization", "")
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    user = user_by_token(db, token) if token else None
    if user is None:
        raise HTTPException(status_code=401, detail="missing or bad API token")
    return user


ApiUser = Annotated[User, Depends(api_user)]


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use; every form carries it back."""
    token: str | None = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, token: str) -> None:
    """Refuse (403) a form whose CSRF token is not the session's."""
    expected: str = request.session.get("csrf", "")
    if not expected or not hmac.compare_digest(expected, token or ""):
        raise HTTPException(status_code=403, detail="CSRF token missing or wrong")


def render(
    request: Request,
    name: str,
    user: User | None = None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """The template ``name`` with the user and the CSRF token in its context."""
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": csrf_token(request), **context},
        status_code=status_code,
    )


# Database ids are signed 64-bit: anything outside is a 404 before it reaches the database.
MAX_ID = 2**63 - 1
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


def campaign_or_404(db: Session, campaign_id: int) -> Campaign:
    campaign = db.get(Campaign, campaign_id) if 1 <= campaign_id <= MAX_ID else None
    if campaign is None:
        raise HTTPException(status_code=404, detail="no such campaign")
    return campaign


def assignment_or_404(
    db: Session, assignment_id: int, campaign_id: int | None = None
) -> Assignment:
    """The assignment, which must belong to ``campaign_id`` when that is given (404 otherwise)."""
    assignment = db.get(Assignment, assignment_id) if 1 <= assignment_id <= MAX_ID else None
    if assignment is None or (campaign_id is not None and assignment.campaign_id != campaign_id):
        raise HTTPException(status_code=404, detail="no such assignment")
    return assignment


def attachment(filename: str) -> str:
    """A Content-Disposition header for any file name: an ASCII fallback (quotes, controls and
    non-ASCII replaced) plus the exact UTF-8 name (RFC 6266 / RFC 5987)."""
    from urllib.parse import quote

    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def export_body(
    db: Session, campaign: Campaign, aggregate: str = "majority", drop_flagged: bool = False
) -> str:
    """The campaign's comparisons as JSONL: votes by majority, or weighted by each rater's
    estimated reliability (``aggregate="reliability"``); ``drop_flagged`` leaves out the
    raters the quality checks flag (:mod:`palate.label.quality`)."""

    drop: list[str] = []
    if drop_flagged:
        drop = flagged_raters(db, [campaign.id])
    try:
        rows = export_rows(db, campaign, aggregate=aggregate, drop_raters=drop)
    except ConfigError as err:
        raise HTTPException(status_code=400, detail=str(err)) from err
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
