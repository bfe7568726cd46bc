"""``palate judge``: an AI judge labels a campaign (as rater ``ai:<model>``) or a file, and —
where people already labelled the pairs — reports how well it agrees with them.

Quality (:func:`judge_quality`): agreement with the human label with position debiasing (both
orders averaged) and without it (one order per pair, drawn by a seeded coin as a rater would see
it), per principle, each with a percentile-bootstrap 95% interval; *position consistency*, the
share of pairs where the judge prefers the same response in both orders; and the share of
single-order answers that pick the first position (0.5 for an unbiased judge).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from sqlalchemy import select

from palate.data import atomic_write, iter_rows, prompt_json, read_records, write_jsonl
from palate.errors import ConfigError
from palate.eval.stats import win_rate
from palate.feedback.config import JudgeSettings
from palate.feedback.judge import Judge, Verdict, load_judge
from palate.label.campaign import parse_pairs
from palate.label.db import Assignment, Campaign, Pair, User, open_db
from palate.label.store import LabelIn, create_user, flip, next_assignment, submit_label

__all__ = ["JudgeConfig", "judge", "judge_quality", "label_campaign"]


def _answer(prob_a: float, tie_band: float, answers: list[str]) -> str:
    if "tie" in answers and abs(prob_a - 0.5) < tie_band:
        return "tie"
    return "a" if prob_a >= 0.5 else "b"


def label_campaign(
    db_url: str, campaign: str, judge: Judge, *, tie_band: float = 0.0
) -> dict[str, Any]:
    """Label ``campaign`` with the judge through the store's assignment path (as simulated and
    human raters do): user ``judge.name`` (kind ai) is created if missing; every pair it has not
    labelled is judged in one batch, then labelled assignment by assignment, each label with
    its soft label and principle."""

    factory = open_db(db_url)
    start = time.monotonic()
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == campaign))
        if camp is None:
            raise ConfigError(f"{db_url}: no campaign named {campaign!r}")
        user = db.scalar(select(User).where(User.name == judge.name))
        if user is None:
            user = create_user(db, judge.name, kind="ai")[0]
            db.commit()
        elif user.kind != "ai":
            raise ConfigError(f"user {judge.name!r} exists and is not an AI rater")
        seen = select(Assignment.pair_id).where(
            Assignment.rater_id == user.id, Assignment.status == "done"
        )
        pairs = list(
            db.scalars(
                select(Pair)
                .where(Pair.campaign_id == camp.id, Pair.id.not_in(seen))
                .order_by(Pair.id)
            )
        )
        verdicts = dict(
            zip(
                [p.id for p in pairs],
                judge.compare([(p.prompt, p.response_a, p.response_b) for p in pairs]),
                strict=True,
            )
        )
        rng = random.Random(0)
        n = 0
        while (a := next_assignment(db, camp, user, rng)) is not None:
            v = verdicts.get(a.pair_id)
            if v is None:  # a pair it had seen (skipped or expired) came back: judge it now
                pair = db.get(Pair, a.pair_id)
                assert pair is not None
                v = judge.compare([(pair.prompt, pair.response_a, pair.response_b)])[0]
            answer = _answer(v.prob_a, tie_band, list(camp.answers))
            shown_prob = 1 - v.prob_a if a.swapped else v.prob_a
            label = LabelIn(answer=flip(answer, a.swapped), prob=shown_prob, principle=v.principle)
            submit_label(db, a, user, label)
            n += 1
    return {
        "campaign": campaign,
        "rater": judge.name,
        "labels": n,
        "minutes": (time.monotonic() - start) / 60,
    }


def judge_quality(
    verdicts: list[Verdict], *, seed: int = 0, resamples: int = 2000
) -> dict[str, Any]:
    """How often the judge agrees with people, for verdicts on pairs (a = the human-preferred
    response, b = the other). Needs both orders judged."""
    if not verdicts or verdicts[0].first_b is None:
        raise ConfigError("judge quality needs both orders judged (both_orders: true)")

    def agreement(probs: list[float]) -> dict[str, float]:
        return win_rate(probs, [0.5] * len(probs), seed=seed, resamples=resamples)

    coin = random.Random(seed)
    single, first_pick = [], 0
    for v in verdicts:
        assert v.first_b is not None
        if coin.random() < 0.5:  # human-preferred response shown first
            single.append(v.first_a)
            first_pick += v.first_a >= 0.5
        else:
            single.append(1 - v.first_b)
            first_pick += v.first_b >= 0.5
    per: dict[str, list[float]] = {}
    for v in verdicts:
        for name, p in v.per_principle.items():
            per.setdefault(name, []).append(p)
    consistent = [bool(v.consistent) for v in verdicts]
    return {
        "pairs": len(verdicts),
        "agreement_debiased": agreement([v.prob_a for v in verdicts]),
        "agreement_single_order": agreement(single),
        "position_consistency": sum(consistent) / len(consistent),
        "first_position_rate": first_pick / len(verdicts),
        "mean_soft_label": sum(v.prob_a for v in verdicts) / len(verdicts),
        "per_principle": {name: agreement(ps) for name, ps in sorted(per.items())},
    }


class JudgeConfig(JudgeSettings):
    """Config for ``palate judge``: the judge's settings plus what it labels."""

    pairs: str | None = Field(
        None,
        description="A pairs JSONL (prompt, response_a, response_b) or comparisons file "
        "(chosen/rejected, also HH-RLHF transcripts: then the judge is also scored against "
        "the human label).",
    )
    limit: int | None = Field(None, ge=1, description="Judge only the first N rows of `pairs`.")
    output: str | None = Field(
        None, description="pairs mode: comparisons JSONL to write (source: ai)."
    )
    db: str | None = Field(None, description="Or: a labels database URL / SQLite path ...")
    campaign: str | None = Field(None, description="... and the campaign to label in it.")
    report: str | None = Field(
        None, description="Write the quality report (JSON) here (pairs mode, human-labelled)."
    )

    @model_validator(mode="after")
    def _one_input(self) -> JudgeConfig:
        if (self.pairs is None) == (self.db is None or self.campaign is None):
            raise ValueError("set either pairs (a file) or db and campaign")
        if self.pairs is not None and self.output is None and self.report is None:
            raise ValueError("pairs mode: set output (labelled comparisons) and/or report")
        return self


