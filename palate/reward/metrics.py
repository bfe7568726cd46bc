"""How good is a reward model: accuracy, calibration and length bias on comparisons
(``palate reward eval``), and scoring a file of responses (``palate reward score``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from palate.data import Comparison, Demonstration, atomic_write, read_records, write_jsonl
from palate.reward.config import RewardEvalConfig, RewardScoreConfig
from palate.reward.model import RewardEnsemble, RewardModel, load_reward_model
from palate.rundir import RunDir
from palate.training import resolve_precision

__all__ = [
    "evaluate_reward",
    "expected_calibration_error",
    "preference_metrics",
    "score_comparisons",
    "score_file",
]


@torch.no_grad()
def score_comparisons(
    rm: RewardModel | RewardEnsemble, comps: Sequence[Comparison], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards of the chosen responses, of the rejected ones), each (N,), offset applied."""
    prompts = [c.prompt for c in comps]
    sc = rm.score(
        prompts + prompts,
        [c.chosen for c in comps] + [c.rejected for c in comps],
        batch_size=batch_size,
    ).numpy()
    return sc[: len(comps)], sc[len(comps) :]


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE: Σ_bins (n_b/N)·|mean predicted − mean observed| with equal-width bins on [0, 1]."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def preference_metrics(
    comps: Sequence[Comparison],
    r_c: np.ndarray,
    r_r: np.ndarray,
    tokenizer: Any,
    bins: int = 10,
) -> dict[str, Any]:
    """Accuracy, margin, calibration and length-bias checks for scored comparisons."""
    from scipy.stats import spearmanr

    tie = np.array([c.tie for c in comps], dtype=bool)
    q = np.array(
        [0.5 if c.tie else (1.0 if c.prob_chosen is None else c.prob_chosen) for c in comps]
    )
    delta = r_c - r_r
    decided = ~tie & (q != 0.5)
    correct = (delta > 0) == (q > 0.5)
    # Calibration: each pair in both orientations, so "observed" is not always 1.
    p = 1 / (1 + np.exp(-np.concatenate([delta, -delta])))
    y = np.concatenate([q, 1 - q])
    len_c = np.array(
        [len(tokenizer(c.chosen, add_special_tokens=False)["input_ids"]) for c in comps]
    )
    len_r = np.array(
        [len(tokenizer(c.rejected, add_special_tokens=False)["input_ids"]) for c in comps]
    )
    rewards = np.concatenate([r_c, r_r])
    lengths = np.concatenate([len_c, len_r])
    rho = spearmanr(rewards, lengths).statistic if len(set(lengths)) > 1 else float("nan")
    rej_longer = decided & (len_r > len_c)
    ch_longer = decided & (len_c > len_r)

    def acc(sel: np.ndarray) -> float | None:
        return float(correct[sel].mean()) if sel.any() else None

    return {
        "pairs": len(comps),
        "accuracy": acc(decided),
        "mean_margin": float(delta[decided].mean()) if decided.any() else None,
        "ece": expected_calibration_error(p, y, bins),
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std()),
        "tie_pairs": int(tie.sum()),
        "length_reward_spearman": float(rho),
        "accuracy_rejected_longer": acc(rej_longer),
        "pairs_rejected_longer": int(rej_longer.sum()),
        "accuracy_chosen_longer": acc(ch_longer),
        "pairs_chosen_longer": int(ch_longer.sum()),
        "chosen_longer_fraction": float((len_c > len_r)[decided].mean()) if decided.any() else None,
    }


def evaluate_reward(cfg: RewardEvalConfig) -> dict[str, Any]:
    """``palate reward eval``: score held-out comparisons and report accuracy, ECE, length bias."""
    rm = load_reward_model(cfg.model)
    rm.precision = resolve_precision(cfg.precision, rm.device)
    comps = list(read_records(cfg.data, "comparisons").records)[: cfg.max_examples]
    r_c, r_r = score_comparisons(rm, comps, cfg.batch_size)
    summary = {"stage": "reward-eval", "model": cfg.model, "data": cfg.data}
    summary.update(preference_metrics(comps, r_c, r_r, rm.tokenizer, cfg.bins))
    if cfg.output_dir:
        run = RunDir(cfg.output_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.path / "eval.json") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def score_file(cfg: RewardScoreConfig) -> dict[str, Any]:
    """``palate reward score``: add a ``reward`` field to every {prompt, response} row."""
    rm = load_reward_model(cfg.model)
    rm.precision = resolve_precision(cfg.precision, rm.device)
    demos: list[Demonstration] = list(read_records(cfg.data, "demonstrations").records)
    rewards = rm.score(
        [d.prompt for d in demos], [d.response for d in demos], batch_size=cfg.batch_size
    )
    rows = []
    for d, r in zip(demos, rewards.tolist(), strict=True):
        row = d.model_dump(mode="json", exclude_defaults=True)
        row["reward"] = r
        rows.append(row)
    write_jsonl(cfg.output, rows)
    return {
        "stage": "reward-score",
        "output": cfg.output,
        "rows": len(rows),
        "mean_reward": float(rewards.mean()) if rows else None,
        "std_reward": float(rewards.std()) if len(rows) > 1 else None,
    }
