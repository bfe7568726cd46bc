"""Stage ``pairs``: the round's policy answers its slice of the training prompts k times; every
two answers form a pair (chosen within ``pairs.budget`` by :mod:`palate.label.active`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from palate.data import prompt_json, prompt_text, write_jsonl
from palate.errors import DataError
from palate.label.active import preference_probs, select_pairs
from palate.label.campaign import sample_pairs
from palate.pipeline.recipes import read_criteria, read_prompts, round_policy
from palate.pipeline.run import Run
from palate.progress import progress_bar
from palate.reward.model import RewardEnsemble, load_reward_model
from palate.rundir import RunDir
from palate.sampling import load_sampler


def stage_pairs(run: Run, r: int = 0) -> dict[str, Any]:
    """Round r's pairs: the round's policy answers its slice of the training prompts k times;
    with ``pairs.budget`` the pairs to label are chosen (``pairs.select``: the previous round's
    reward model scores the candidates; round 0 has none and draws at random)."""

    cfg = run.cfg.pairs
    train = run.root / "prompts" / "train.jsonl"
    lo, hi = r * cfg.prompts, (r + 1) * cfg.prompts
    prompts, criteria = read_prompts(train)[lo:hi], read_criteria(train)[lo:hi]
    if not prompts:
        raise DataError(
            f"{train}: round {r} needs training prompts {lo + 1}-{hi} (pairs.prompts per round), "
            f"found {lo}; add prompts or lower pairs.prompts"
        )
    by_text = {prompt_text(p): c for p, c in zip(prompts, criteria, strict=True)}
    precision = run.precision()
    policy = round_policy(run, r)
    model, tok = load_sampler(policy, precision)
    random.seed(run.cfg.seed + r)
    torch.manual_seed(run.cfg.seed + r)
    with progress_bar("pairs", total=len(prompts) * cfg.samples_per_prompt) as bar:
        pairs, gens = sample_pairs(
            model,
            tok,
            prompts,
            cfg.sampling,
            k=cfg.samples_per_prompt,
            pairing=cfg.pairing,
            source=policy,
            batch_size=cfg.batch_size,
            precision=precision,
            on_batch=bar.advance,
        )
    del model
    method = cfg.select if r > 0 else "random"
    probs = None
    budget = cfg.budget or len(pairs)
    if budget < len(pairs) and method != "random":
        probs = candidate_probs(run, r - 1, pairs)  # (M, N) the last reward model's P(a ≻ b)
    chosen = select_pairs(  # index → why: all, random, or the selection rule
        len(pairs),
        budget,
        method,
        probs=probs,
        random_share=cfg.random_share,
        seed=run.cfg.seed + r,
    )

    rows = [
        pair_row(p, by_text[prompt_text(p.prompt)], r, chosen.get(i, "none"), cfg.budget, probs, i)
        for i, p in enumerate(pairs)
    ]
    d = run.round_dir(r, "pairs")
    d.mkdir(parents=True, exist_ok=True)
    if cfg.budget:
        write_jsonl(d / "candidates.jsonl", rows)
    write_jsonl(d / "pairs.jsonl", [row for i, row in enumerate(rows) if i in chosen])
    # every sample, in demonstrations format: the round policy's own responses, which the
    # reward stage may normalise on (see reward_config)
    per_prompt = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    write_jsonl(
        d / "samples.jsonl",
        [
            {"prompt": prompt_json(p), "response": g.text, "metadata": {"finished": g.finished}}
            for p, g in zip(per_prompt, gens, strict=True)
        ],
    )
    summary = {
        "stage": "pairs",
        "pairs": len(chosen),
        "candidates": len(pairs),
        "select": method,
        "prompts": len(prompts),
        "mean_tokens": sum(len(g.token_ids) for g in gens) / max(1, len(gens)),
        "eos_rate": sum(g.finished for g in gens) / max(1, len(gens)),
    }
    RunDir(d).write_summary(summary)
    return summary


def pair_row(
    p: Any, criterion: str, r: int, selected_by: str, budget: Any, probs: Any, i: int
) -> dict[str, Any]:
    """One pair as a pairs-file row (its criterion, round, why it was chosen, P(a ≻ b))."""
    return {
        "prompt": p.prompt,
        "response_a": p.response_a,
        "response_b": p.response_b,
        "source_a": p.source_a,
        "source_b": p.source_b,
        "metadata": {
            "criterion": criterion,
            **({"round": r} if r else {}),
            **({"selected_by": selected_by} if budget else {}),
            **({"p_a": float(probs.mean(0)[i])} if probs is not None else {}),
        },
    }


def candidate_probs(run: Run, r: int, pairs: list[Any]) -> Any:
    """(M, N) P(a ≻ b) of round r's reward model (each ensemble member; M = 1 for one model)."""

    rm = load_reward_model(run.round_dir(r, "reward") / "final")
    # an ensemble's members are raw (the ensemble's gain scales their mean); one model scores
    # with its own gain. Offsets cancel in r_a − r_b.
    members, gain = (rm.members, rm.gain) if isinstance(rm, RewardEnsemble) else ([rm], 1.0)
    prompts = [p.prompt for p in pairs]

    def scores(responses: list[str]) -> Any:  # (M, N)
        return np.stack([m.score(prompts, responses).float().numpy() * gain for m in members])

    return preference_probs(
        scores([p.response_a for p in pairs]), scores([p.response_b for p in pairs])
    )
