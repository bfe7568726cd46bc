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

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from palate.label.db import Assignment, Campaign, User
from palate.label.store import export_rows, user_by_token


def get_db(request: Request) -> Iterator[Session]:
    """One database session per request, from the app's session factory."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as db:
        yield db


DB = Annotated[Session, Depends(get_db)]


def current_user(request: Request, db: DB) -> User:
    """The logged-in user of a page; without a session, a redirect to the login page."""
    user_id = request.session.get("uid")
    user = db.get(User, user_id) if user_id is not None else None
    if user is None:
        raise HTTPException(status_code=303, headers={"Location": "/login"})
    return user


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


def render(request: Request, name: str, user: User | None = None, **context: Any) -> HTMLResponse:
    """The template ``name`` with the user and the CSRF token in its context."""
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(
        request, name, {"user": user, "csrf": csrf_token(request), **context}
    )


def campaign_or_404(db: Session, campaign_id: int) -> Campaign:
    campaign = db.get(Campaign, campaign_id)
    if campaign is None:
        raise HTTPException(status_code=404, detail="no such campaign")
    return campaign


def assignment_or_404(
    db: Session, assignment_id: int, campaign_id: int | None = None
) -> Assignment:
    """The assignment, which must belong to ``campaign_id`` when that is given (404 otherwise)."""
    assignment = db.get(Assignment, assignment_id)
    if assignment is None or (campaign_id is not None and assignment.campaign_id != campaign_id):
        raise HTTPException(status_code=404, detail="no such assignment")
    return assignment


def export_body(db: Session, campaign: Campaign) -> str:
    """The campaign's comparisons as JSONL."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in export_rows(db, campaign))
