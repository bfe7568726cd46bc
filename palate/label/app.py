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
from typing import Any

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
    app.add_api_route("/healthz", _health, methods=["GET"], include_in_schema=False)
    return app


def _health(request: Request) -> Response:
    """For load balancers and process managers: 200 when this worker can reach the database,
    else 503. No sign-in needed; says nothing about the data."""
    from sqlalchemy import text

    try:
        with request.app.state.sessionmaker() as db:
            db.execute(text("SELECT 1"))
    except Exception as err:  # any database failure means "not healthy"
        return JSONResponse({"status": "error", "database": type(err).__name__}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


# Settings a worker process reads (``palate serve --workers N`` sets them for its workers).
ENV_DB, ENV_SECRET, ENV_SECURE = "PALATE_DB", "PALATE_SECRET_KEY", "PALATE_SECURE_COOKIES"


def app_from_env() -> FastAPI:
    """The app for one of several uvicorn worker processes (an import-string factory, as
    uvicorn needs for ``workers > 1``): database and secret key from the environment. Every
    worker must share the secret key, or a session cookie signed by one is refused by another."""
    import os

    secret = os.environ.get(ENV_SECRET)
    if not secret:
        raise PalateError(f"{ENV_SECRET} must be set for the workers to share sessions")
    return create_app(
        os.environ[ENV_DB], secret_key=secret, secure_cookies=os.environ.get(ENV_SECURE) == "1"
    )


def serve(
    db: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    secure_cookies: bool = False,
    graceful_timeout: float = 30.0,
    say: Callable[[str], object] = print,
) -> None:
    """Run the app under uvicorn until SIGTERM/SIGINT, then let requests in flight finish (up to
    ``graceful_timeout`` seconds). With ``workers > 1`` the database is migrated here first
    (workers would race to it) and the workers share one secret key (PALATE_SECRET_KEY, or one
    drawn now); uvicorn's supervisor restarts a worker that dies."""
    import os

    import uvicorn

    secret = os.environ.get(ENV_SECRET)
    where = f"http://{host}:{port}  (database: {db}; {workers} worker(s))"
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "warning",
        "timeout_graceful_shutdown": graceful_timeout,
    }
    say(f"palate labeling app on {where}")
    if workers == 1:
        application = create_app(db, secret_key=secret, secure_cookies=secure_cookies)
        uvicorn.run(application, **options)
        return
    if "://" not in db or db.startswith("sqlite"):
        say(
            "several workers on SQLite: writes queue on one file lock; PostgreSQL is the "
            "database for this (docs/label.md)"
        )
    open_db(db)  # migrate once, before the workers start
    os.environ[ENV_DB] = db
    os.environ[ENV_SECRET] = secret or secrets.token_urlsafe(32)
    os.environ[ENV_SECURE] = "1" if secure_cookies else "0"
    # uvicorn's supervisor pings each worker and kills one that does not answer in time as
    # hung; its 5 s default kills busy, healthy workers on a loaded small machine (seen: 4
    # workers, 50 raters, 2 cores), cutting off their requests in flight
    options["timeout_worker_healthcheck"] = 30
    uvicorn.run("palate.label.app:app_from_env", factory=True, workers=workers, **options)
