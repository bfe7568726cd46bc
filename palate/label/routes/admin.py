"""The admin's pages: the dashboard, users (invite links, API tokens, deactivation), campaigns
(create, pause/close, guidelines, raters, stale slots, delete, export).

A form that fails (a bad upload, a duplicate name) re-renders the dashboard with the error next
to the form that caused it, status 400; nothing is half-written (each change is one
transaction). Secrets shown once (a new invite link or API token) travel to the next page in the
server-side session, never in the cookie.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.errors import PalateError
from palate.label.campaign import parse_pairs
from palate.label.db import Assignment, Campaign, Label, Pair, User, utcnow
from palate.label.deps import (
    DB,
    AdminUser,
    Id,
    attachment,
    campaign_or_404,
    check_csrf,
    export_body,
    render,
    web_session,
)
from palate.label.stats import campaign_stats
from palate.label.store import (
    campaign_raters,
    change_access,
    create_campaign,
    create_user,
    delete_campaign,
    parse_attributes,
    release_assignments,
    set_attributes,
    set_guidelines,
    set_raters,
    set_status,
)

router = APIRouter()


def dashboard_page(
    request: Request, user: User, db: Session, *, error: tuple[str, str] | None = None
) -> HTMLResponse:
    """The dashboard; ``error`` = (which form, message) is shown beside that form (400)."""
    campaigns = list(db.scalars(select(Campaign).order_by(Campaign.id)))
    stats = [(c, campaign_stats(db, c), campaign_raters(db, c)) for c in campaigns]
    users = list(db.scalars(select(User).order_by(User.id)))
    found = web_session(request, db)
    created = None
    if found is not None and found[0].flash:  # shown once
        created, found[0].flash = found[0].flash, None
        db.commit()
    return render(
        request,
        "admin.html",
        user,
        stats=stats,
        users=users,
        created=created,
        error=error,
        now=utcnow(),
        status_code=400 if error else 200,
    )


def _form(
    request: Request, user: User, db: Session, form: str, csrf: str, change: Callable[[], None]
) -> Response:
    """Run one admin change; on bad input, the dashboard with the error beside ``form``."""
    check_csrf(request, csrf)
    try:
        change()
    except PalateError as err:
        db.rollback()
        return dashboard_page(request, user, db, error=(form, str(err)))
    return RedirectResponse("/admin", status_code=303)


def _campaign_form(
    request: Request,
    cid: int,
    user: User,
    db: Session,
    csrf: str,
    change: Callable[[Campaign], None],
) -> Response:
    """One change to campaign ``cid`` (404 if there is none), errors beside its section."""
    campaign = campaign_or_404(db, cid)
    return _form(request, user, db, f"campaign-{cid}", csrf, lambda: change(campaign))


def _flash(request: Request, db: Session, data: dict[str, str]) -> None:
    """One-time data for the next dashboard view, kept in the server-side session."""
    found = web_session(request, db)
    if found is not None:
        found[0].flash = data
        db.commit()


def _user_or_error(db: Session, uid: int) -> User:
    target = db.get(User, uid)
    if target is None:
        raise PalateError(f"no user with id {uid}")
    return target


@router.get("/admin", response_class=HTMLResponse)
def dashboard(request: Request, user: AdminUser, db: DB) -> HTMLResponse:
    return dashboard_page(request, user, db)


# ---------------------------------------------------------------------- users


@router.post("/admin/raters")
def add_rater(
    request: Request,
    user: AdminUser,
    db: DB,
    name: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "rater",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    def change() -> None:
        new_user, invite_token, api_token = create_user(db, name, role, password or None)
        _flash(
            request,
            db,
            {
                "name": new_user.name,
                "invite": f"{str(request.base_url).rstrip('/')}/invite/{invite_token}",
                "api_token": api_token,
            },
        )

    return _form(request, user, db, "add-rater", csrf, change)


@router.post("/admin/users/{uid}/attributes")
def user_attributes(
    request: Request,
    uid: Id,
    user: AdminUser,
    db: DB,
    attributes: Annotated[str, Form(max_length=4000)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Set a user's attributes from ``name=value, name=value`` (empty: none)."""
    return _form(
        request,
        user,
        db,
        f"user-{uid}",
        csrf,
        lambda: set_attributes(db, _user_or_error(db, uid), parse_attributes(attributes)),
    )


