"""Rater quality: how reliable each rater is, estimated from the labels themselves.

Three kinds of evidence, all per rater:

* **gold items** — pairs with a known answer (``Pair.gold``), mixed in unseen: accuracy on them;
* **a latent-class model** — Dawid & Skene (1979), "Maximum likelihood estimation of observer
  error-rates using the EM algorithm", fitted with Toloka's ``crowd-kit``: each rater gets a 2×2
  confusion matrix P(answer | true better response) from every overlapping label at once, gold
  items clamped to their known answer. ``reliability`` is the rater's expected accuracy under it;
  ``informativeness`` is Youden's J = P(a | a) + P(b | b) − 1: 1 for a perfect rater, 0 for
  one whose answer does not depend on the responses (random clicking, always the same side);
* **behaviour** — the share of answers that picked the response shown *first* (positions are
  shuffled per assignment, so a careful rater is near ½), and the share of labels given faster
  than the two responses can be read.

Flags (each with a threshold in :class:`QualitySettings`): ``random`` (uninformative, not by
side), ``opposite`` (answers against the consensus: another taste, or the buttons misread),
``one_side`` (nearly always the first or the second response shown), ``too_fast``.

A latent-class model assumes one truth: raters whose *taste* differs from the majority's look
unreliable to it. Where raters belong to populations, fit it within each
(:attr:`QualitySettings.within`) — measured: pooled over two groups with opposite length
tastes, one whole group was flagged; within groups, nobody.
Only a/b answers enter the model; ties and "both bad" say nothing about which side is better.

The posterior P(a ≻ b) per pair is the reliability-weighted label (:func:`weighted_votes`): a
rater's vote counts by the log-odds of their confusion matrix, so an uninformative rater's
votes count for nothing.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.config import Config
from palate.label.db import Assignment, Label, Pair, User
from palate.text import word_count

__all__ = [
    "LabelRow",
    "QualitySettings",
    "RaterQuality",
    "dawid_skene",
    "flagged_raters",
    "group_stats",
    "label_rows",
    "rater_quality",
    "weighted_votes",
]

FLAG_NAMES = ("random", "opposite", "one_side", "too_fast")


class QualitySettings(Config):
    """When a rater is flagged (dashboard, ``palate run``'s ``raters.quality``)."""

    min_labels: int = Field(
        20, ge=1, description="Labels (a/b answers) a rater needs before they can be flagged."
    )
    random_below: float = Field(
        0.2,
        description="Flag `random` when the rater's informativeness (Youden's J from the "
        "Dawid-Skene confusion matrix; 0 = answers independent of the responses) is below this.",
    )
    one_side_share: float = Field(
        0.9,
        gt=0.5,
        le=1,
        description="Flag `one_side` when at least this share of a rater's answers picked the "
        "response shown first (or this share picked the second).",
    )
    words_per_second: float = Field(
        15.0,
        gt=0,
        description="Fastest plausible reading (words of the prompt and both responses per "
        "second; skimming runs at ~10). A label faster than that was not read.",
    )
    within: str | None = Field(
        None,
        description="Fit the reliability model within each group of raters sharing this "
        "attribute (e.g. `group`, `region`): a population whose taste differs from the "
        "majority's is then not mistaken for careless raters. `palate run` with "
        "`raters.groups` uses `group`.",
    )
    too_fast_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Flag `too_fast` when at least this share of a rater's timed labels were "
        "given faster than `words_per_second` allows.",
    )


@dataclass(frozen=True)
class LabelRow:
    """One a/b/tie/both-bad label, with what the quality model needs."""

    pair_id: int
    rater: str
    answer: str  # in the pair's orientation: "a" = Pair.response_a better
    shown_first: bool | None  # the rater picked the response shown first (None: tie/both bad)
    seconds: float | None
    words: int  # words of the prompt and both responses
    gold: str | None = None


@dataclass
class RaterQuality:
    rater: str
    labels: int
    decided: int  # a/b answers
    gold_items: int = 0
    gold_accuracy: float | None = None
    reliability: float | None = None  # expected accuracy under the Dawid-Skene model
    informativeness: float | None = None  # Youden's J = P(a|a) + P(b|b) − 1
    first_share: float | None = None  # share of a/b answers that picked the first shown
    fast_share: float | None = None  # share of timed labels faster than reading
    median_seconds: float | None = None
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def label_rows(db: Session, campaign_ids: Collection[int]) -> list[LabelRow]:
    """Every label of these campaigns, with the order it was shown in and its reading load."""
    q = (
        select(Label, Assignment.swapped, Pair, User.name)
        .join(Assignment, Assignment.id == Label.assignment_id)
        .join(Pair, Pair.id == Label.pair_id)
        .join(User, User.id == Label.rater_id)
        .where(Pair.campaign_id.in_(list(campaign_ids) or [-1]))
        .order_by(Label.id)
    )
    rows = []
    words: dict[int, int] = {}
    for lab, swapped, pair, name in db.execute(q).all():
        if pair.id not in words:
            words[pair.id] = (
                word_count(pair.prompt) + word_count(pair.response_a) + word_count(pair.response_b)
            )
        first = None
        if lab.answer in ("a", "b"):
            first = (lab.answer == "a") != bool(swapped)
        rows.append(
            LabelRow(pair.id, name, lab.answer, first, lab.seconds, words[pair.id], pair.gold)
        )
    return rows


