"""People as raters of a campaign: their accounts and links, and serving the labeling app
in-process until the campaign is complete (what ``palate run`` does with ``raters.kind:
people``)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from palate.config import Config
from palate.errors import ConfigError
from palate.label.db import Campaign, User, open_db
from palate.label.store import create_user, invite_status, issue_invite, progress
from palate.progress import console, progress_bar

__all__ = [
    "PeopleRaters",
    "PeopleSettings",
    "WaitingForLabels",
    "announce",
    "campaign_progress",
    "ensure_accounts",
    "serve_until_complete",
]


class PeopleSettings(Config):
    """``raters.kind: people``: a campaign in the labeling app."""

    raters: list[str] = Field(
        default_factory=lambda: ["rater-1"], description="Rater accounts to create."
    )
    admin: str = Field("admin", description="Admin account (dashboard, export).")
    host: str = Field("127.0.0.1", description="Interface the app binds while the run waits.")
    port: int = Field(8000, ge=0, description="Port (0 = any free port).")
    public_url: str | None = Field(
        None, description="URL raters reach the app at, if not http://host:port (a proxy)."
    )
    wait: bool = Field(
        True,
        description="Serve the app and wait until the campaign is complete; false: print the "
        "links and exit (code 3), and continue on the next run once labels are in.",
    )
    poll_seconds: float = Field(2.0, gt=0, description="How often progress is checked.")
    guidelines: str | None = Field(None, description="Markdown file shown to raters.")

    # Settings that change how the app is served, not which labels come back.
    SERVING: ClassVar[tuple[str, ...]] = ("host", "port", "public_url", "wait", "poll_seconds")

    def url(self) -> str:
        """Where raters reach the app (before a port-0 server has picked its port)."""
        return self.public_url or f"http://{self.host}:{self.port}"


def campaign_progress(factory: sessionmaker[Session], campaign_id: int) -> dict[str, int]:
    """The campaign's ``labels`` so far and its ``target`` (pairs × overlap)."""
    with factory() as db:
        camp = db.get(Campaign, campaign_id)
        assert camp is not None
        return progress(db, camp)


def ensure_accounts(
    factory: sessionmaker[Session], path: Path, people: PeopleSettings, campaign_id: int
) -> dict[str, Any]:
    """Create the admin and rater accounts once; their invite links and API tokens are kept
    (mode 0600) in ``path``, the only place they exist in the clear. An invite link that has
    expired since (a wait of more than a week) is re-issued."""
    known: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"accounts": {}}
    wanted = [(people.admin, "admin")] + [(name, "rater") for name in people.raters]
    with factory() as db:
        for name, role in wanted:
            if name in known["accounts"]:
                kept = known["accounts"][name]
                user = db.scalar(select(User).where(User.name == name))
                expired = kept.get("invite") and invite_status(db, kept["invite"])[1] == "expired"
                if expired and user is not None:  # a wait of more than a week
                    kept["invite"] = issue_invite(db, user)
                continue
            if db.scalar(select(User).where(User.name == name)) is not None:
                known["accounts"][name] = {"role": role, "invite": None, "api_token": None}
                continue
            _, invite, token = create_user(db, name, role)
            known["accounts"][name] = {"role": role, "invite": invite, "api_token": token}
    known["campaign_id"] = campaign_id
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(known, fh, indent=2)
    return known


def announce(
    url: str, campaign: str, campaign_id: int, accounts: dict[str, Any], accounts_file: Path
) -> None:
    """Print the app's URL and every account's invite link."""
    console.print(f"[bold]labeling app:[/bold] {url}   campaign {campaign!r} (id {campaign_id})")
    for name, a in accounts["accounts"].items():
        link = f"{url}/invite/{a['invite']}" if a["invite"] else "(account existed before)"
        console.print(f"  {a['role']:5s} {name}: {link}")
    console.print(f"  API tokens and links: {accounts_file}")


def serve_until_complete(
    db_url: str,
    factory: sessionmaker[Session],
    campaign_id: int,
    people: PeopleSettings,
    *,
    serving_file: Path,
    on_url: Callable[[str], None],
) -> None:
    """Serve the labeling app in a background thread until the campaign has every label, with
    a progress bar; ``serving_file`` holds the URL while the app is up."""
    import uvicorn

    # the web app (FastAPI, Jinja2) loads only when people are served
    from palate.label.app import create_app

    app = create_app(db_url, secret_key=os.environ.get("PALATE_SECRET_KEY"))
    server = uvicorn.Server(
        uvicorn.Config(app, host=people.host, port=people.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="palate-labeling", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"raters.people: could not serve on {people.host}:{people.port}")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = people.public_url or f"http://{people.host}:{port}"
    serving_file.write_text(json.dumps({"url": url}) + "\n")
    on_url(url)
    try:
        p = campaign_progress(factory, campaign_id)
        with progress_bar("labels (people)", total=p["target"], completed=p["labels"]) as bar:
            while p["labels"] < p["target"]:
                time.sleep(people.poll_seconds)
                p = campaign_progress(factory, campaign_id)
                bar.update(p["labels"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        serving_file.unlink(missing_ok=True)


class WaitingForLabels(Exception):
    """The people campaign is not complete and ``raters.people.wait`` is false."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class PeopleRaters:
    """People label the campaign in the app: their accounts are made (links and API tokens in
    ``folder/raters.json``), then the app is served in-process until every label is in
    (``settings.wait``), or :class:`WaitingForLabels` says how to serve it and come back."""

    settings: PeopleSettings
    folder: Path  # raters.json (accounts) and serving.json (the URL while serving)

    def label(self, db_url: str, campaign: str) -> dict[str, Any]:
        factory = open_db(db_url)
        with factory() as db:
            camp = db.scalar(select(Campaign).where(Campaign.name == campaign))
            if camp is None:
                raise ConfigError(f"{db_url}: no campaign named {campaign!r}")
            cid = camp.id
        accounts_file = self.folder / "raters.json"
        accounts = ensure_accounts(factory, accounts_file, self.settings, cid)
        got = campaign_progress(factory, cid)
        if got["labels"] >= got["target"]:
            return {"campaign": campaign, **got}

        def show(url: str) -> None:
            announce(url, campaign, cid, accounts, accounts_file)

        if not self.settings.wait:
            show(self.settings.url())
            raise WaitingForLabels(
                f"campaign {campaign!r}: {got['labels']}/{got['target']} "
                f"labels. Serve it with `palate serve --db {db_url}`, then run the same "
                "command again.",
                {"stage": "labels", "status": "waiting_for_labels", **got},
            )
        serving = self.folder / "serving.json"
        serve_until_complete(db_url, factory, cid, self.settings, serving_file=serving, on_url=show)
        return {"campaign": campaign, **campaign_progress(factory, cid)}
