"""The JSON API for programmatic raters (AI judges, simulated panels), under ``/api/v1``.

Callers authenticate with ``Authorization: Bearer <API token>``; pairs are served and labelled
in the order shown (``a`` = the first response served).
"""

from __future__ import annotations

import random
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from palate.label.db import Pair
from palate.label.deps import DB, ApiUser, Id, assignment_or_404, campaign_or_404, export_body
from palate.label.store import (
    MAX_SECONDS,
    LabelIn,
    next_assignment,
    progress,
    remaining_for,
    shown_responses,
    skip_assignment,
    submit_label,
)

router = APIRouter(prefix="/api/v1")


class LabelBody(BaseModel):
    """A label from a programmatic rater, in the order the pair was served (``a`` = first)."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(
        max_length=16, description="a (the first response served), b, tie or both_bad"
    )
    strength: str | None = Field(None, max_length=16, description="slightly, clearly or much")
    flags: list[str] = Field(
        default_factory=list, max_length=8, description="harmful, factually_wrong, evasive"
    )
    comment: str = Field("", max_length=5000)
    seconds: float | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Time the rater took, if known (0 to 86,400).",
    )
    prob: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="An AI judge's soft label: P(the first response served is better).",
    )
    principle: str | None = Field(
        None, max_length=64, description="The constitution principle an AI judge used."
    )


@router.post("/campaigns/{cid}/next")
def api_next(cid: Id, user: ApiUser, db: DB) -> Response:
    """The caller's next pair (its open one first); 204 when nothing is left for it or the
    campaign is paused or closed."""
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
def api_label(aid: Id, body: LabelBody, user: ApiUser, db: DB) -> dict[str, Any]:
    """Label an open assignment; 409 if it is already labelled, skipped or expired."""
    assignment = assignment_or_404(db, aid)
    label = submit_label(db, assignment, user, LabelIn(**body.model_dump()))
    return {"label_id": label.id}


@router.post("/assignments/{aid}/skip")
def api_skip(aid: Id, user: ApiUser, db: DB) -> dict[str, Any]:
    """Give the pair back (a repeat is a no-op); 409 if it was labelled or expired."""
    skip_assignment(db, assignment_or_404(db, aid), user)
    return {"skipped": aid}


@router.get("/campaigns/{cid}/progress")
def api_progress(cid: Id, user: ApiUser, db: DB) -> dict[str, Any]:
    campaign = campaign_or_404(db, cid)
    return {
        "campaign": progress(db, campaign),
        "mine": progress(db, campaign, user),
        "remaining_for_me": remaining_for(db, campaign, user),
        "status": campaign.status,
    }


@router.get("/campaigns/{cid}/export")
def api_export(cid: Id, user: ApiUser, db: DB) -> Response:
    if user.role != "admin":
        raise HTTPException(status_code=403, detail="admins only")
    campaign = campaign_or_404(db, cid)
    return Response(export_body(db, campaign), media_type="application/x-ndjson")
