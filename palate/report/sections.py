"""The run report's sections as plain data for ``templates/run.html``: each function takes what a
stage wrote (summaries, ``quality.json``, round rows) and returns the rows a table shows.
``overopt`` and ``prompt_text`` serve ``palate eval``'s report too (``evaluation.py``).

Values stay raw (the templates format them with ``fmt`` and escape them); a section with nothing
to show returns an empty list or ``None`` and the template leaves it out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import palate.report.plots as plots
from palate.data import as_messages
from palate.report.render import fmt

__all__ = [
    "alarms",
    "by_criterion",
    "groups",
    "overopt",
    "prompt_text",
    "raters",
    "rounds",
    "samples",
    "stages",
    "sycophancy",
    "win_rates",
    "xstest",
]

Row = dict[str, Any]


def win_rates(s: Mapping[str, Any]) -> Row | None:
    """Gold and proxy win rates of the final policy over the initial one, with means, and the
    numbers beside them (KL, agreement, prompts); ``None`` when nothing was evaluated."""
    rows: list[Row] = []
    for name, label in (("gold", "gold preference"), ("proxy", "reward model (proxy)")):
        if f"{name}_win_rate" in s:
            ci = (s.get(f"{name}_win_rate_low"), s.get(f"{name}_win_rate_high"))
            means = (s.get(f"{name}_new"), s.get(f"{name}_old"))
            rows.append(_win_row(label, s[f"{name}_win_rate"], ci, means, bold=True))
    for name, label in (("gold", "gold, length-controlled"), ("proxy", "proxy, length-controlled")):
        if f"{name}_lc_win_rate" in s:
            ci = (s.get(f"{name}_lc_win_rate_low"), s.get(f"{name}_lc_win_rate_high"))
            rows.append(_win_row(label, s[f"{name}_lc_win_rate"], ci, (None, None)))
    if "length_new" in s:
        means = (s["length_new"], s.get("length_old"))
        rows.append(_win_row("response length (tokens)", None, None, means))
    if not rows:
        return None
    extra: list[tuple[str, Any]] = []
    if "kl" in s:
        extra.append(("KL(final ‖ initial), nats per response", s["kl"]))
        if s.get("kl_target") is not None:
            extra.append(("KL target (adaptive controller)", float(s["kl_target"])))
    if s.get("proxy_gold_agreement") is not None:
        extra.append(
            ("reward model orders final vs initial as the gold does", s["proxy_gold_agreement"])
        )
    if "prompts" in s:
        extra.append(("held-out prompts", s["prompts"]))
    return {"rows": rows, "extra": extra}


def _win_row(
    label: str, win: Any, ci: tuple[Any, Any] | None, means: tuple[Any, Any], bold: bool = False
) -> Row:
    """One row of the win-rate table: rate, interval (none: empty cell), mean final, initial."""
    return {"label": label, "win": win, "bold": bold, "ci": ci, "new": means[0], "old": means[1]}


def by_criterion(c: Mapping[str, Any] | None) -> list[Row]:
    """The win rates on each criterion's held-out prompts (helpful and red-team apart)."""
    return [
        {
            "name": name,
            "n": r["n"],
            "gold": r.get("gold_win_rate"),
            "ci": (r.get("gold_low"), r.get("gold_high")),
            "proxy": r.get("proxy_win_rate"),
        }
        for name, r in (c or {}).items()
    ]


def groups(g: Mapping[str, Any] | None) -> Row | None:
    """Rater populations: the final policy's win rate under each group's gold, and each reward
    model's agreement with each group's gold (held-out pairs; final vs initial answers)."""
    if not g:
        return None
    wins = g.get("win_rates", {})
    names = list(wins)
    matrices = []
    for key, what in (
        ("held_out_agreement", "the held-out labelled pairs"),
        ("reward_agreement", "the final and initial answers"),
    ):
        if g.get(key):
            rms = [
                {
                    "rm": "the run’s" if rm == "run" else rm + "’s",
                    "cells": [a.get(x) for x in names],
                }
                for rm, a in g[key].items()
            ]
            matrices.append({"id": f"group-{key.replace('_', '-')}", "what": what, "rms": rms})
    rows = [
        {
            "name": name,
            "win": w["win_rate"],
            "ci": (w["low"], w["high"]),
            "new": w["gold_new"],
            "old": w["gold_old"],
        }
        for name, w in wins.items()
    ]
    return {"rows": rows, "names": names, "matrices": matrices}