@router.post("/admin/users/{uid}/{action}")
def user_action(
    request: Request,
    uid: Id,
    action: str,
    user: AdminUser,
    db: DB,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """invite (re-issue the link), revoke-invite, api-token (rotate), deactivate, activate,
    sign-out (end every session)."""

    def change() -> None:
        target = _user_or_error(db, uid)
        if action == "deactivate" and target.id == user.id:
            raise PalateError("you cannot deactivate yourself")
        made = change_access(db, target, action)
        base = str(request.base_url).rstrip("/")
        if "invite" in made:
            _flash(request, db, {"name": target.name, "invite": f"{base}/invite/{made['invite']}"})
        elif "api_token" in made:
            _flash(request, db, {"name": target.name, "api_token": made["api_token"]})

    return _form(request, user, db, f"user-{uid}", csrf, change)


# ---------------------------------------------------------------------- campaigns


@router.post("/admin/campaigns")
def add_campaign(
    request: Request,
    user: AdminUser,
    db: DB,
    csrf: Annotated[str | None, Form()] = None,
    name: Annotated[str | None, Form()] = None,
    overlap: Annotated[str | None, Form()] = None,
    timeout_minutes: Annotated[str | None, Form()] = None,
    guidelines: Annotated[str | None, Form(max_length=100_000)] = None,
    pairs: Annotated[UploadFile | str | None, File()] = None,
) -> Response:
    # Every field is optional (and `pairs` may come as plain text) so that a bad form is
    # answered by the CSRF check and the errors below, never by a 422 before them.
    def change() -> None:
        if pairs is None or isinstance(pairs, str):
            raise PalateError("pairs: upload a JSONL file")
        raw = pairs.file.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PalateError(f"{pairs.filename}: not UTF-8 text ({err.reason})") from err
        per_pair = _int_field("raters per pair", overlap or "1")
        timeout = _int_field("assignment timeout (minutes)", timeout_minutes or "30")
        create_campaign(
            db,
            name or "",
            parse_pairs(text, pairs.filename or "pairs"),
            overlap=per_pair,
            guidelines=guidelines or "",
            source=(pairs.filename or "")[:200],
            assignment_timeout_s=timeout * 60,
        )

    return _form(request, user, db, "add-campaign", csrf or "", change)


def _int_field(what: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError as err:
        raise PalateError(f"{what}: {value!r} is not a whole number") from err
    if not 0 < n < 10**9:
        raise PalateError(f"{what}: {n} is out of range")
    return n


@router.post("/admin/campaigns/{cid}/status")
def campaign_status(
    request: Request,
    cid: Id,
    user: AdminUser,
    db: DB,
    status: Annotated[str, Form(max_length=16)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    return _campaign_form(request, cid, user, db, csrf, lambda c: set_status(db, c, status))


@router.post("/admin/campaigns/{cid}/guidelines")
def campaign_guidelines(
    request: Request,
    cid: Id,
    user: AdminUser,
    db: DB,
    guidelines: Annotated[str, Form(max_length=100_000)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    return _campaign_form(request, cid, user, db, csrf, lambda c: set_guidelines(db, c, guidelines))


@router.post("/admin/campaigns/{cid}/raters")
def campaign_rater_list(
    request: Request,
    cid: Id,
    user: AdminUser,
    db: DB,
    raters: Annotated[list[int], Form(default_factory=list)],
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Who may rate: the ticked raters only, or everyone when none is ticked."""
    return _campaign_form(request, cid, user, db, csrf, lambda c: set_raters(db, c, raters))


@router.post("/admin/campaigns/{cid}/release")
def campaign_release(
    request: Request,
    cid: Id,
    user: AdminUser,
    db: DB,
    minutes: Annotated[str, Form()] = "0",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Release open assignments older than ``minutes`` (0: every open one)."""

    def change(campaign: Campaign) -> None:
        age = int(minutes) if minutes.strip().isdigit() else -1
        if age < 0:
            raise PalateError(f"minutes: {minutes!r} is not a whole number ≥ 0")
        release_assignments(db, campaign, dt.timedelta(minutes=age))

    return _campaign_form(request, cid, user, db, csrf, change)


@router.post("/admin/campaigns/{cid}/delete")
def campaign_delete(
    request: Request,
    cid: Id,
    user: AdminUser,
    db: DB,
    confirm: Annotated[str, Form(max_length=300)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Delete the campaign and all its labels; the admin types its name to confirm."""

    def change(campaign: Campaign) -> None:
        if confirm.strip() != campaign.name:
            raise PalateError("type the campaign's name to confirm deleting it")
        delete_campaign(db, campaign)

    return _campaign_form(request, cid, user, db, csrf, change)


@router.get("/admin/campaigns/{cid}/export")
def export(
    cid: Id,
    user: AdminUser,
    db: DB,
    aggregate: Annotated[str, Query(max_length=20)] = "majority",
    drop_flagged: bool = False,
) -> Response:
    """The comparisons JSONL; ``?aggregate=reliability`` weights votes by rater reliability,
    ``&drop_flagged=true`` leaves out flagged raters."""
    campaign = campaign_or_404(db, cid)
    return Response(
        export_body(db, campaign, aggregate, drop_flagged),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": attachment(f"{campaign.name}.jsonl")},
    )


@router.get("/admin/pairs/{pid}", response_class=HTMLResponse)
def pair_page(request: Request, pid: Id, user: AdminUser, db: DB) -> HTMLResponse:
    """One pair's labels side by side: who (with their attributes), the answer in the pair's
    orientation and in the order they saw it, strength, flags, time, reason."""
    pair = db.get(Pair, pid)
    if pair is None:
        raise HTTPException(status_code=404, detail="no such pair")
    campaign = db.get(Campaign, pair.campaign_id)
    rows = db.execute(
        select(Label, Assignment.swapped, User)
        .join(Assignment, Assignment.id == Label.assignment_id)
        .join(User, User.id == Label.rater_id)
        .where(Label.pair_id == pair.id)
        .order_by(Label.id)
    ).all()
    return render(request, "pair.html", user, pair=pair, campaign=campaign, rows=rows)
