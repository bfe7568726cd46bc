"""``palate serve``: the web app where people compare two responses, plus a JSON API for
programmatic raters (AI judges, simulated panels) over the same store.

Server-rendered Jinja2 pages (autoescaped: model output is untrusted text), signed session
cookies, a per-session CSRF token on every form, bearer tokens for the API.
"""

from __future__ import annotations

import hmac
import json
import random
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from palate.data import as_messages
from palate.errors import PalateError
from palate.label.campaign import parse_pairs
from palate.label.db import FLAGS, STRENGTHS, Assignment, Campaign, Pair, User, open_db
from palate.label.stats import campaign_stats
from palate.label.store import (
    LabelIn,
    check_password,
    create_campaign,
    create_user,
    export_rows,
    next_assignment,
    progress,
    shown_responses,
    skip_assignment,
    submit_label,
    user_by_token,
)

HERE = Path(__file__).resolve().parent
ANSWER_TEXT = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)  # raw HTML is escaped


class LabelBody(BaseModel):
    """A label from a programmatic rater, in the order the pair was served (``a`` = first)."""

    answer: str = Field(description="a (the first response served), b, tie or both_bad")
    strength: str | None = Field(None, description="slightly, clearly or much")
    flags: list[str] = Field(default_factory=list, description="harmful, factually_wrong, evasive")
    comment: str = ""
    seconds: float | None = Field(None, description="Time the rater took, if known.")


