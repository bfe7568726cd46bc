"""The JSON API for programmatic raters (AI judges, simulated panels), under ``/api/v1``.

Callers authenticate with ``Authorization: Bearer <API token>``; pairs are served and labelled
in the order shown (``a`` = the first response served).
"""

from __future__ import annotations

import random
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from palate.label.db import Pair
from palate.label.deps import DB, ApiUser, assignment_or_404, campaign_or_404, export_body
from palate.label.store import (
    LabelIn,
    next_assignment,
    progress,
    shown_responses,
    skip_assignment,
    submit_label,
)

router = APIRouter(prefix="/api/v1")


class LabelBody(BaseModel):
    """A label from a programmatic rater, in the order the pair was served (``a`` = first)."""

    answer: str = Field(description="a (the first response served), b, tie or both_bad")
    strength: str | None = Field(None, description="slightly, clearly or much")
    flags: list[str] = Field(default_factory=list, description="harmful, factually_wrong, evasive")
    comment: str = ""
    seconds: float | None = Field(None, description="Time the rater took, if known.")


@router.post("/campaigns/{cid}/next")
def api_next(cid: int, user: ApiUser, db: DB) -> Response:
    campaign = campaign_or_404(db, cid)
    assignment = next_assignment(db, campaign, user, random.Random())
    if assignment is None:
        return Response(status_code=204)
    pair = db.get(Pair, assignment.pair_id)
    assert pair is not None
    first, second = shown_responses(pair, assignment)
    return JSONResponse(
        {
            "assignment_id": assignment.id,
            "prompt": pair.prompt,
            "a": first,
            "b": second,
            "answers": campaign.answers,
        }
    )


@router.post("/assignments/{aid}/label")
def api_label(aid: int, body: LabelBody, user: ApiUser, db: DB) -> dict[str, Any]:
    assignment = assignment_or_404(db, aid)
    label = submit_label(db, assignment, user, LabelIn(**body.model_dump()))
    return {"label_id": label.id}


@router.post("/assignments/{aid}/skip")
def api_skip(aid: int, user: ApiUser, db: DB) -> dict[str, Any]:
    skip_assignment(db, assignment_or_404(db, aid), user)
    return {"skipped": aid}


@router.get("/campaigns/{cid}/progress")
def api_progress(cid: int, user: ApiUser, db: DB) -> dict[str, Any]:
    campaign = campaign_or_404(db, cid)
    return {"campaign": progress(db, campaign), "mine": progress(db, campaign, user)}


@router.get("/campaigns/{cid}/export")
def api_export(cid: int, user: ApiUser, db: DB) -> Response:
    if user.role != "admin":
        raise HTTPException(status_code=403, detail="admins only")
    campaign = campaign_or_404(db, cid)
    return Response(export_body(db, campaign), media_type="application/x-ndjson")