@dataclass
class DawidSkeneFit:
    posterior: dict[int, float]  # pair id → P(response_a is better)
    confusion: dict[str, tuple[float, float]]  # rater → (P(a | a better), P(b | b better))
    prior_a: float


def dawid_skene(rows: Sequence[LabelRow], n_iter: int = 100) -> DawidSkeneFit | None:
    """Fit Dawid-Skene (crowd-kit) on the a/b labels; gold items are clamped to their answer.
    None when there are no a/b labels."""
    decided = [r for r in rows if r.answer in ("a", "b")]
    if not decided:
        return None
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    data = pd.DataFrame(
        {
            "task": [r.pair_id for r in decided],
            "worker": [r.rater for r in decided],
            "label": [r.answer for r in decided],
        }
    )
    gold = {r.pair_id: r.gold for r in decided if r.gold in ("a", "b")}
    true = pd.Series(gold, dtype=object) if gold else None
    if len(set(data["label"])) < 2:  # one class only: the model has nothing to separate
        p = 1.0 if decided[0].answer == "a" else 0.0
        return DawidSkeneFit(
            {r.pair_id: p for r in decided}, {r.rater: (0.5, 0.5) for r in decided}, p
        )
    with warnings.catch_warnings():  # crowd-kit 1.4 uses keywords pandas 3 deprecates
        warnings.simplefilter("ignore")
        ds = DawidSkene(n_iter=n_iter).fit(data, true_labels=true)
    probas: Any = ds.probas_
    posterior = {int(t): float(p) for t, p in zip(probas.index, probas["a"], strict=True)}
    errors: Any = ds.errors_  # rows (worker, answer), columns: true label
    confusion = {}
    for worker in sorted(set(data["worker"])):
        aa = float(errors.loc[(worker, "a"), "a"]) if (worker, "a") in errors.index else 0.0
        bb = float(errors.loc[(worker, "b"), "b"]) if (worker, "b") in errors.index else 0.0
        confusion[worker] = (aa, bb)
    priors: Any = ds.priors_
    return DawidSkeneFit(posterior, confusion, float(priors.get("a", 0.5)))


def rater_quality(
    rows: Sequence[LabelRow],
    settings: QualitySettings | None = None,
    attributes: dict[str, dict[str, str]] | None = None,
) -> dict[str, RaterQuality]:
    """Per rater: gold accuracy, Dawid-Skene reliability and informativeness, side and speed
    shares, and flags (``opposite``: answers mostly against the others' consensus — a
    different taste, or the buttons read the wrong way round). With ``settings.within``, the
    model is fitted per group of raters sharing that attribute (``attributes``: rater name →
    attributes)."""
    s = settings or QualitySettings()
    if s.within and attributes:
        group_of = {r: a.get(s.within) for r, a in attributes.items()}
        out: dict[str, RaterQuality] = {}
        for g in sorted({group_of.get(r.rater) for r in rows}, key=str):
            mine = [r for r in rows if group_of.get(r.rater) == g]
            out.update(rater_quality(mine, s.model_copy(update={"within": None})))
        return out
    fit = dawid_skene(rows)
    out = {}
    for rater in sorted({r.rater for r in rows}):
        mine = [r for r in rows if r.rater == rater]
        decided = [r for r in mine if r.answer in ("a", "b")]
        q = RaterQuality(rater, len(mine), len(decided))
        gold = [r for r in mine if r.gold is not None]
        q.gold_items = len(gold)
        if gold:
            q.gold_accuracy = sum(r.answer == r.gold for r in gold) / len(gold)
        if fit is not None and rater in fit.confusion:
            aa, bb = fit.confusion[rater]
            q.reliability = fit.prior_a * aa + (1 - fit.prior_a) * bb
            q.informativeness = aa + bb - 1
        if decided:
            q.first_share = sum(bool(r.shown_first) for r in decided) / len(decided)
        timed = [r for r in mine if r.seconds is not None]
        if timed:
            q.median_seconds = statistics.median(r.seconds for r in timed if r.seconds is not None)
            fast = sum(
                r.seconds is not None and r.seconds * s.words_per_second < r.words for r in timed
            )
            q.fast_share = fast / len(timed)
        if len(decided) >= s.min_labels:
            one_side = q.first_share is not None and max(q.first_share, 1 - q.first_share) >= (
                s.one_side_share
            )
            if one_side:
                q.flags.append("one_side")
            elif q.informativeness is not None and q.informativeness <= -s.random_below:
                q.flags.append("opposite")
            elif q.informativeness is not None and q.informativeness < s.random_below:
                q.flags.append("random")
        if len(timed) >= s.min_labels and (q.fast_share or 0) >= s.too_fast_share:
            q.flags.append("too_fast")
        out[rater] = q
    return out


