"""``palate serve``: the web app where people compare two responses, plus a JSON API for
programmatic raters (AI judges, simulated panels) over the same store.

Server-rendered Jinja2 pages (autoescaped: model output is untrusted text), server-side
sessions (the signed cookie holds a random session token and the CSRF token; logout deletes the
session), a CSRF token on every form, hashed bearer tokens for the API, security headers, body
size limits and login throttling (``palate.label.security``).

Layout: this module builds the app (middleware, static files, templates, error handlers) and
puts the session factory and the templates on ``app.state``; ``deps`` holds the dependencies
(database session, current user, admin, API caller, CSRF) and small shared helpers; the routers
are ``routes.pages`` (sign-in and rater pages), ``routes.admin`` (the dashboard) and
``routes.api`` (the JSON API under ``/api/v1``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from palate.errors import ConflictError, PalateError
from palate.label.db import open_db
from palate.label.routes import admin, api, pages
from palate.label.security import BodyLimit, LoginThrottle, SecurityHeaders

HERE = Path(__file__).resolve().parent


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)  # raw HTML is escaped


UPLOAD_LIMIT = 64 * 2**20  # a campaign's pairs file
BODY_LIMIT = 2**20  # every other request


def _body_limit(path: str) -> int:
    return UPLOAD_LIMIT if path == "/admin/campaigns" else BODY_LIMIT


def _refusal(status: int) -> Callable[[Request, Exception], Response]:
    """The store's refusals: JSON for the API; for pages, a page saying what went wrong."""

    def handler(request: Request, err: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(err)}, status_code=status)
        templates: Jinja2Templates = request.app.state.templates
        return templates.TemplateResponse(
            request,
            "error.html",
            {"user": None, "csrf": "", "message": str(err), "status": status},
            status_code=status,
        )

    return handler


def _invalid_request(request: Request, err: Exception) -> Response:
    """A request FastAPI could not validate: a 422 with where and what (never the input
    itself, which may be huge or, like NaN, not even JSON), or for a form, a page saying it."""
    assert isinstance(err, RequestValidationError)
    problems = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in err.errors()
    ]
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": problems}, status_code=422)
    text = "; ".join(f"{p['loc'][-1]}: {p['msg']}" for p in problems)
    return _refusal(400)(request, PalateError(f"bad form: {text}"))


def create_app(
    db_url: str, *, secret_key: str | None = None, secure_cookies: bool = False
) -> FastAPI:
    """The app over the database at ``db_url`` (migrated on start)."""
    # no /docs page: Swagger's assets would come from a CDN (offline installs have none);
    # the schema itself stays at /api/openapi.json
    app = FastAPI(
        title="palate labeling", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json"
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key or secrets.token_urlsafe(32),
        https_only=secure_cookies,
        same_site="lax",
        session_cookie="palate_session",
    )
    app.add_middleware(BodyLimit, limit_for=_body_limit)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["markdown"] = _markdown
    app.state.templates = templates
    app.state.sessionmaker = open_db(db_url)
    app.state.throttle = LoginThrottle()
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(PermissionError, _refusal(403))
    app.add_exception_handler(PalateError, _refusal(400))
    app.add_exception_handler(ConflictError, _refusal(409))
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(api.router)
    return app
