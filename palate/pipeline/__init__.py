"""``palate run``: the whole loop from one config.

    [sft] → pairs → labels → reward → ppo → eval → report

* **sft** (optional): supervised fine-tuning; its ``final/`` becomes the initial policy.
* **pairs**: the initial policy answers the training prompts k times → A/B pairs.
* **labels**: raters compare them — ``simulated`` (a panel driven by the gold rubric),
  ``people`` (a campaign in the labeling app: the server starts, invite links are printed, the
  run waits — or exits and continues on the next run — until the campaign is complete) or
  ``file`` (comparisons you already have). Simulated and human labels go through the same store.
* **reward**: a reward model trained on those comparisons (:mod:`palate.reward`).
* **ppo**: the policy optimised against it on a KL leash (:mod:`palate.ppo`).
* **eval**: on held-out prompts, the final policy against the initial one — gold win rate with a
  bootstrap 95% interval, proxy (reward-model) win rate, KL, lengths — and gold vs proxy along
  PPO checkpoints and rollouts (:mod:`palate.eval`).
* **report**: one self-contained HTML file (:mod:`palate.report`).

With ``rounds: K`` (iterated online RLHF) stages ``round-1`` … ``round-(K-1)`` run between ppo
and eval, each repeating pairs → labels → reward → ppo on the newest policy
(:func:`palate.pipeline.stages.stage_round`).

Each stage writes into its own folder of ``output_dir`` and is done when that folder holds
``summary.json``. A re-run skips finished stages, continues an interrupted one (PPO from its
newest checkpoint) and re-runs a stage whose settings — or an upstream stage's — changed since it
ran; ``--from STAGE`` forces a stage and everything after it. The gold preference is used by the
simulated raters and by evaluation only; the reward model never sees it.

Where things are: :mod:`palate.pipeline.config` (``RunConfig``), :mod:`palate.pipeline.run`
(stage folders, fingerprints), :mod:`palate.pipeline.stages` (one function per stage).
"""

from __future__ import annotations

import time
from typing import Any

from palate.config import config_to_yaml
from palate.errors import ConfigError
from palate.pipeline.config import RunConfig
from palate.pipeline.run import STAGES, Run, WaitingForLabels
from palate.pipeline.stages import STAGE_FNS, stage_round
from palate.progress import console
from palate.rundir import RunDir

__all__ = ["STAGES", "RunConfig", "WaitingForLabels", "run_pipeline"]


def run_pipeline(cfg: RunConfig, *, from_stage: str | None = None) -> dict[str, Any]:
    """``palate run``: run every stage that is not done yet; returns the run summary."""
    run = Run(cfg)
    if from_stage == "sft" and cfg.sft is None:
        raise ConfigError("--from sft: this config has no sft section")
    if from_stage is not None and from_stage not in run.stages:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(run.stages)}")
    run.prepare_prompts()  # reads and checks the prompts before anything is written
    (run.root / "config.yaml").write_text(config_to_yaml(cfg))
    stages = run.stages
    forced = set(stages[stages.index(from_stage) :]) if from_stage else set()
    minutes: dict[str, float] = {}
    t_run = time.perf_counter()
    upstream_ran = False
    for i, stage in enumerate(stages, 1):
        state = "stale" if stage in forced else run.state(stage)
        if state == "done" and not upstream_ran:
            console.print(f"[dim]stage {i}/{len(stages)} {stage}: done, skipped[/dim]")
            continue
        if state == "done":  # an upstream stage ran again, so this one is stale too
            state = "stale"
        why = {"new": "", "partial": " (continuing)", "stale": " (settings or inputs changed)"}
        console.rule(f"stage {i}/{len(stages)}: {stage}{why[state]}")
        if state == "stale":
            run.clear(stage)
        run.begin(stage)
        t0 = time.perf_counter()
        result = STAGE_FNS[stage](run) if stage in STAGE_FNS else stage_round(run, stage)
        if "stopped_at" in result:  # a library stage stopped early (stop_after)
            return {"status": "stopped", "stage": stage, **result}
        minutes[stage] = (time.perf_counter() - t0) / 60
        upstream_ran = True
    return _summary(run, minutes, time.perf_counter() - t_run)


def _summary(run: Run, minutes: dict[str, float], seconds: float) -> dict[str, Any]:
    evaluation = RunDir(run.dir("eval")).read_summary()
    reward = RunDir(run.round_dir(run.last_round, "reward")).read_summary()
    ppo_rounds = [RunDir(d).read_summary() for d in run.ppo_dirs()]
    labels = RunDir(run.dir("labels")).read_summary()
    keys = (
        "gold_win_rate",
        "gold_win_rate_low",
        "gold_win_rate_high",
        "proxy_win_rate",
        "gold_new",
        "gold_old",
        "proxy_new",
        "proxy_old",
        "kl",
        "kl_target",
        "length_new",
        "length_old",
        "prompts",
        "proxy_gold_agreement",
    )
    summary: dict[str, Any] = {"status": "complete", "output_dir": str(run.root)}
    summary.update({k: evaluation.get(k) for k in keys})
    summary.update(
        {
            "labels": labels.get("comparisons"),
            "label_agreement": labels.get("pairwise_agreement"),
            "reward_accuracy": reward.get("eval_accuracy"),
            "ppo_updates": sum(p.get("updates") or 0 for p in ppo_rounds),  # early stops count
            "report": str(run.dir("report") / "report.html"),
            "minutes": round(seconds / 60, 2),
            "stage_minutes": {k: round(v, 2) for k, v in minutes.items()},
        }
    )
    halted = [h for p in ppo_rounds for h in p.get("halted_by", [])]
    if halted:  # a monitor ended PPO early (ppo.monitors.action: stop)
        summary["ppo_halted_by"] = halted
    if reward.get("criteria"):  # reward.per_criterion: each criterion's model, held out
        summary["reward_accuracy_by_criterion"] = {
            c: r.get("eval_accuracy") for c, r in reward["criteria"].items()
        }
    if evaluation.get("by_criterion"):
        summary["gold_win_rate_by_criterion"] = {
            c: r.get("gold_win_rate") for c, r in evaluation["by_criterion"].items()
        }
    if evaluation.get("xstest"):
        x = evaluation["xstest"]
        for key in ("unsafe_refusal", "safe_compliance"):
            summary[f"xstest_{key}"] = [x[side][key]["rate"] for side in ("initial", "final")]
    if run.cfg.rounds > 1:
        summary["rounds"] = run.cfg.rounds
        summary["labels"] = sum(
            RunDir(run.round_dir(k, "labels")).read_summary().get("comparisons", 0)
            for k in range(run.cfg.rounds)
        )
    RunDir(run.root).write_summary(summary)
    return summary
