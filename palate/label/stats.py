"""Dashboard numbers: progress, speed, agreement (Krippendorff's alpha via ``krippendorff``),
each rater's agreement with the majority, gold accuracy, reliability and quality flags
(:mod:`palate.label.quality`), and rater populations (agreement within and between groups)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any

import krippendorff
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.label.db import ANSWERS, Campaign, Label, Pair, User
from palate.label.quality import QualitySettings, group_stats, label_rows, rater_quality


def campaign_stats(
    db: Session, campaign: Campaign, quality: QualitySettings | None = None
) -> dict[str, Any]:
    pairs = {p.id: p for p in db.scalars(select(Pair).where(Pair.campaign_id == campaign.id))}
    labels = list(db.scalars(select(Label).where(Label.pair_id.in_(list(pairs) or [-1]))))
    users = list(db.scalars(select(User)))
    names = {u.id: u.name for u in users}
    kinds = {u.id: u.kind for u in users}
    by_pair: dict[int, list[Label]] = defaultdict(list)
    for lab in labels:
        by_pair[lab.pair_id].append(lab)

    agreement = pairwise_agreement(by_pair)
    raters = sorted({lab.rater_id for lab in labels})
    alpha = krippendorff_alpha(by_pair, raters)

    # per rater: labels, median seconds, agreement with the majority of the others, gold accuracy
    per_rater = {r: rater_row(r, labels, by_pair, pairs, names, kinds) for r in raters}
    rows = label_rows(db, [campaign.id])
    attributes = {u.name: dict(u.attributes or {}) for u in users}
    for r, q in zip(raters, _quality(rows, names, raters, quality, attributes), strict=True):
        per_rater[r].update(q)
        per_rater[r]["attributes"] = attributes.get(names.get(r, ""), {})
    secs_all = [lab.seconds for lab in labels if lab.seconds is not None]
    return {
        "campaign": campaign.name,
        "pairs": len(pairs),
        "labels": len(labels),
        "target": len(pairs) * campaign.overlap,
        "complete_pairs": sum(len(by_pair[p]) >= campaign.overlap for p in pairs),
        "median_seconds": statistics.median(secs_all) if secs_all else None,
        "pairwise_agreement": agreement,
        "krippendorff_alpha": alpha,
        "answers": dict(Counter(lab.answer for lab in labels)),
        "flags": dict(Counter(f for lab in labels for f in lab.flags)),
        "raters": list(per_rater.values()),
        "flagged": sorted(q["rater"] for q in per_rater.values() if q.get("quality_flags")),
        "populations": group_stats(
            rows, {names[r]: attributes.get(names[r], {}) for r in raters if r in names}
        ),
        "sources": source_stats(by_pair, kinds),
        "ai_vs_human": ai_vs_human(by_pair, kinds),
    }


def pairwise_agreement(by_pair: dict[int, list[Label]]) -> float | None:
    """Pairwise % agreement over the pairs with at least two labels."""
    agree = total = 0
    for labs in by_pair.values():
        for x, y in combinations(labs, 2):
            total += 1
            agree += x.answer == y.answer
    return agree / total if total else None


def krippendorff_alpha(by_pair: dict[int, list[Label]], raters: list[int]) -> float | None:
    """Krippendorff's alpha (nominal) over raters × pairs with at least two labels (NaN where
    a rater did not label a pair); None when it is undefined."""
    multi = [pid for pid, labs in by_pair.items() if len(labs) >= 2]
    if len(raters) < 2 or not multi:
        return None
    code: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
    data = np.full((len(raters), len(multi)), np.nan)
    r_index = {r: i for i, r in enumerate(raters)}
    for j, pid in enumerate(multi):
        for lab in by_pair[pid]:
            data[r_index[lab.rater_id], j] = code[lab.answer]
    if len({v for v in data.flatten() if not np.isnan(v)}) <= 1:
        return None
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def rater_row(
    r: int,
    labels: list[Label],
    by_pair: dict[int, list[Label]],
    pairs: dict[int, Pair],
    names: dict[int, str],
    kinds: dict[int, str],
) -> dict[str, Any]:
    """One rater's labels, median seconds, agreement with the majority of the others and gold
    accuracy."""
    mine = [lab for lab in labels if lab.rater_id == r]
    secs = [lab.seconds for lab in mine if lab.seconds is not None]
    maj_hits = maj_n = gold_hits = gold_n = 0
    for lab in mine:
        others = [o.answer for o in by_pair[lab.pair_id] if o.rater_id != r]
        if others:
            top, count = Counter(others).most_common(1)[0]
            if count > len(others) / 2:
                maj_n += 1
                maj_hits += lab.answer == top
        gold = pairs[lab.pair_id].gold
        if gold is not None:
            gold_n += 1
            gold_hits += lab.answer == gold
    return {
        "rater": names.get(r, str(r)),
        "kind": kinds.get(r, "human"),
        "labels": len(mine),
        "median_seconds": statistics.median(secs) if secs else None,
        "majority_agreement": maj_hits / maj_n if maj_n else None,
        "gold_accuracy": gold_hits / gold_n if gold_n else None,
    }


def _agreement(labs: list[Label]) -> tuple[int, int]:
    pairs = list(combinations(labs, 2))
    return sum(x.answer == y.answer for x, y in pairs), len(pairs)


def source_stats(by_pair: dict[int, list[Label]], kinds: dict[int, str]) -> dict[str, Any]:
    """Per label source (human, ai, simulated): labels and pairwise agreement within it."""
    out: dict[str, Any] = {}
    for kind in sorted({kinds.get(lab.rater_id, "human") for v in by_pair.values() for lab in v}):
        agree = total = n = 0
        for labs in by_pair.values():
            mine = [lab for lab in labs if kinds.get(lab.rater_id, "human") == kind]
            n += len(mine)
            a, t = _agreement(mine)
            agree, total = agree + a, total + t
        out[kind] = {"labels": n, "pairwise_agreement": agree / total if total else None}
    return out


def ai_vs_human(by_pair: dict[int, list[Label]], kinds: dict[int, str]) -> dict[str, Any]:
    """On pairs both an AI judge and people labelled (a or b): how often the judge's answer
    matches the people's majority (pairs where people tie are left out)."""
    hits = n = 0
    for labs in by_pair.values():
        human = Counter(
            lab.answer
            for lab in labs
            if kinds.get(lab.rater_id, "human") == "human" and lab.answer in ("a", "b")
        )
        ai = [lab.answer for lab in labs if kinds.get(lab.rater_id) == "ai"]
        if not human or not ai or human["a"] == human["b"]:
            continue
        majority = "a" if human["a"] > human["b"] else "b"
        for answer in ai:
            n += 1
            hits += answer == majority
    return {"pairs": n, "agreement": hits / n if n else None}


def _quality(
    rows: list[Any],
    names: dict[int, str],
    raters: list[int],
    settings: QualitySettings | None,
    attributes: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    """Per rater (in ``raters``' order): Dawid-Skene reliability, informativeness, first-shown
    share, too-fast share, quality flags."""
    if not rows:
        return [{} for _ in raters]
    quality = rater_quality(rows, settings, attributes)
    keys = ("reliability", "informativeness", "first_share", "fast_share")
    out = []
    for r in raters:
        q = quality.get(names.get(r, str(r)))
        d = {k: getattr(q, k) for k in keys} if q else {}
        d["quality_flags"] = list(q.flags) if q else []
        out.append(d)
    return out
