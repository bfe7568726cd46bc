"""``palate eval``'s report: win rates per policy and judge (with length-controlled ones),
judge-free numbers, lengths, and answers side by side. The markup is ``templates/eval.html``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import palate.report.plots as plots
import palate.report.sections as sections
from palate.report.render import write_page

__all__ = ["JUDGE_LABELS", "STAT_LABELS", "build_eval_report"]

JUDGE_LABELS = {
    "reward_model": "reward model",
    "gold": "gold",
    "ai": "AI judge",
    "people": "people",
}
STAT_LABELS = [
    ("kl", "KL to the reference (nats)"),
    ("length", "length (tokens)"),
    ("eos_rate", "ends with EOS"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repetition", "repeated trigrams"),
    ("refusal_rate", "refusals"),
]


def build_eval_report(
    path: str | Path,
    *,
    summary: dict[str, Any],
    lengths: Mapping[str, Sequence[int]],
    samples: Sequence[dict[str, Any]] = (),
    title: str = "palate eval",
) -> Path:
    """``palate eval``'s report: win rates per policy and judge (with length-controlled ones),
    judge-free numbers, lengths, and answers side by side; written atomically."""
    policies: dict[str, Any] = summary.get("policies", {})
    judges = judge_order(policies)
    return write_page(
        path,
        "eval.html",
        title=title,
        source={
            "prompts": summary.get("prompts", 0),
            "file": str(summary.get("prompts_file", "")),
            "baseline": str(summary.get("baseline", {}).get("spec", "")),
            "reference": str(summary.get("reference", "")),
        },
        people=summary.get("people") or None,
        judges=[JUDGE_LABELS.get(j, j) for j in judges],
        wins=win_rates(policies, judges),
        wins_plot=plots.eval_win_rates(win_rate_points(policies)),
        stats=judge_free(summary, judges),
        overopt=sections.overopt(summary.get("overopt")),
        lengths=plots.eval_lengths(lengths),
        samples=side_by_side(samples, list(policies)),
    )


def judge_order(policies: Mapping[str, Any]) -> list[str]:
    """Every judge any policy has, the known ones first in ``JUDGE_LABELS``' order."""
    return sorted(
        {j for p in policies.values() for j in p["judges"]},
        key=lambda j: list(JUDGE_LABELS).index(j) if j in JUDGE_LABELS else 99,
    )


def win_rates(policies: Mapping[str, Any], judges: Sequence[str]) -> list[dict[str, Any]]:
    """Per policy, per judge: win rate, interval, n (people only) and the length-controlled rate
    with its interval; ``None`` for a judge with no result yet (pending)."""
    rows = []
    for name, p in policies.items():
        cells: list[dict[str, Any] | None] = []
        for j in judges:
            r = p["judges"].get(j, {})
            if "win_rate" not in r:
                cells.append(None)
                continue
            lc = (r["lc_win_rate"], r["lc_low"], r["lc_high"]) if "lc_win_rate" in r else None
            cells.append(
                {
                    "win": r["win_rate"],
                    "ci": (r["low"], r["high"]),
                    "people": j == "people",  # only people's win rates show their n
                    "n": r["n"] if j == "people" else None,
                    "lc": lc,
                }
            )
        rows.append({"name": name, "cells": cells})
    return rows


def win_rate_points(policies: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The win-rate plot's rows: ("policy · judge", result) for every judged pair."""
    return [
        (f"{name} · {JUDGE_LABELS.get(j, j)}", r)
        for name, p in policies.items()
        for j, r in p["judges"].items()
        if "win_rate" in r
    ]


def judge_free(summary: Mapping[str, Any], judges: Sequence[str]) -> dict[str, Any]:
    """The baseline and every policy side by side: KL, length, EOS, diversity, refusals, and
    the mean reward-model and gold scores."""
    policies: Mapping[str, Any] = summary.get("policies", {})
    sides = {"baseline": summary.get("baseline", {}), **policies}
    rows = [
        {"label": label, "cells": [v.get(key) for v in sides.values()]}
        for key, label in STAT_LABELS
        if any(key in v for v in sides.values())
    ]
    for j in judges:
        if j in ("reward_model", "gold"):
            first = next(p["judges"][j] for p in policies.values() if j in p["judges"])
            means = [p["judges"].get(j, {}).get("mean") for p in policies.values()]
            rows.append(
                {
                    "label": f"mean {JUDGE_LABELS[j]} score",
                    "cells": [first.get("baseline_mean"), *means],
                }
            )
    return {"names": list(sides), "rows": rows}


def side_by_side(
    samples: Sequence[Mapping[str, Any]], names: Sequence[str], limit: int = 6
) -> list[dict[str, Any]]:
    """The baseline's and each policy's answer to the same prompts."""
    return [
        {
            "prompt": sections.prompt_text(s.get("prompt")),
            "cells": [{"who": n, "text": str(s.get(n, ""))} for n in ("baseline", *names)],
        }
        for s in samples[:limit]
    ]
