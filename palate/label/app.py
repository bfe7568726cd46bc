"""``palate serve``: the web app where people compare two responses, plus a JSON API for
programmatic raters (AI judges, simulated panels) over the same store.

Server-rendered Jinja2 pages (autoescaped: model output is untrusted text), signed session
cookies, a per-session CSRF token on every form, bearer tokens for the API.

Layout: this module builds the app (middleware, static files, templates, error handlers) and
puts the session factory and the templates on ``app.state``; ``deps`` holds the dependencies
(database session, current user, admin, API caller, CSRF) and small shared helpers; the routers
are ``routes.pages`` (sign-in and rater pages), ``routes.admin`` (the dashboard) and
``routes.api`` (the JSON API under ``/api/v1``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from palate.errors import PalateError
from palate.label.db import open_db
from palate.label.routes import admin, api, pages

HERE = Path(__file__).resolve().parent


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)  # raw HTML is escaped


# the store's refusals, for pages and API alike: not yours -> 403, bad input -> 400
def _forbidden(_request: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=403)


def _bad_input(_request: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=400)


def create_app(
    db_url: str, *, secret_key: str | None = None, secure_cookies: bool = False
) -> FastAPI:
    """The app over the database at ``db_url`` (migrated on start)."""
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
    app.state.templates = templates
    app.state.sessionmaker = open_db(db_url)
    app.add_exception_handler(PermissionError, _forbidden)
    app.add_exception_handler(PalateError, _bad_input)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(api.router)
    return app
