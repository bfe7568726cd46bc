"""Login, invite links and logout, and the rater's pages: campaigns, the rate page, guidelines."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.data import as_messages
from palate.label.db import FLAGS, STRENGTHS, Campaign, Pair, User
from palate.label.deps import (
    DB,
    CurrentUser,
    Id,
    assignment_or_404,
    campaign_or_404,
    check_csrf,
    render,
    web_session,
)
from palate.label.security import LoginThrottle
from palate.label.store import (
    MAX_SECONDS,
    LabelIn,
    authenticate,
    end_session,
    invite_status,
    may_rate,
    next_assignment,
    progress,
    remaining_for,
    shown_responses,
    skip_assignment,
    start_session,
    submit_label,
)

ANSWER_TEXT = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}

router = APIRouter()


# ---------------------------------------------------------------------- sign in and out


def _sign_in(request: Request, db: Session, user: User) -> Response:
    """A new server-side session (any previous one of this browser ends) and a fresh CSRF
    token."""
    old = request.session.get("sid")
    if old:
        end_session(db, old)
    request.session.clear()
    request.session["sid"] = start_session(db, user)
    return RedirectResponse("/admin" if user.role == "admin" else "/", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html")


@router.post("/login")
def login(
    request: Request,
    name: Annotated[str, Form(max_length=200)],
    password: Annotated[str, Form(max_length=1000)],
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    throttle: LoginThrottle = request.app.state.throttle
    address = request.client.host if request.client else "?"
    wait = throttle.retry_after(name, address)
    if wait > 0:
        minutes = max(1, round(wait / 60))
        msg = f"Too many failed attempts. Try again in {minutes} minute{'s' * (minutes > 1)}."
        return render(request, "login.html", error=msg, status_code=429)
    user = authenticate(db, name, password)
    if user is None:
        throttle.failed(name, address)
        return render(request, "login.html", error="Wrong name or password.", status_code=401)
    throttle.succeeded(name)
    return _sign_in(request, db, user)


INVITE_PROBLEMS = {
    "unknown": (
        404,
        "This invite link is not valid: it was replaced by a newer one, or mistyped.",
    ),
    "expired": (403, "This invite link has expired: ask for a new one."),
    "revoked": (403, "This invite link has been revoked."),
    "inactive": (403, "This account has been deactivated."),
    "password": (403, "This account signs in with its password, not an invite link."),
}


@router.get("/invite/{token}", response_class=HTMLResponse)
def invite_page(request: Request, token: Annotated[str, Path(max_length=100)], db: DB) -> Response:
    """What the invite link opens: who it signs in as, and a button to do it. A GET never
    changes who is signed in (a link preview or an embedded image cannot switch sessions)."""
    user, why = invite_status(db, token)
    if user is None:
        status, message = INVITE_PROBLEMS[why]
        return render(request, "invite.html", problem=message, status_code=status)
    current = web_session(request, db)
    return render(
        request,
        "invite.html",
        invitee=user.name,
        token=token,
        current=current[1].name if current is not None else None,
    )


@router.post("/invite/{token}")
def invite(
    request: Request,
    token: Annotated[str, Path(max_length=100)],
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    user, why = invite_status(db, token)
    if user is None:
        status, message = INVITE_PROBLEMS[why]
        return render(request, "invite.html", problem=message, status_code=status)
    return _sign_in(request, db, user)


@router.post("/logout")
def logout(request: Request, db: DB, csrf: Annotated[str, Form()] = "") -> Response:
    """Ends the session in the database, so a copy of the cookie stops working too."""
    check_csrf(request, csrf)
    sid = request.session.get("sid")
    if sid:
        end_session(db, sid)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# ---------------------------------------------------------------------- rater pages


@router.get("/", response_class=HTMLResponse)
def home(request: Request, user: CurrentUser, db: DB) -> HTMLResponse:
    campaigns = [
        c
        for c in db.scalars(select(Campaign).order_by(Campaign.id))
        if c.status != "closed" and may_rate(db, c, user)
    ]
    rows = [
        (campaign, progress(db, campaign, user), progress(db, campaign)) for campaign in campaigns
    ]
    return render(request, "home.html", user, campaigns=rows)


@router.get("/campaigns/{cid}/rate", response_class=HTMLResponse)
def rate_page(request: Request, cid: Id, user: CurrentUser, db: DB) -> HTMLResponse:
    campaign = campaign_or_404(db, cid)
    assignment = next_assignment(db, campaign, user)
    mine = progress(db, campaign, user)
    if assignment is None:
        return render(request, "done.html", user, campaign=campaign, mine=mine)
    pair = db.get(Pair, assignment.pair_id)
    assert pair is not None
    try:
        messages = as_messages(pair.prompt)
    except (TypeError, ValueError, KeyError, AttributeError):  # stored before validation existed
        messages = [{"role": "user", "content": str(pair.prompt)}]
    left, right = shown_responses(pair, assignment)
    return render(
        request,
        "rate.html",
        user,
        campaign=campaign,
        assignment=assignment,
        messages=messages,
        left=str(left),
        right=str(right),
        mine=mine,
        remaining=remaining_for(db, campaign, user),
        answers=campaign.answers,
        answer_text=ANSWER_TEXT,
        strengths=STRENGTHS,
        flags=FLAGS,
        started=time.time(),
    )


@router.post("/campaigns/{cid}/rate")
def rate(
    request: Request,
    cid: Id,
    assignment_id: Annotated[int, Form()],
    answer: Annotated[str, Form(max_length=16)],
    flags: Annotated[list[str], Form(default_factory=list)],
    user: CurrentUser,
    db: DB,
    strength: Annotated[str, Form()] = "",
    comment: Annotated[str, Form(max_length=5000)] = "",
    started: Annotated[float, Form(allow_inf_nan=False)] = 0.0,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    assignment = assignment_or_404(db, assignment_id, cid)
    if assignment.rater_id == user.id and assignment.status != "open":
        return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)  # a double submit
    elapsed = time.time() - started if started else None
    seconds = elapsed if elapsed is not None and 0 <= elapsed <= MAX_SECONDS else None
    label = LabelIn(
        answer=answer,
        strength=strength or None,
        flags=flags,
        comment=comment,
        seconds=seconds,
    )
    submit_label(db, assignment, user, label)
    return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)


@router.post("/campaigns/{cid}/skip")
def skip(
    request: Request,
    cid: Id,
    assignment_id: Annotated[int, Form()],
    user: CurrentUser,
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    skip_assignment(db, assignment_or_404(db, assignment_id, cid), user)
    return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)


@router.get("/campaigns/{cid}/guidelines", response_class=HTMLResponse)
def guidelines(request: Request, cid: Id, user: CurrentUser, db: DB) -> HTMLResponse:
    return render(request, "guidelines.html", user, campaign=campaign_or_404(db, cid))
