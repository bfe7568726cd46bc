"""Stage ``reward``: the reward model on every label so far (``palate reward train``'s config),
plus one per rater group or prompt criterion when asked; the round's reward as a score function."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from palate.data import prompt_text, read_jsonl
from palate.eval.stats import order_agreement
from palate.pipeline.launch import launched, run_here
from palate.pipeline.recipes import group_panels, label_criteria, reward_routes
from palate.pipeline.run import Run
from palate.ppo import RewardSource
from palate.reward import load_reward_model
from palate.reward.routed import reward_models
from palate.reward.scoring import load_score_fn
from palate.rundir import RunDir
from palate.training import store_frozen_linears


def stage_reward(run: Run, r: int = 0) -> dict[str, Any]:
    """The reward model on every label so far (those of ``raters.train_groups`` when set);
    with ``raters.per_group_reward``, one more per group, each on its own group's labels; with
    ``reward.per_criterion``, one more per prompt criterion, each on its criterion's labels."""
    keep = ("train_pairs", "eval_accuracy", "eval_pairs", "normalize_samples")

    def part(name: str) -> dict[str, Any]:  # one more reward model, in reward/<name>
        done = RunDir(run.round_dir(r, "reward") / name)
        got = done.read_summary() if done.is_complete() else None
        got = got or launched(run, "reward", r, name) or run_here(run, "reward", r, name)
        return {k: got.get(k) for k in keep}

    # first: the pooled model's summary marks the stage done
    groups = (
        {group: part(f"groups/{group}") for group, _ in group_panels(run)}
        if run.cfg.raters.per_group_reward
        else {}
    )
    criteria = (
        {c: part(f"criteria/{c}") for c in label_criteria(run, r)}
        if run.cfg.reward.per_criterion
        else {}
    )
    out = launched(run, "reward", r) or run_here(run, "reward", r)
    if groups:
        agreement = held_out_agreement(run, r)
        for group, row in groups.items():
            row["gold_agreement"] = agreement[group]
        out["groups"] = groups
        out["gold_agreement"] = agreement["run"]
    if criteria:
        out["criteria"] = criteria
    if groups or criteria:
        RunDir(run.round_dir(r, "reward")).write_summary(out)
    return out


def run_scorer(run: Run, r: int, precision: str) -> Any:
    """Round r's reward as a ScoreFn on the CPU: its reward model, or with
    ``reward.per_criterion`` each prompt's criterion's model (the pooled one for the rest)."""

    source = RewardSource(
        model=str(run.round_dir(r, "reward") / "final"), routes=reward_routes(run, r)
    )
    score = load_score_fn(source, torch.device("cpu"), precision, run.criteria())
    for rm in reward_models(score):
        for module in rm.modules():
            store_frozen_linears(module, precision)
    return score


def held_out_agreement(run: Run, r: int) -> dict[str, dict[str, float | None]]:
    """On the reward stage's held-out pairs (the same prompts for every reward model: the
    split is by prompt, in first-seen order): for the run's reward model and each group's,
    how often it orders the two responses as each group's gold does (gold ties left out)."""

    d = run.round_dir(r, "reward")
    models = {"run": d, **{g: d / "groups" / g for g, _ in group_panels(run)}}
    held = [
        {prompt_text(x["prompt"]) for x in read_jsonl(m / "heldout.jsonl")} for m in models.values()
    ]
    common = set.intersection(*held)  # held out by every model (the same split, checked)
    seen, prompts, first, second = set(), [], [], []
    for row in read_jsonl(d / "heldout.jsonl"):
        key = (prompt_text(row["prompt"]), *sorted((row["chosen"], row["rejected"])))
        if key[0] in common and key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
            first.append(row["chosen"])
            second.append(row["rejected"])
    golds = {}
    for group, _ in group_panels(run):
        score = run.gold(group)
        golds[group] = np.asarray(score(prompts, first)) - np.asarray(score(prompts, second))
    out: dict[str, dict[str, float | None]] = {}
    for name, path in models.items():
        rm = load_reward_model(path / "final")
        delta = (rm.score(prompts, first) - rm.score(prompts, second)).detach().float().numpy()
        out[name] = {group: order_agreement(delta, dg) for group, dg in golds.items()}
    return out
