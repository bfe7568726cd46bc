"""The admin's pages: the dashboard, adding raters and campaigns, exporting a campaign."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from palate.label.campaign import parse_pairs
from palate.label.db import Campaign, User
from palate.label.deps import DB, AdminUser, campaign_or_404, check_csrf, export_body, render
from palate.label.stats import campaign_stats
from palate.label.store import create_campaign, create_user

router = APIRouter()


@router.get("/admin", response_class=HTMLResponse)
def dashboard(request: Request, user: AdminUser, db: DB) -> HTMLResponse:
    campaigns = list(db.scalars(select(Campaign).order_by(Campaign.id)))
    stats = [(campaign, campaign_stats(db, campaign)) for campaign in campaigns]
    raters = list(db.scalars(select(User).order_by(User.id)))
    created = request.session.pop("created", None)
    return render(request, "admin.html", user, stats=stats, raters=raters, created=created)


@router.post("/admin/raters")
def add_rater(
    request: Request,
    name: Annotated[str, Form()],
    user: AdminUser,
    db: DB,
    password: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "rater",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    new_user, invite_token, api_token = create_user(db, name.strip(), role, password or None)
    base_url = str(request.base_url).rstrip("/")
    request.session["created"] = {
        "name": new_user.name,
        "invite": f"{base_url}/invite/{invite_token}",
        "api_token": api_token,
    }
    return RedirectResponse("/admin", status_code=303)


@router.post("/admin/campaigns")
def add_campaign(
    request: Request,
    user: AdminUser,
    db: DB,
    csrf: Annotated[str | None, Form()] = None,
    name: Annotated[str | None, Form()] = None,
    overlap: Annotated[str | None, Form()] = None,
    guidelines: Annotated[str | None, Form()] = None,
    pairs: Annotated[UploadFile | str | None, File()] = None,
) -> Response:
    # Every field is optional (and `pairs` may come as plain text) so that a bad form is
    # answered by the CSRF check and the 400s below, never by a 422 before them.
    check_csrf(request, csrf or "")
    if pairs is None or isinstance(pairs, str):
        raise HTTPException(status_code=400, detail="pairs: upload a JSONL file")
    text = pairs.file.read().decode("utf-8", errors="replace")
    try:
        raters_per_pair = int(overlap or "1")
    except ValueError as err:
        raise HTTPException(status_code=400, detail=f"overlap: {err}") from err
    parsed_pairs = parse_pairs(text, pairs.filename or "pairs")
    create_campaign(
        db,
        (name or "").strip(),
        parsed_pairs,
        overlap=raters_per_pair,
        guidelines=guidelines or "",
        source=pairs.filename or "",
    )
    return RedirectResponse("/admin", status_code=303)


@router.get("/admin/campaigns/{cid}/export")
def export(cid: int, user: AdminUser, db: DB) -> Response:
    campaign = campaign_or_404(db, cid)
    return Response(
        export_body(db, campaign),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{campaign.name}.jsonl"'},
    )
