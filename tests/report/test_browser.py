"""The run report with every section filled renders in real headless Chromium: every plot is
there and its inline PNG decodes, the sections of the optional evaluations show, and the page
logs no error.

Locally a missing Chromium or Playwright skips with a reason; under CI it must run.
Set PALATE_SCREENSHOTS=DIR to save the page as DIR/report.png.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from palate.ppo.monitors import Alarm
from palate.report import OPTIONAL_PLOTS, PLOTS, build_report

from ..browser import need_browser, render_report


def _sycophancy(shift: float) -> dict[str, Any]:
    """One side (initial or final) of ``summary["sycophancy"]`` (palate/eval/sycophancy.py)."""
    return {
        "opinion": {
            "items": 10,
            "rate": 0.6 + shift,
            "mean_p_matching": 0.51,
            "rate_one_order": 0.55,
            "letter_a_rate": 0.52,
        },
        "are_you_sure": {
            "items": 20,
            "p_true_before": 0.50,
            "p_true_after": 0.48 - shift,
            "delta": -0.02 - shift,
            "accuracy_before": 0.55,
            "accuracy_after": 0.45,
            "flip_rate": 0.4 + shift,
            "first_right": 11,
        },
        "feedback": {
            "items": 20,
            "mean_rating": {"neutral": 2.4, "wrote": 3.1, "like": 2.9, "dislike": 2.9},
            "shift_wrote": 0.7,
            "shift_like": 0.5 + shift,
            "shift_dislike": 0.5,
            "true_minus_false": -0.02,
        },
    }


def _rate(rate: float, n: int) -> dict[str, Any]:
    return {"rate": rate, "low": max(rate - 0.05, 0.0), "high": min(rate + 0.05, 1.0), "n": n}


def _fit(alpha: float, beta: float, peak_d: float | None) -> dict[str, Any]:
    """A fit as palate/pipeline/stages/eval.py stores it (palate/eval/overopt.py's fields)."""
    peak = None if peak_d is None else peak_d * (alpha - beta * math.log(peak_d))
    return {
        "alpha": alpha,
        "beta": beta,
        "r2": 0.95,
        "peak_d": peak_d,
        "peak_kl": None if peak_d is None else peak_d**2,
        "peak_gain": peak,
    }


def _overopt() -> dict[str, Any]:
    bon = []
    for n in (1, 2, 4, 8, 16):
        kl = math.log(n) - (n - 1) / n
        d = kl**0.5
        gold, proxy = 0.6 * d - 0.1 * d * d, 0.8 * d
        bon.append(
            {
                "n": n,
                "kl": kl,
                "kl_sampled": kl * 0.99,
                "d": d,
                "proxy": proxy - 0.2,
                "gold": gold,
                "gold_gain": gold,
                "proxy_gain": proxy,
            }
        )
    rl = []
    for update in (0, 4, 8, 12):
        kl = 0.8 * update
        d = kl**0.5
        rl.append(
            {
                "update": update,
                "kl": kl,
                "d": d,
                "gold_gain": d * (0.5 - 0.3 * math.log(d)) if d else 0.0,  # rl_gold's curve
                "proxy_gain": 0.4 * d,
            }
        )
    return {
        "bon": bon,
        "rl": rl,
        "fits": {
            "bon_gold": _fit(0.6, 0.1, None),  # peak: none, still rising
            "bon_proxy": _fit(0.8, 0.0, 50.0),  # peak: beyond the measured range
            "rl_gold": _fit(0.5, 0.3, 1.5),  # peak inside: the dotted line
            "rl_proxy": _fit(0.4, 0.0, None),
        },
        "bon_gold_best_n": 16,
        "prompts": 4,
        "samples": 16,
    }


def _full_report(path: Path) -> Path:
    """A report with every section filled, shaped like a real run's outputs."""
    summary: dict[str, Any] = {
        "stage": "eval",
        "prompts": 8,
        "length_new": 19.1,
        "length_old": 39.5,
        "kl": 11.5,
        "kl_target": 16.0,
        "proxy_gold_agreement": 0.83,
        "xstest": {
            "initial": {"unsafe_refusal": _rate(0.10, 20), "safe_compliance": _rate(0.98, 25)},
            "final": {"unsafe_refusal": _rate(0.05, 20), "safe_compliance": _rate(1.0, 25)},
        },
        "sycophancy": {"initial": _sycophancy(0.0), "final": _sycophancy(0.05)},
        "overopt": _overopt(),
    }
    for name, win, new, old in (("gold", 0.83, 0.81, -0.02), ("proxy", 0.91, 0.81, -0.24)):
        summary |= {
            f"{name}_win_rate": win,
            f"{name}_win_rate_low": win - 0.09,
            f"{name}_win_rate_high": min(win + 0.09, 1.0),
            f"{name}_new": new,
            f"{name}_old": old,
            f"{name}_lc_win_rate": win - 0.2,
            f"{name}_lc_win_rate_low": win - 0.6,
            f"{name}_lc_win_rate_high": 0.99,
        }
    stages = {
        "sft": {"stage": "sft", "eval_loss": 2.1, "train_loss": 2.0, "steps": 100},
        "pairs": {"stage": "pairs", "pairs": 64, "prompts": 8, "mean_tokens": 37.9},
        "labels": {
            "stage": "labels",
            "raters": "simulated",
            "comparisons": 64,
            "labels": 192,
            "pairwise_agreement": 0.8,
            "krippendorff_alpha": 0.59,
        },
        "reward": {"stage": "reward", "train_pairs": 56, "eval_pairs": 8, "eval_accuracy": 0.75},
        "ppo": {"stage": "ppo", "updates": 12, "score_first": -0.23, "score_last": 0.81},
    }
    metrics = [
        {
            "step": i,
            "objective/score": -0.2 + 0.08 * i,
            "objective/kl": 0.9 * i,
            "objective/kl_coef": 0.03 - 0.0005 * i,
            "objective/entropy": 1.4 - 0.05 * i,
            "response/length": 40 - 2 * i,
        }
        for i in range(1, 13)
    ]
    checkpoints = [
        {
            "update": u,
            "kl": 0.8 * u,
            "length": 40.0 - u,
            "gold": 0.1 * u - 0.006 * u * u,
            "proxy": 0.07 * u,
        }
        for u in (0, 4, 8, 12)
    ]
    rollouts = [
        {"update": u, "gold": 0.04 * u - 0.4, "proxy": 0.08 * u - 0.2} for u in range(1, 13)
    ]
    samples: list[dict[str, Any]] = [
        {
            "prompt": [{"role": "user", "content": f"Tell me about rivers #{i}"}],
            "old": f"Rivers are long <b>wet</b> things #{i}",
            "new": f"A river flows to the sea #{i}",
            "gold_old": -0.5,
            "gold_new": 0.7,
            "proxy_old": -0.7,
            "proxy_new": 0.9,
            "length_old": 40 - i,
            "length_new": 20 + i,
        }
        for i in range(6)
    ]
    alarms = [
        asdict(Alarm("reward_hacking", 9, "gold 0.10 down from 0.32 while the proxy rose")),
        {**asdict(Alarm("kl_budget", 11, "KL 10.20 nats above the budget 8")), "stopped": True},
    ]
    return build_report(
        path,
        title="palate run: browser",
        summary=summary,
        stages=stages,
        ppo_metrics=metrics,
        checkpoints=checkpoints,
        rollouts=rollouts,
        lengths_initial=[s["length_old"] for s in samples],
        lengths_final=[s["length_new"] for s in samples],
        samples=samples,
        notes="Gold preference: a synthetic rubric.",
        alarms=alarms,
    )


@pytest.mark.timeout(120)
def test_full_report_renders_every_plot_in_a_real_browser(tmp_path: Path) -> None:
    need_browser()
    report = _full_report(tmp_path / "report.html")
    shots = os.environ.get("PALATE_SCREENSHOTS")
    page = render_report(
        report,
        [*PLOTS, *OPTIONAL_PLOTS],
        screenshot=Path(shots) / "report.png" if shots else None,
    )
    assert page["title"] == "palate run: browser"
    assert sorted(page["plots"]) == sorted([*PLOTS, *OPTIONAL_PLOTS])
    assert page["figures"] == len(PLOTS) + len(OPTIONAL_PLOTS)
    assert page["errors"] == []
    for heading in (
        "Result: final vs initial policy on held-out prompts",
        "Safety: XSTest",
        "Sycophancy",
        "Over-optimisation",
        "Training",
        "Over-optimisation: gold vs proxy",
        "Lengths",
        "Samples (same prompt, same random seed)",
        "Stages",
    ):
        assert heading in page["headings"], (heading, page["headings"])
    text = page["text"]
    # as the reader sees it (rendered text, not the HTML source)
    assert "Gold preference: a synthetic rubric." in text
    assert "gold, length-controlled" in text and "proxy, length-controlled" in text
    assert "refuses unsafe prompts (higher is safer)" in text
    assert "flips away from the true answer after pushback" in text
    assert "none (gain still rising)" in text and "beyond the measured range" in text
    assert "KL 2.25, gain" in text  # rl_gold's peak, inside the measured range
    assert "Alarms" in text and "reward_hacking" in text and "update 11" in text
    assert "Monitors: no alarm" not in text
    assert "budget 8 — training stopped here" in text and text.count("training stopped here") == 1
    assert "Rivers are long <b>wet</b> things #0" in text  # model output shown as text
    assert "krippendorff_alpha 0.590" in text
    for missing in ("no PPO metrics", "no checkpoint evaluations", "no samples", "no stage"):
        assert missing not in text
