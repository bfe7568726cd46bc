"""Stage ``eval``: the final policy against the initial one on held-out prompts (gold and proxy
win rates, KL, lengths), along the PPO checkpoints, per criterion and rater group, XSTest,
sycophancy and over-optimisation (the measures live in :mod:`palate.eval`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.data import prompt_json, write_jsonl
from palate.eval.overopt import study
from palate.eval.policies import ScoredSamples, head_to_head, rollout_curve, sample_and_score
from palate.eval.stats import order_agreement, pairwise_wins, win_rate, win_rates
from palate.eval.sycophancy import measure
from palate.eval.xstest import read_xstest, xstest_rates
from palate.pipeline.recipes import group_panels, read_criteria, read_prompts
from palate.pipeline.run import Run
from palate.pipeline.stages.reward import run_scorer
from palate.ppo import RewardSource
from palate.progress import progress_bar
from palate.reward.scoring import load_score_fn
from palate.rundir import RunDir
from palate.sampling import checkpoint_policy, load_sampler


class Laps:
    """What each part of the evaluation cost, in seconds (``summary.seconds``)."""

    def __init__(self) -> None:
        self.clock = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = round(self.seconds.get(part, 0.0) + now - self.clock, 1)
        self.clock = now


def eval_checkpoints(run: Run) -> list[tuple[int, Path]]:
    """(updates since the start, folder) of every round's PPO checkpoints but the last (the
    final policy), with ``eval.checkpoints``."""
    per_round = run.cfg.ppo.ppo.updates
    if not run.cfg.eval.checkpoints:
        return []
    return [
        (k * per_round + int(ck.name.split("-")[1]), ck)
        for k, d in enumerate(run.ppo_dirs())
        for ck in RunDir(d).complete_checkpoints()
    ][:-1]


def side_measures(
    run: Run, initial: Any, final: Any, tok: Any, xstest: list[Any], on_batch: Any, laps: Laps
) -> tuple[dict[str, Any], dict[str, Any]]:
    """XSTest refusal rates and sycophancy of the initial and the final policy (those asked)."""
    cfg, precision = run.cfg.eval, run.precision()
    safety = {}
    if xstest:
        for side, model in (("initial", initial), ("final", final)):
            safety[side] = xstest_rates(
                model,
                tok,
                xstest,
                max_new_tokens=cfg.xstest_max_new_tokens,
                batch_size=cfg.batch_size,
                precision=precision,
                seed=cfg.seed,
                on_batch=on_batch,
            )
    laps.lap("xstest")
    sycophancy = {}
    if cfg.sycophancy is not None:
        for side, model in (("initial", initial), ("final", final)):
            sycophancy[side] = measure(
                model,
                tok,
                **cfg.sycophancy.model_dump(),
                # scoring, not sampling: its long prompts differ in length, and batches of 64
                # padded to their longest cost more than they save (104 s vs 72 s at 16)
                batch_size=min(cfg.batch_size, 16),
                precision=precision,
                seed=cfg.seed,
            )
    laps.lap("sycophancy")
    return safety, sycophancy


def stage_eval(run: Run) -> dict[str, Any]:
    """The final policy against the initial one on the held-out prompts, judged by the gold and
    the proxy, along the checkpoints, with the side measures the run asks for."""
    cfg = run.cfg.eval
    precision = run.precision()
    sampling = cfg.sampling or run.cfg.ppo.sampling
    prompts = read_prompts(run.root / "prompts" / "eval.jsonl")
    gold = run.gold()
    # the proxy: the reward model the final policy was optimised against (the last round's;
    # with reward.per_criterion each prompt's criterion's model)
    proxy = run_scorer(run, run.last_round, precision)
    initial, tok = load_sampler(run.policy, precision)
    ckpts = eval_checkpoints(run)
    n_ck = min(cfg.checkpoint_prompts, len(prompts))
    xstest = read_xstest(cfg.xstest, cfg.xstest_per_label, cfg.seed) if cfg.xstest else []
    total = 2 * len(prompts) + len(ckpts) * n_ck + 2 * len(xstest)
    kw: dict[str, Any] = {
        "gold": gold,
        "proxy": proxy,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "precision": precision,
    }
    laps = Laps()
    with progress_bar("eval", total=total) as bar:
        kw["on_batch"] = bar.advance
        old = sample_and_score(initial, tok, prompts, sampling, **kw)
        final, _ = load_sampler(str(run.ppo_dirs()[-1] / "final"), precision)
        new = sample_and_score(final, tok, prompts, sampling, reference=initial, **kw)
        laps.lap("final_vs_initial")
        safety, sycophancy = side_measures(run, initial, final, tok, xstest, bar.advance, laps)
        points = [{"update": 0, "kl": 0.0, **old.means(n_ck)}]
        for update, ck in ckpts:
            model = checkpoint_policy(ck, run.policy, precision)
            scored = sample_and_score(model, tok, prompts[:n_ck], sampling, reference=initial, **kw)
            points.append({"update": update, **scored.means(n_ck)})
            del model
    points.append({"update": run.cfg.ppo.ppo.updates * run.cfg.rounds, **new.means(n_ck)})
    laps.lap("checkpoints")
    overopt = None
    if cfg.overopt is not None:  # best-of-n on the initial policy and the PPO checkpoints
        overopt = study(
            initial,
            tok,
            prompts,
            sampling,
            gold,
            proxy,
            points,
            cfg.overopt,
            seed=cfg.seed + 1,
            batch_size=cfg.batch_size,
            precision=precision,
        )
    laps.lap("overopt")
    result = head_to_head(new, old, seed=cfg.seed)
    criteria = read_criteria(run.root / "prompts" / "eval.jsonl")
    if len(set(criteria)) > 1:
        result["by_criterion"] = criterion_win_rates(new, old, criteria, cfg.seed)
    if run.cfg.raters.groups:
        result["groups"] = group_eval(run, new, old, proxy, precision, cfg.seed)
        laps.lap("groups")
    write_eval_files(run, result, new, old, points, gold, safety)
    kl_target = run.cfg.ppo.kl.target if run.cfg.ppo.kl.adaptive else None
    summary = {"stage": "eval", **result, "kl_target": kl_target, "seconds": laps.seconds}
    if safety:
        summary["xstest"] = safety
    if sycophancy:
        summary["sycophancy"] = sycophancy
    if overopt:
        summary["overopt"] = overopt
    RunDir(run.dir("eval")).write_summary(summary)
    return summary


def write_eval_files(
    run: Run,
    result: dict[str, Any],
    new: ScoredSamples,
    old: ScoredSamples,
    points: list[dict[str, Any]],
    gold: Any,
    safety: dict[str, Any],
) -> None:
    """eval/samples.jsonl (pops ``result["samples"]``), checkpoints.jsonl, rollouts.jsonl and,
    with XSTest, xstest.jsonl (pops each side's ``replies``)."""
    d = run.dir("eval")
    per_round = run.cfg.ppo.ppo.updates
    write_jsonl(
        d / "samples.jsonl",
        [
            {**s, "prompt": prompt_json(s["prompt"]), "length_new": a, "length_old": b}
            for s, a, b in zip(
                result.pop("samples"), new.samples.lengths, old.samples.lengths, strict=True
            )
        ],
    )
    write_jsonl(d / "checkpoints.jsonl", points)
    write_jsonl(
        d / "rollouts.jsonl",
        [
            {**p, "update": k * per_round + p["update"]}
            for k, ppo_dir in enumerate(run.ppo_dirs())
            for p in rollout_curve(ppo_dir / "samples", gold)
        ],
    )
    if not safety:
        return
    write_jsonl(
        d / "xstest.jsonl",
        [
            {
                "prompt": a["prompt"],
                "label": a["label"],
                "type": a["type"],
                "reply_initial": a["reply"],
                "refusal_initial": a["refusal"],
                "reply_final": b["reply"],
                "refusal_final": b["refusal"],
            }
            for a, b in zip(
                safety["initial"].pop("replies"), safety["final"].pop("replies"), strict=True
            )
        ],
    )


def criterion_win_rates(
    new: Any, old: Any, criteria: list[str], seed: int
) -> dict[str, dict[str, Any]]:
    """The gold and proxy win rates on each criterion's held-out prompts (e.g. helpful and
    red-team prompts apart): {criterion: {n, gold_win_rate, gold_low, gold_high, proxy_...}}."""

    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(criteria)):
        idx = [i for i, x in enumerate(criteria) if x == c]
        row: dict[str, Any] = {"n": len(idx)}
        for name in ("gold", "proxy"):
            a, b = getattr(new, name), getattr(old, name)
            if a is None or b is None:
                continue
            wr = win_rate([a[i] for i in idx], [b[i] for i in idx], seed=seed)
            row.update(
                {
                    f"{name}_win_rate": wr["win_rate"],
                    f"{name}_low": wr["low"],
                    f"{name}_high": wr["high"],
                }
            )
        out[c] = row
    return out


