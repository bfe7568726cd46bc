"""Stage ``report``: the run's HTML report from the earlier stages' outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palate.data import read_jsonl
from palate.pipeline.run import STAGES, Run
from palate.report import build_report
from palate.rundir import RunDir


def stage_report(run: Run) -> dict[str, Any]:

    eval_dir = run.dir("eval")
    summary = RunDir(eval_dir).read_summary()
    samples = read_jsonl(eval_dir / "samples.jsonl")
    stages = {
        s: RunDir(run.dir(s)).read_summary()
        for s in STAGES[:-2]
        if RunDir(run.dir(s)).is_complete()
    }
    per_round = run.cfg.ppo.ppo.updates
    metrics, alarms = [], []
    for k, d in enumerate(run.ppo_dirs()):  # every round's PPO, steps counted from the start
        metrics += [{**m, "step": k * per_round + m["step"]} for m in RunDir(d).metrics()]
        if (d / "alarms.jsonl").is_file():
            alarms += [
                {**a, "update": k * per_round + a["update"], **({"round": k} if k else {})}
                for a in read_jsonl(d / "alarms.jsonl")
            ]
    checkpoints = read_jsonl(eval_dir / "checkpoints.jsonl")
    path = build_report(
        run.dir("report") / "report.html",
        title=f"palate run: {run.root.name}",
        summary=summary,
        stages=stages,
        ppo_metrics=metrics,
        checkpoints=checkpoints,
        rollouts=read_jsonl(eval_dir / "rollouts.jsonl"),
        lengths_initial=[s["length_old"] for s in samples],
        lengths_final=[s["length_new"] for s in samples],
        samples=samples,
        notes=gold_note(run),
        alarms=alarms,
        rounds=round_rows(run, checkpoints) if run.cfg.rounds > 1 else [],
        raters=_read_json(run.dir("labels") / "quality.json"),
    )
    out = {"stage": "report", "report": str(path)}
    RunDir(run.dir("report")).write_summary(out)
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def round_rows(run: Run, checkpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round for the report: labels (new, all so far), how the previous reward model
    did on the new labels, the new one's held-out accuracy, and gold/proxy at the round's end."""
    per_round = run.cfg.ppo.ppo.updates
    at = {p["update"]: p for p in checkpoints}
    rows = []
    for k in range(run.cfg.rounds):
        if k == 0:
            labels = RunDir(run.dir("labels")).read_summary()
            reward = RunDir(run.dir("reward")).read_summary()
            row: dict[str, Any] = {
                "round": 0,
                "comparisons": labels.get("comparisons"),
                "comparisons_total": labels.get("comparisons"),
                "select": "random",
                "reward_accuracy": reward.get("eval_accuracy"),
            }
        else:
            row = dict(RunDir(run.dir(f"round-{k}")).read_summary())
        end = at.get((k + 1) * per_round, {})
        row.update(
            updates=(k + 1) * per_round,
            gold=end.get("gold"),
            proxy=end.get("proxy"),
            kl=end.get("kl"),
        )
        rows.append(row)
    return rows


def gold_note(run: Run) -> str:
    """The gold preference in words, for the report."""
    g = run.cfg.gold
    if g.reward_model:
        return f"Gold preference: the reward model at {g.reward_model}."
    r = g.rubric
    parts = [
        f"closeness to {r.length_target} words (×{r.length_weight:g})",
        f"VADER sentiment (×{r.sentiment_weight:g})",
        f"relevance to the prompt (×{r.relevance_weight:g})",
    ]
    if r.keywords:
        parts.append(f"keywords {', '.join(r.keywords)} (×{r.keyword_weight:g})")
    parts.append(
        f"minus refusals (×{r.refusal_weight:g}), repeated trigrams "
        f"(×{r.repetition_weight:g}), trigrams copied from the prompt "
        f"(×{r.echo_weight:g}) and cut-off endings (×{r.truncation_penalty:g})"
    )
    note = "Gold preference (rubric, never shown to the reward model): " + "; ".join(parts) + "."
    if r.refusal_right:
        note += f" A refusal earns +{r.refusal_bonus:g} on {', '.join(r.refusal_right)} prompts."
    for name, own in g.criteria.items():
        fields = ", ".join(f"{k} {getattr(own, k)}" for k in sorted(own.model_fields_set))
        note += f" On {name} prompts: {fields}."
    return note