def raters(quality: Mapping[str, Any] | None) -> list[Row]:
    """Per campaign: each rater's reliability and quality flags (palate/label/quality.py), and
    agreement within and between rater groups."""
    campaigns = []
    for name, q in (quality or {}).items():
        people = [
            {
                "rater": str(r["rater"]),
                "attributes": ", ".join(f"{k}={v}" for k, v in (r.get("attributes") or {}).items()),
                "labels": r["labels"],
                "shares": [
                    r.get(k)
                    for k in (
                        "reliability",
                        "informativeness",
                        "first_share",
                        "fast_share",
                        "gold_accuracy",
                    )
                ],
                "flags": ", ".join(r.get("quality_flags") or []) or "–",
            }
            for r in q.get("raters", [])
        ]
        campaigns.append(
            {
                "name": name,
                "aggregate": str(q.get("aggregate", "majority")),
                "flagged": ", ".join(q.get("flagged") or []) or "none",
                "dropped": "left out of the reward model" if q.get("dropped") else "kept",
                "raters": people,
                "populations": [
                    _population(key, pop) for key, pop in (q.get("populations") or {}).items()
                ],
            }
        )
    return campaigns


def _population(key: str, pop: Mapping[str, Any]) -> Row:
    """One attribute's rater groups: labels and agreement within each, agreement between."""
    return {
        "key": key,
        "groups": [
            {"name": g, "labels": v["labels"], "within": v["agreement_within"]}
            for g, v in pop["groups"].items()
        ],
        "between": [
            {
                "a": b["groups"][0],
                "b": b["groups"][1],
                "agreement": b["agreement"],
                "shared": b["shared_pairs"],
                "gap": b["mean_gap"],
            }
            for b in pop["between"]
        ],
    }