def rater_attributes(db: Session) -> dict[str, dict[str, str]]:
    """Every user's attributes by name."""
    return {u.name: dict(u.attributes or {}) for u in db.scalars(select(User))}


def flagged_raters(
    db: Session, campaign_ids: Collection[int], settings: QualitySettings | None = None
) -> list[str]:
    """Names of the raters these campaigns' labels flag (any flag)."""
    quality = rater_quality(label_rows(db, campaign_ids), settings, rater_attributes(db))
    return sorted(name for name, q in quality.items() if q.flags)


def weighted_votes(rows: Sequence[LabelRow], drop: Collection[str] = ()) -> dict[int, float]:
    """Pair id → P(response_a better) from the Dawid-Skene posterior: each rater's vote weighted
    by how reliable the model finds them. Raters in ``drop`` are left out first (pairs only they
    labelled are left out too)."""
    fit = dawid_skene([r for r in rows if r.rater not in drop])
    return {} if fit is None else fit.posterior


def group_stats(
    rows: Sequence[LabelRow], attributes: dict[str, dict[str, str]], top: int = 5
) -> dict[str, Any]:
    """Rater populations, for each attribute an admin set (``region``, ``language``, ...):
    per group its raters, labels and agreement within the group; agreement between every two
    groups (labels of one against labels of the other on the same pair); each group's
    preference P(a) on the pairs both labelled, and the ``top`` pairs where they differ most.
    Only a/b answers count."""
    decided = [r for r in rows if r.answer in ("a", "b")]
    out: dict[str, Any] = {}
    keys = sorted({k for attrs in attributes.values() for k in attrs})
    for key in keys:
        group_of = {r: a[key] for r, a in attributes.items() if key in a}
        values = sorted(set(group_of.values()))
        by_pair: dict[int, dict[str, list[str]]] = {}
        for r in decided:
            g = group_of.get(r.rater)
            if g is not None:
                by_pair.setdefault(r.pair_id, {}).setdefault(g, []).append(r.answer)

        def agreement(x: list[str], y: list[str] | None = None) -> tuple[int, int]:
            if y is None:
                n = len(x)
                same = sum(x[i] == x[j] for i in range(n) for j in range(i + 1, n))
                return same, n * (n - 1) // 2
            return sum(u == v for u in x for v in y), len(x) * len(y)

        groups = {}
        for g in values:
            hit = tot = labels = 0
            for votes in by_pair.values():
                mine = votes.get(g, [])
                labels += len(mine)
                same, n_pairs = agreement(mine)
                hit, tot = hit + same, tot + n_pairs
            groups[g] = {
                "raters": sorted(r for r, v in group_of.items() if v == g),
                "labels": labels,
                "agreement_within": hit / tot if tot else None,
            }
        between = []
        for i, g in enumerate(values):
            for h in values[i + 1 :]:
                hit = tot = 0
                gaps = []
                for pid, votes in by_pair.items():
                    if g in votes and h in votes:
                        s, t = agreement(votes[g], votes[h])
                        hit, tot = hit + s, tot + t
                        pg = votes[g].count("a") / len(votes[g])
                        ph = votes[h].count("a") / len(votes[h])
                        gaps.append((abs(pg - ph), pid, pg, ph))
                gaps.sort(key=lambda x: (-x[0], x[1]))
                between.append(
                    {
                        "groups": [g, h],
                        "shared_pairs": len(gaps),
                        "agreement": hit / tot if tot else None,
                        "mean_gap": sum(x[0] for x in gaps) / len(gaps) if gaps else None,
                        "most_disputed": [
                            {"pair_id": pid, "p_a": {g: pg, h: ph}, "gap": gap}
                            for gap, pid, pg, ph in gaps[:top]
                        ],
                    }
                )
        out[key] = {"groups": groups, "between": between}
    return out
