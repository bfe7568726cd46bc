"""Stage ``labels``: a campaign of the round's pairs in the store, labelled by the run's raters
(simulated, an AI judge or people; per criterion with ``raters.routes``), exported as
comparisons with the raters' quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from palate.data import criterion_of, read_jsonl, read_records, write_jsonl
from palate.errors import DataError
from palate.feedback import load_judge
from palate.label.campaign import parse_pairs
from palate.label.db import Campaign, open_db
from palate.label.stats import campaign_stats
from palate.label.store import create_campaign, export_rows
from palate.pipeline.recipes import group_panels, round_policy
from palate.pipeline.run import Run
from palate.raters import Raters
from palate.raters.judge import JudgeRaters
from palate.raters.people import (
    PeopleRaters,
)
from palate.raters.simulated import SimulatedRaters
from palate.rundir import RunDir


def campaign_plan(run: Run, r: int = 0) -> list[tuple[str, str, str | None]]:
    """(campaign name, who labels it, criterion) for round r's pairs: one campaign labelled by
    ``raters.kind``, or with ``raters.routes`` one per criterion, each by its route."""
    raters = run.cfg.raters
    base = run.campaign if r == 0 else f"{run.campaign}-round-{r}"
    if not raters.routes:
        return [(base, raters.kind, None)]
    rows = read_jsonl(run.round_dir(r, "pairs") / "pairs.jsonl")
    criteria = sorted({criterion_of(r.get("metadata")) for r in rows})
    plan: list[tuple[str, str, str | None]] = [
        (f"{base}-{c}", raters.routes.get(c, raters.kind), c) for c in criteria
    ]
    if sum(kind == "people" for _, kind, _ in plan) > 1:
        raise DataError(
            f"raters.routes: people would label {len(plan)} campaigns; route one criterion to "
            "people (the others to simulated or judge)"
        )
    return plan


def run_campaign(
    run: Run,
    name: str | None = None,
    criterion: str | None = None,
    overlap: int | None = None,
    r: int = 0,
) -> tuple[sessionmaker[Session], int]:
    """Create (or find) a campaign of round r's pairs (those of ``criterion`` when given);
    returns (sessionmaker, campaign id)."""

    name = name or run.campaign
    factory = open_db(run.db_url)
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == name))
        if camp is None:
            pairs_file = run.round_dir(r, "pairs") / "pairs.jsonl"
            pairs = parse_pairs(pairs_file.read_text(), str(pairs_file))
            if criterion is not None:
                pairs = [p for p in pairs if criterion_of(p.meta) == criterion]
            people = run.cfg.raters.people
            guidelines = Path(people.guidelines).read_text() if people.guidelines else ""
            camp = create_campaign(
                db,
                name,
                pairs,
                overlap=overlap or run.cfg.raters.overlap,
                guidelines=guidelines,
                source=round_policy(run, r),
            )
        return factory, camp.id


def raters_for(run: Run, kind: str, criterion: str | None) -> Raters:
    """The raters ``raters.kind`` (or a route) names for a campaign of ``criterion``'s pairs."""
    raters = run.cfg.raters
    if kind == "simulated":
        plan: list[tuple[str | None, Any]] = [*group_panels(run)] or [(None, raters.panel)]
        return SimulatedRaters(
            [(f"sim-{g}" if g else "sim", panel, run.gold(g)) for g, panel in plan]
        )
    if kind == "judge":
        criteria = None if raters.judge.criteria or raters.judge.principles else criterion
        judge = load_judge(raters.judge, [criteria] if criteria else None)
        return JudgeRaters(judge, tie_band=raters.judge.tie_band)
    return PeopleRaters(raters.people, run.dir("labels"))


def export_campaign(
    run: Run, db: Session, camp: Campaign, groups: list[tuple[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """A labelled campaign's comparisons (with rater groups: one row per pair and group, marked
    with the group), its quality statistics and the raters dropped."""
    raters = run.cfg.raters
    settings = raters.quality
    if groups and settings.within is None:  # reliability within each population
        settings = settings.model_copy(update={"within": "group"})
    stats = campaign_stats(db, camp, settings)
    drop = stats["flagged"] if raters.drop_flagged else []
    if not groups:
        return export_rows(db, camp, aggregate=raters.aggregate, drop_raters=drop), stats, drop
    rows = []
    for group, _ in groups:
        others = [
            q["rater"] for q in stats["raters"] if (q.get("attributes") or {}).get("group") != group
        ]
        for row in export_rows(db, camp, aggregate=raters.aggregate, drop_raters=[*drop, *others]):
            row["metadata"]["group"] = group
            rows.append(row)
    return rows, stats, drop


def stage_labels(run: Run, r: int = 0) -> dict[str, Any]:
    """Round r's comparisons: the raters label each campaign of the round's pairs (or a
    comparisons file stands in for them), exported with their quality statistics."""
    raters = run.cfg.raters
    d = run.round_dir(r, "labels")
    d.mkdir(parents=True, exist_ok=True)
    out = d / "comparisons.jsonl"
    summary: dict[str, Any] = {"stage": "labels", "raters": raters.kind}
    if raters.kind == "file":
        assert raters.file is not None and r == 0
        records = read_records(raters.file, "comparisons").records
        write_jsonl(out, records)
        summary.update(comparisons=len(records), source=raters.file)
        RunDir(d).write_summary(summary)
        return summary
    rows: list[dict[str, Any]] = []
    campaigns: dict[str, Any] = {}
    quality: dict[str, Any] = {}  # per campaign: raters' reliability and flags, populations
    keep = ("labels", "pairwise_agreement", "krippendorff_alpha", "median_seconds", "flagged")
    groups = group_panels(run)
    for name, kind, criterion in campaign_plan(run, r):
        overlap = 1 if kind == "judge" else None
        if groups:  # every rater of every group labels every pair
            overlap = sum(p.raters + p.random_raters + p.first_raters for _, p in groups)
        factory, cid = run_campaign(run, name, criterion, overlap, r)
        raters_for(run, kind, criterion).label(run.db_url, name)
        with factory() as db:
            camp = db.get(Campaign, cid)
            assert camp is not None
            got, stats, drop = export_campaign(run, db, camp, groups)
            rows += got
        quality[name] = {
            "flagged": stats["flagged"],
            "dropped": drop,
            "aggregate": raters.aggregate,
            "raters": stats["raters"],
            "populations": stats["populations"],
        }
        campaigns[name] = {
            "raters": kind,
            "criterion": criterion,
            **{k: stats[k] for k in keep if k in stats},
        }
    if not rows:
        raise DataError(f"campaign {name!r}: no usable labels (all skipped or both bad)")
    write_jsonl(out, rows)
    (d / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
    summary.update(db=run.db_url, comparisons=len(rows))
    if len(campaigns) == 1:
        summary.update(campaign=name, **{k: v for k, v in stats.items() if k in keep})
    else:
        summary["campaigns"] = campaigns
        summary["sources"] = {
            src: sum(r["source"] == src for r in rows)
            for src in sorted({r["source"] for r in rows})
        }
    RunDir(d).write_summary(summary)
    return summary
