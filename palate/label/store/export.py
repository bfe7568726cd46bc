"""Export: each labelled pair's votes aggregated into the comparison rows palate's reward model
trains on, one row per pair and label source."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.errors import ConfigError
from palate.label.db import ANSWERS, SOURCES, Campaign, Label, Pair, User
from palate.label.quality import label_rows, weighted_votes


def aggregate(answers: Iterable[str], probs: Sequence[float | None] = ()) -> dict[str, Any]:
    """Votes on one pair → the comparison palate's reward model trains on. ``prob_a`` is the
    vote fraction (ties count half) — or, when every vote carries a soft label (an AI judge's
    P(a)), the mean soft label."""
    answers = list(answers)
    votes = Counter(answers)
    a, b, tie, bad = (votes.get(k, 0) for k in ANSWERS)
    decided = a + b + tie
    if decided == 0:
        return {"skip": True, "votes": dict(votes)}
    prob_a = (a + 0.5 * tie) / decided
    soft = [p for p, ans in zip(probs, answers, strict=False) if ans != "both_bad"]
    if probs and len(soft) == decided and all(p is not None for p in soft):
        prob_a = sum(p for p in soft if p is not None) / decided
    return {
        "skip": False,
        "votes": dict(votes),
        "prob_a": prob_a,
        "tie": tie > max(a, b) or (a == b and a > 0 and prob_a == 0.5),
    }


AGGREGATES = ("majority", "reliability")


def export_rows(
    db: Session,
    campaign: Campaign,
    sources: Sequence[str] | None = None,
    *,
    aggregate: str = "majority",
    drop_raters: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """One comparison row per labelled pair and label source (human, ai, simulated; not all
    both-bad): chosen/rejected by majority, ``prob_chosen`` = the vote fraction (ties count
    half; an AI judge's soft label where it gave one), ``tie`` when ties win, raters, and
    ``source``. A pair labelled by people and by a judge gives one row each, so the reward
    stage can weight or drop a source; ``sources`` keeps only those.

    ``aggregate="reliability"``: ``prob_chosen`` is the Dawid-Skene posterior instead, each
    rater's vote weighted by their estimated reliability (:mod:`palate.label.quality`, fitted
    per source). ``drop_raters``: these raters' labels are left out. Each row's
    ``metadata.labels`` lists the votes: rater, their attributes, answer, strength, seconds,
    comment."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate {aggregate!r}: expected one of {list(AGGREGATES)}")
    drop = set(drop_raters)
    rows = []
    labels: dict[tuple[int, str], list[Label]] = {}
    users = {u.id: u for u in db.scalars(select(User))}
    for lab in db.scalars(
        select(Label)
        .join(Pair, Pair.id == Label.pair_id)
        .where(Pair.campaign_id == campaign.id)
        .order_by(Label.id)
    ):
        user = users[lab.rater_id]
        if (sources is None or user.kind in sources) and user.name not in drop:
            labels.setdefault((lab.pair_id, user.kind), []).append(lab)
    posterior: dict[str, dict[int, float]] = {}
    if aggregate == "reliability":
        all_rows = label_rows(db, [campaign.id])
        kind_of = {u.name: u.kind for u in users.values()}
        for kind in SOURCES:
            mine = [r for r in all_rows if kind_of.get(r.rater) == kind]
            if mine and (sources is None or kind in sources):
                posterior[kind] = weighted_votes(mine, drop=drop)
    for pair in db.scalars(select(Pair).where(Pair.campaign_id == campaign.id).order_by(Pair.id)):
        for kind in SOURCES:
            labs = labels.get((pair.id, kind), [])
            if labs:
                prob_a = posterior.get(kind, {}).get(pair.id)
                row = _export_row(pair, labs, kind, campaign.name, users, prob_a)
                if row is not None:
                    rows.append(row)
    return rows


def _export_row(
    pair: Pair,
    labs: list[Label],
    kind: str,
    campaign: str,
    users: dict[int, User],
    prob_a: float | None = None,
) -> dict[str, Any] | None:
    agg = aggregate([lab.answer for lab in labs], [lab.prob for lab in labs])
    if agg["skip"]:
        return None
    if prob_a is not None:  # reliability-weighted (Dawid-Skene posterior)
        agg["prob_a"] = prob_a
    a_wins = agg["prob_a"] >= 0.5
    chosen, rejected = (
        (pair.response_a, pair.response_b) if a_wins else (pair.response_b, pair.response_a)
    )
    prob = agg["prob_a"] if a_wins else 1 - agg["prob_a"]

    def name(uid: int) -> str:
        return users[uid].name if uid in users else str(uid)

    raters = [name(lab.rater_id) for lab in labs]
    votes = []
    for lab in labs:
        vote: dict[str, Any] = {"rater": name(lab.rater_id), "answer": lab.answer}
        attrs = users[lab.rater_id].attributes if lab.rater_id in users else None
        if attrs:
            vote["attributes"] = attrs
        for key in ("strength", "seconds", "comment"):
            if getattr(lab, key):
                vote[key] = getattr(lab, key)
        votes.append(vote)
    meta: dict[str, Any] = {
        "campaign": campaign,
        "pair_id": pair.id,
        "votes": agg["votes"],
        "raters": raters,
        "labels": votes,
        "flags": sorted({f for lab in labs for f in lab.flags}),
        "models": {
            "chosen": pair.source_a if a_wins else pair.source_b,
            "rejected": pair.source_b if a_wins else pair.source_a,
        },
    }
    if prob_a is not None:
        meta["aggregate"] = "reliability"
    principles = sorted({lab.principle for lab in labs if lab.principle})
    if principles:
        meta["principles"] = principles
    for key in ("criterion", "round", "selected_by"):  # from the pair's metadata (palate run)
        if pair.meta.get(key) is not None:
            meta[key] = pair.meta[key]
    return {
        "prompt": pair.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "prob_chosen": prob,
        "tie": bool(agg["tie"]),
        "rater_id": ",".join(raters),
        "source": kind,
        "metadata": meta,
    }