def group_eval(
    run: Run, new: Any, old: Any, proxy: Any, precision: str, seed: int
) -> dict[str, Any]:
    """Rater populations: the final policy's win rate over the initial one under each group's
    gold, and how often each reward model (the run's, and with ``per_group_reward`` each
    group's) orders the two answers as each group's gold does."""

    prompts_new, prompts_old = new.samples.prompts, old.samples.prompts
    out: dict[str, Any] = {"win_rates": {}, "reward_agreement": {}}
    gold_delta = {}
    for group, _ in group_panels(run):
        score = run.gold(group)
        a = np.asarray(score(prompts_new, new.samples.responses), dtype=float)
        b = np.asarray(score(prompts_old, old.samples.responses), dtype=float)
        gold_delta[group] = a - b
        wr = win_rates(pairwise_wins(a, b), new.samples.lengths, old.samples.lengths, seed)
        out["win_rates"][group] = {
            "win_rate": wr["win_rate"],
            "low": wr["low"],
            "high": wr["high"],
            "gold_new": float(a.mean()),
            "gold_old": float(b.mean()),
        }
    models = {"run": proxy}
    if run.cfg.raters.per_group_reward:
        for group, _ in group_panels(run):
            path = run.round_dir(run.last_round, "reward") / "groups" / group / "final"
            models[group] = load_score_fn(
                RewardSource(model=str(path)), torch.device("cpu"), precision
            )
    for name, model in models.items():
        a = np.asarray(model(prompts_new, new.samples.responses), dtype=float)
        b = np.asarray(model(prompts_old, old.samples.responses), dtype=float)
        out["reward_agreement"][name] = {
            group: order_agreement(a - b, dg) for group, dg in gold_delta.items()
        }
    reward = RunDir(run.round_dir(run.last_round, "reward")).read_summary()
    if "gold_agreement" in reward:  # the same, on the reward stage's held-out labelled pairs
        out["held_out_agreement"] = {
            "run": reward["gold_agreement"],
            **{g: v["gold_agreement"] for g, v in reward["groups"].items()},
        }
    return out