def _read_file_pairs(cfg: JudgeConfig) -> tuple[list[tuple[Any, str, str]], bool]:
    """(prompt, a, b) triples and whether a is a human's preferred response."""

    assert cfg.pairs is not None
    path = Path(cfg.pairs)
    if not path.is_file():
        raise ConfigError(f"{path}: pairs file not found")
    first = next((line for _, line in iter_rows(path)), None)
    if first is None:
        raise ConfigError(f"{path}: empty")
    try:
        row = json.loads(first)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:1: not JSON ({err.msg})") from None
    if isinstance(row, dict) and {"chosen", "rejected"} <= set(row):  # human-labelled
        records = read_records(path, "comparisons").records[: cfg.limit]
        return [(prompt_json(r.prompt), r.chosen, r.rejected) for r in records], True
    pairs = parse_pairs(path.read_text(), str(path))[: cfg.limit]
    return [(p.prompt, p.response_a, p.response_b) for p in pairs], False


def judge(cfg: JudgeConfig) -> dict[str, Any]:
    """``palate judge``: label a campaign, or a file (with a quality report when the file's
    pairs carry human labels)."""
    j = load_judge(cfg)
    if cfg.db is not None and cfg.campaign is not None:
        return {"stage": "judge", **label_campaign(cfg.db, cfg.campaign, j, tie_band=cfg.tie_band)}
    triples, human = _read_file_pairs(cfg)
    start = time.monotonic()
    verdicts = j.compare(triples)
    minutes = (time.monotonic() - start) / 60
    summary: dict[str, Any] = {
        "stage": "judge",
        "judge": j.name,
        "pairs": len(triples),
        "minutes": minutes,
    }
    if cfg.output:
        rows = []
        for (prompt, a, b), v in zip(triples, verdicts, strict=True):
            a_wins = v.prob_a >= 0.5
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": a if a_wins else b,
                    "rejected": b if a_wins else a,
                    "prob_chosen": v.prob_a if a_wins else 1 - v.prob_a,
                    "rater_id": j.name,
                    "source": "ai",
                    "metadata": {
                        "principles": v.principles,
                        "position_consistent": v.consistent,
                        **({"agrees_with_human": a_wins} if human else {}),
                    },
                }
            )
        write_jsonl(cfg.output, rows)
        summary["output"] = cfg.output
    if human:
        quality = judge_quality(verdicts, seed=cfg.seed)
        summary["quality"] = quality
        if cfg.report:
            with atomic_write(cfg.report) as f:
                json.dump({"judge": j.name, "minutes": minutes, **quality}, f, indent=2)
            summary["report"] = cfg.report
    elif cfg.report:
        raise ConfigError(f"{cfg.pairs}: a quality report needs human-labelled comparisons")
    return summary
