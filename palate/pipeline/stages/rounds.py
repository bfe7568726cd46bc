"""Stages ``round-k`` (iterated online RLHF): pairs → labels → staleness → reward → PPO again,
from the newest policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from palate.data import read_jsonl
from palate.pipeline.run import Run
from palate.pipeline.stages.labels import stage_labels
from palate.pipeline.stages.pairs import stage_pairs
from palate.pipeline.stages.ppo import stage_ppo
from palate.pipeline.stages.reward import run_scorer, stage_reward
from palate.progress import console
from palate.reward.model import load_reward_model
from palate.rundir import RunDir


def stage_round(run: Run, stage: str) -> dict[str, Any]:
    """One later round (iterated online RLHF): the newest policy answers fresh prompts → pairs
    chosen within the budget → labelled by the run's raters → how stale the last reward model
    was on them → a reward model retrained on every label so far → PPO continued from the newest
    policy. Each step is skipped when done, so a killed round continues where it stopped."""
    r = run.round_no(stage)
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("pairs", lambda: stage_pairs(run, r)),
        ("labels", lambda: stage_labels(run, r)),
        ("reward", lambda: stage_reward(run, r)),
        ("ppo", lambda: stage_ppo(run, r=r)),
    ]
    out: dict[str, Any] = {"stage": stage, "round": r}
    for step, fn in steps:
        d = run.round_dir(r, step)
        if RunDir(d).is_complete():
            result = RunDir(d).read_summary()
        else:
            console.print(f"round {r}: {step}")
            result = fn()
            if "stopped_at" in result:
                return result
        if step == "labels":
            out["staleness"] = staleness(run, r)
        out[step] = result
    summary = {
        "stage": stage,
        "round": r,
        "pairs": out["pairs"]["pairs"],
        "candidates": out["pairs"]["candidates"],
        "select": out["pairs"]["select"],
        "comparisons": out["labels"]["comparisons"],
        "comparisons_total": out["reward"].get("train_pairs", 0)
        + out["reward"].get("eval_pairs", 0),
        **out["staleness"],
        "reward_accuracy": out["reward"].get("eval_accuracy"),
        "ppo_updates": out["ppo"].get("updates"),
        "kl_last": out["ppo"].get("kl_last"),
        "kl_coef_last": out["ppo"].get("kl_coef_last"),
    }
    RunDir(run.dir(stage)).write_summary(summary)
    return summary


def staleness(run: Run, r: int) -> dict[str, Any]:
    """How well the previous round's reward model predicts round r's new labels, before it is
    retrained: its accuracy on them (ties and soft labels aside: the chosen answer scored
    higher), on all of them and on the randomly drawn share alone (the unbiased number: pairs
    chosen for uncertainty are near ½ by construction)."""

    rows = [
        x for x in read_jsonl(run.round_dir(r, "labels") / "comparisons.jsonl") if not x.get("tie")
    ]
    if not rows:
        return {"stale_accuracy": None, "stale_accuracy_random": None, "stale_n": 0}
    prompts = [x["prompt"] for x in rows]
    if run.cfg.reward.per_criterion:  # each prompt by its criterion's model, as PPO scored it
        score = run_scorer(run, r - 1, "fp32")
    else:
        rm = load_reward_model(run.round_dir(r - 1, "reward") / "final")
        score = rm.score
    chosen = torch.as_tensor(score(prompts, [x["chosen"] for x in rows])).float()
    rejected = torch.as_tensor(score(prompts, [x["rejected"] for x in rows])).float()
    right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()

    def drawn(x: dict[str, Any]) -> bool:  # the export carries the pair's selected_by
        return x.get("metadata", {}).get("selected_by", "random") in ("random", "all")

    rand = [float(v) for v, x in zip(right.tolist(), rows, strict=True) if drawn(x)]
    return {
        "stale_accuracy": float(right.mean()),
        "stale_accuracy_random": sum(rand) / len(rand) if rand else None,
        "stale_n": len(rows),
        "stale_n_random": len(rand),
    }
