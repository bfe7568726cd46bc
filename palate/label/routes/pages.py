"""Login, invite links and logout, and the rater's pages: campaigns, the rate page, guidelines."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from palate.data import as_messages
from palate.label.db import FLAGS, STRENGTHS, Campaign, Pair, User
from palate.label.deps import (
    DB,
    CurrentUser,
    assignment_or_404,
    campaign_or_404,
    check_csrf,
    render,
)
from palate.label.store import (
    LabelIn,
    check_password,
    next_assignment,
    progress,
    shown_responses,
    skip_assignment,
    submit_label,
)

ANSWER_TEXT = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}

router = APIRouter()


# ---------------------------------------------------------------------- sign in and out


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html")


@router.post("/login")
def login(
    request: Request,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    user = db.scalar(select(User).where(User.name == name))
    if user is None or not check_password(password, user.password_hash):
        return render(request, "login.html", error="Wrong name or password.")
    request.session.clear()
    request.session["uid"] = user.id
    return RedirectResponse("/", status_code=303)


@router.get("/invite/{token}")
def invite(request: Request, token: str, db: DB) -> Response:
    user = db.scalar(select(User).where(User.invite_token == token))
    if user is None:
        raise HTTPException(status_code=404, detail="unknown invite link")
    request.session.clear()
    request.session["uid"] = user.id
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# ---------------------------------------------------------------------- rater pages


@router.get("/", response_class=HTMLResponse)
def home(request: Request, user: CurrentUser, db: DB) -> HTMLResponse:
    campaigns = list(db.scalars(select(Campaign).order_by(Campaign.id)))
    rows = [
        (campaign, progress(db, campaign, user), progress(db, campaign)) for campaign in campaigns
    ]
    return render(request, "home.html", user, campaigns=rows)


@router.get("/campaigns/{cid}/rate", response_class=HTMLResponse)
def rate_page(request: Request, cid: int, user: CurrentUser, db: DB) -> HTMLResponse:
    campaign = campaign_or_404(db, cid)
    assignment = next_assignment(db, campaign, user)
    mine = progress(db, campaign, user)
    if assignment is None:
        return render(request, "done.html", user, campaign=campaign, mine=mine)
    pair = db.get(Pair, assignment.pair_id)
    assert pair is not None
    left, right = shown_responses(pair, assignment)
    return render(
        request,
        "rate.html",
        user,
        campaign=campaign,
        assignment=assignment,
        messages=as_messages(pair.prompt),
        left=left,
        right=right,
        mine=mine,
        answers=campaign.answers,
        answer_text=ANSWER_TEXT,
        strengths=STRENGTHS,
        flags=FLAGS,
        started=time.time(),
    )


@router.post("/campaigns/{cid}/rate")
def rate(
    request: Request,
    cid: int,
    assignment_id: Annotated[int, Form()],
    answer: Annotated[str, Form()],
    flags: Annotated[list[str], Form(default_factory=list)],
    user: CurrentUser,
    db: DB,
    strength: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "",
    started: Annotated[float, Form()] = 0.0,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    assignment = assignment_or_404(db, assignment_id, cid)
    if assignment.rater_id == user.id and assignment.status != "open":
        return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)  # a double submit
    seconds = time.time() - started if started else None
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
    cid: int,
    assignment_id: Annotated[int, Form()],
    user: CurrentUser,
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    skip_assignment(db, assignment_or_404(db, assignment_id, cid), user)
    return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)


@router.get("/campaigns/{cid}/guidelines", response_class=HTMLResponse)
def guidelines(request: Request, cid: int, user: CurrentUser, db: DB) -> HTMLResponse:
    return render(request, "guidelines.html", user, campaign=campaign_or_404(db, cid))