def create_app(
    db_url: str, *, secret_key: str | None = None, secure_cookies: bool = False
) -> FastAPI:
    """The app over the database at ``db_url`` (migrated on start)."""
    factory: sessionmaker = open_db(db_url)
    app = FastAPI(title="palate labeling", docs_url="/api/docs", redoc_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key or secrets.token_urlsafe(32),
        https_only=secure_cookies,
        same_site="lax",
        session_cookie="palate_session",
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["markdown"] = _markdown
    app.state.sessionmaker = factory

    def get_db() -> Iterator[Session]:
        with factory() as db:
            yield db

    def current_user(request: Request, db: Session = Depends(get_db)) -> User:
        uid = request.session.get("uid")
        user = db.get(User, uid) if uid is not None else None
        if user is None:
            raise HTTPException(status_code=303, headers={"Location": "/login"})
        return user

    def admin_user(user: User = Depends(current_user)) -> User:
        if user.role != "admin":
            raise HTTPException(status_code=403, detail="admins only")
        return user

    def api_user(request: Request, db: Session = Depends(get_db)) -> User:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        user = user_by_token(db, token) if token else None
        if user is None:
            raise HTTPException(status_code=401, detail="missing or bad API token")
        return user

    def csrf_token(request: Request) -> str:
        tok = request.session.get("csrf")
        if not tok:
            tok = request.session["csrf"] = secrets.token_urlsafe(24)
        return tok

    def check_csrf(request: Request, token: str) -> None:
        expected = request.session.get("csrf", "")
        if not expected or not hmac.compare_digest(expected, token or ""):
            raise HTTPException(status_code=403, detail="CSRF token missing or wrong")

    def render(request: Request, name: str, user: User | None = None, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf_token(request), **ctx}
        )

    def campaign_or_404(db: Session, cid: int) -> Campaign:
        camp = db.get(Campaign, cid)
        if camp is None:
            raise HTTPException(status_code=404, detail="no such campaign")
        return camp

    def assignment_or_404(db: Session, aid: int, cid: int | None = None) -> Assignment:
        a = db.get(Assignment, aid)
        if a is None or (cid is not None and a.campaign_id != cid):
            raise HTTPException(status_code=404, detail="no such assignment")
        return a

    def export_body(db: Session, camp: Campaign) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in export_rows(db, camp))

    # the store's refusals, for pages and API alike: not yours -> 403, bad input -> 400
    @app.exception_handler(PermissionError)
    def _forbidden(_request: Request, err: PermissionError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=403)

    @app.exception_handler(PalateError)
    def _bad_input(_request: Request, err: PalateError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=400)

    # ------------------------------------------------------------------ auth pages

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html")

    @app.post("/login")
    def login(request: Request, name: str = Form(...), password: str = Form(...),
              csrf: str = Form(""), db: Session = Depends(get_db)) -> Response:  # fmt: skip
        check_csrf(request, csrf)
        user = db.scalar(select(User).where(User.name == name))
        if user is None or not check_password(password, user.password_hash):
            return render(request, "login.html", error="Wrong name or password.")
        request.session.clear()
        request.session["uid"] = user.id
        return RedirectResponse("/", status_code=303)

    @app.get("/invite/{token}")
    def invite(request: Request, token: str, db: Session = Depends(get_db)) -> Response:
        user = db.scalar(select(User).where(User.invite_token == token))
        if user is None:
            raise HTTPException(status_code=404, detail="unknown invite link")
        request.session.clear()
        request.session["uid"] = user.id
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        check_csrf(request, csrf)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------------ rater pages

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, user: User = Depends(current_user),
             db: Session = Depends(get_db)) -> HTMLResponse:  # fmt: skip
        camps = list(db.scalars(select(Campaign).order_by(Campaign.id)))
        rows = [(c, progress(db, c, user), progress(db, c)) for c in camps]
        return render(request, "home.html", user, campaigns=rows)

    @app.get("/campaigns/{cid}/rate", response_class=HTMLResponse)
    def rate_page(request: Request, cid: int, user: User = Depends(current_user),
                  db: Session = Depends(get_db)) -> HTMLResponse:  # fmt: skip
        camp = campaign_or_404(db, cid)
        a = next_assignment(db, camp, user)
        mine = progress(db, camp, user)
        if a is None:
            return render(request, "done.html", user, campaign=camp, mine=mine)
        pair = db.get(Pair, a.pair_id)
        assert pair is not None
        left, right = shown_responses(pair, a)
        messages = as_messages(pair.prompt)
        return render(request, "rate.html", user, campaign=camp, assignment=a, messages=messages,
                      left=left, right=right, mine=mine, answers=camp.answers,
                      answer_text=ANSWER_TEXT, strengths=STRENGTHS, flags=FLAGS,
                      started=time.time())  # fmt: skip

    @app.post("/campaigns/{cid}/rate")
    def rate(request: Request, cid: int, assignment_id: int = Form(...), answer: str = Form(...),
             strength: str = Form(""), flags: list[str] = Form([]), comment: str = Form(""),
             started: float = Form(0.0), csrf: str = Form(""), user: User = Depends(current_user),
             db: Session = Depends(get_db)) -> Response:  # fmt: skip
        check_csrf(request, csrf)
        a = assignment_or_404(db, assignment_id, cid)
        if a.rater_id == user.id and a.status != "open":  # a double submit: keep the first
            return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)
        seconds = time.time() - started if started else None
        submit_label(db, a, user, LabelIn(answer=answer, strength=strength or None, flags=flags,
                                          comment=comment, seconds=seconds))  # fmt: skip
        return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)

    @app.post("/campaigns/{cid}/skip")
    def skip(request: Request, cid: int, assignment_id: int = Form(...), csrf: str = Form(""),
             user: User = Depends(current_user), db: Session = Depends(get_db)) -> Response:  # fmt: skip
        check_csrf(request, csrf)
        skip_assignment(db, assignment_or_404(db, assignment_id, cid), user)
        return RedirectResponse(f"/campaigns/{cid}/rate", status_code=303)

    @app.get("/campaigns/{cid}/guidelines", response_class=HTMLResponse)
    def guidelines(request: Request, cid: int, user: User = Depends(current_user),
                   db: Session = Depends(get_db)) -> HTMLResponse:  # fmt: skip
        return render(request, "guidelines.html", user, campaign=campaign_or_404(db, cid))

    # ------------------------------------------------------------------ admin pages

    @app.get("/admin", response_class=HTMLResponse)
    def dashboard(request: Request, user: User = Depends(admin_user),
                  db: Session = Depends(get_db)) -> HTMLResponse:  # fmt: skip
        camps = list(db.scalars(select(Campaign).order_by(Campaign.id)))
        stats = [(c, campaign_stats(db, c)) for c in camps]
        raters = list(db.scalars(select(User).order_by(User.id)))
        return render(request, "admin.html", user, stats=stats, raters=raters,
                      created=request.session.pop("created", None))  # fmt: skip

    @app.post("/admin/raters")
    def add_rater(request: Request, name: str = Form(...), password: str = Form(""),
                  role: str = Form("rater"), csrf: str = Form(""),
                  user: User = Depends(admin_user), db: Session = Depends(get_db)) -> Response:  # fmt: skip
        check_csrf(request, csrf)
        new, invite, api = create_user(db, name.strip(), role, password or None)
        base = str(request.base_url).rstrip("/")
        request.session["created"] = {"name": new.name, "invite": f"{base}/invite/{invite}",
                                      "api_token": api}  # fmt: skip
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/campaigns")
    async def add_campaign(request: Request, user: User = Depends(admin_user)) -> Response:
        form = await request.form()
        check_csrf(request, str(form.get("csrf", "")))
        upload = form.get("pairs")
        if upload is None or isinstance(upload, str):
            raise HTTPException(status_code=400, detail="pairs: upload a JSONL file")
        text = (await upload.read()).decode("utf-8", errors="replace")
        try:
            overlap = int(str(form.get("overlap", "1")))
        except ValueError as err:
            raise HTTPException(status_code=400, detail=f"overlap: {err}") from err
        pairs = parse_pairs(text, upload.filename or "pairs")
        with factory() as db:
            create_campaign(db, str(form.get("name", "")).strip(), pairs, overlap=overlap,
                            guidelines=str(form.get("guidelines", "")),
                            source=upload.filename or "")  # fmt: skip
        return RedirectResponse("/admin", status_code=303)

    @app.get("/admin/campaigns/{cid}/export")
    def export(cid: int, user: User = Depends(admin_user),
               db: Session = Depends(get_db)) -> Response:  # fmt: skip
        camp = campaign_or_404(db, cid)
        return Response(export_body(db, camp), media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{camp.name}.jsonl"'})  # fmt: skip

    # ------------------------------------------------------------------ JSON API

    @app.post("/api/v1/campaigns/{cid}/next")
    def api_next(
        cid: int, user: User = Depends(api_user), db: Session = Depends(get_db)
    ) -> Response:
        camp = campaign_or_404(db, cid)
        a = next_assignment(db, camp, user, random.Random())
        if a is None:
            return Response(status_code=204)
        pair = db.get(Pair, a.pair_id)
        assert pair is not None
        first, second = shown_responses(pair, a)
        return JSONResponse({"assignment_id": a.id, "prompt": pair.prompt, "a": first,
                             "b": second, "answers": camp.answers})  # fmt: skip

    @app.post("/api/v1/assignments/{aid}/label")
    def api_label(aid: int, body: LabelBody, user: User = Depends(api_user),
                  db: Session = Depends(get_db)) -> dict[str, Any]:  # fmt: skip
        lab = submit_label(db, assignment_or_404(db, aid), user, LabelIn(**body.model_dump()))
        return {"label_id": lab.id}

    @app.post("/api/v1/assignments/{aid}/skip")
    def api_skip(aid: int, user: User = Depends(api_user),
                 db: Session = Depends(get_db)) -> dict[str, Any]:  # fmt: skip
        skip_assignment(db, assignment_or_404(db, aid), user)
        return {"skipped": aid}

    @app.get("/api/v1/campaigns/{cid}/progress")
    def api_progress(cid: int, user: User = Depends(api_user),
                     db: Session = Depends(get_db)) -> dict[str, Any]:  # fmt: skip
        camp = campaign_or_404(db, cid)
        return {"campaign": progress(db, camp), "mine": progress(db, camp, user)}

    @app.get("/api/v1/campaigns/{cid}/export")
    def api_export(cid: int, user: User = Depends(api_user),
                   db: Session = Depends(get_db)) -> Response:  # fmt: skip
        if user.role != "admin":
            raise HTTPException(status_code=403, detail="admins only")
        camp = campaign_or_404(db, cid)
        return Response(export_body(db, camp), media_type="application/x-ndjson")

    return app