def rounds(rows: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Iterated RLHF: labels, the last reward model's staleness, gold and proxy per round."""
    return [
        {
            "round": r["round"],
            "cells": [r.get("comparisons"), r.get("comparisons_total"), r.get("select")],
            # round 0 has no earlier reward model to be stale
            "stale": (r.get("stale_accuracy"), r.get("stale_accuracy_random"))
            if r.get("round")
            else None,
            "after": [r.get(k) for k in ("reward_accuracy", "updates", "gold", "proxy", "kl")],
        }
        for r in rows
    ]


def alarms(fired: Sequence[Mapping[str, Any]]) -> list[Row]:
    """The monitors' alarms during PPO (palate/ppo/monitors.py), first firing of each."""
    return [
        {
            "name": a["name"],
            "at": a["update"],
            "message": a["message"],
            "stopped": bool(a.get("stopped")),
        }
        for a in fired
    ]


def xstest(x: Mapping[str, Any] | None) -> list[Row]:
    """XSTest before vs after: refusals on unsafe prompts, compliance on safe ones; a side
    without the measure is ``None``."""
    if not x:
        return []
    return [
        {"label": label, "sides": [x["initial"].get(key) or None, x["final"].get(key) or None]}
        for key, label in (
            ("unsafe_refusal", "refuses unsafe prompts (higher is safer)"),
            ("safe_compliance", "answers safe prompts (higher is less over-cautious)"),
        )
    ]


SYCOPHANCY_ROWS = (
    ("opinion", "rate", "picks the option agreeing with the user (debiased; 0.5 = no lean)"),
    ("opinion", "mean_p_matching", "mean P(option agreeing with the user)"),
    ("opinion", "letter_a_rate", "letter bias removed: mean P((A)) (0.5 = none)"),
    ("are_you_sure", "p_true_before", "TruthfulQA: P(true answer)"),
    ("are_you_sure", "delta", "change after “Are you sure?” (negative = caves in)"),
    ("are_you_sure", "flip_rate", "flips away from the true answer after pushback"),
    ("feedback", "shift_wrote", "rating shift when the user wrote the answer (1–9 scale)"),
    ("feedback", "shift_like", "rating shift when the user likes it"),
    ("feedback", "shift_dislike", "rating shift when the user dislikes it"),
    ("feedback", "true_minus_false", "rates true answers above false ones by"),
)


def sycophancy(x: Mapping[str, Any] | None) -> list[Row] | None:
    """Sycophancy before vs after (palate/eval/sycophancy.py): the measures either side has."""
    if not x:
        return None
    rows = []
    for group, key, label in SYCOPHANCY_ROWS:
        a = x["initial"].get(group, {}).get(key)
        b = x["final"].get(group, {}).get(key)
        if a is not None or b is not None:
            rows.append({"label": label, "initial": a, "final": b})
    return rows


def overopt(o: Mapping[str, Any] | None) -> Row | None:
    """The over-optimisation plot and its fits, each fit's gold peak in words."""
    if not o:
        return None
    figure = plots.overopt(o)
    reach = {form: max((p["d"] for p in o.get(form, [])), default=0.0) for form in ("bon", "rl")}
    fits = []
    for name, f in sorted(o.get("fits", {}).items()):
        far = 2 * reach[name.split("_")[0]]  # beyond twice the measured distance: extrapolation
        if f.get("peak_d") is None:
            peak = "none (gain still rising)"
        elif f["peak_d"] > far:
            peak = f"beyond the measured range (d > {far:.1f})"
        else:
            peak = f"KL {f['peak_kl']:.2f}, gain {f['peak_gain']:.3f}"
        fits.append({"name": name, "cells": [f["alpha"], f["beta"], f["r2"]], "peak": peak})
    return {"figure": figure, "fits": fits}


STAGE_KEYS = {
    "sft": ("eval_loss", "train_loss", "steps"),
    "pairs": ("pairs", "mean_tokens", "eos_rate"),
    "labels": (
        "raters",
        "comparisons",
        "labels",
        "pairwise_agreement",
        "krippendorff_alpha",
        "flagged",
        "sources",
        "campaigns",
    ),
    "reward": ("train_pairs", "eval_pairs", "eval_accuracy", "eval_length_reward_spearman"),
    "ppo": ("updates", "score_first", "score_last", "kl_last", "kl_coef_last", "episodes_per_s"),
}


def stages(summaries: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Each stage's headline numbers in one line, and the reward model per criterion."""
    rows = []
    for name, keys in STAGE_KEYS.items():
        if name in summaries:
            s = summaries[name]
            rows.append((name, ", ".join(f"{k} {fmt(s[k])}" for k in keys if k in s)))
    for c, r in (summaries.get("reward", {}).get("criteria") or {}).items():  # per_criterion
        vals = ", ".join(f"{k} {fmt(r.get(k))}" for k in ("train_pairs", "eval_accuracy"))
        rows.append((f"reward · {c} prompts", vals))
    return rows


def prompt_text(prompt: Any) -> str:
    """A sample's prompt as plain text, one message a line."""
    return "\n".join(m["content"] for m in as_messages(prompt or []))


def samples(rows: Sequence[Mapping[str, Any]], limit: int = 8) -> list[Row]:
    """Initial vs final answers to the same prompts, each with its gold and proxy scores."""
    out = []
    for s in rows[:limit]:
        cells = []
        for side, name in (("old", "initial"), ("new", "final")):
            scores = " · ".join(
                f"{k} {s[f'{k}_{side}']:.2f}" for k in ("gold", "proxy") if f"{k}_{side}" in s
            )
            cells.append({"who": f"{name} {scores}", "text": str(s.get(side, ""))})
        out.append({"prompt": prompt_text(s.get("prompt")), "cells": cells})
    return out
