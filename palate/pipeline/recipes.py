"""Recipes: each training stage of ``palate run`` as the plain config its library command takes
(``palate sft`` / ``palate reward train`` / ``palate ppo``), built from the run and its round,
with the run files they read (which labels, which prompts, which adapter to continue).

Both the stages (:mod:`palate.pipeline.stages`) and the launched processes
(:mod:`palate.pipeline.launch`) build their configs here, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palate.data import (
    DEFAULT_CRITERION,
    Prompt,
    criterion_of,
    prompt_text,
    read_jsonl,
    read_records,
    write_jsonl,
)
from palate.errors import DataError
from palate.pipeline.config import RunOnlyPPO
from palate.pipeline.run import Run
from palate.ppo import PPOConfig
from palate.reward import RewardConfig
from palate.rundir import RunDir
from palate.sft import SFTConfig

__all__ = ["ppo_config", "reward_config", "sft_config"]


def read_prompts(path: Path) -> list[Prompt]:
    return [r.prompt for r in read_records(path, "prompts").records]


def read_criteria(path: Path) -> list[str]:
    """Each prompt's criterion (from the split's metadata; helpfulness when absent)."""
    return [criterion_of(r.metadata) for r in read_records(path, "prompts").records]


def sft_config(run: Run) -> SFTConfig:
    """The SFT stage as a plain ``palate sft`` config."""
    assert run.cfg.sft is not None
    data = run.cfg.sft.model_dump()
    data.update(model=run.cfg.sft.model or run.cfg.model, output_dir=str(run.dir("sft")))
    return SFTConfig.model_validate(data)


def round_policy(run: Run, r: int) -> str:
    """The policy that answers round r's prompts: the initial one, then each round's newest."""
    return run.policy if r == 0 else str(run.round_dir(r - 1, "ppo") / "final")


def group_panels(run: Run) -> list[tuple[str, Any]]:
    """(group name, its panel with the attribute ``group``) for ``raters.groups``; each
    group's panel seeds differently (its seed + the group's index)."""
    out = []
    for i, g in enumerate(run.cfg.raters.groups):
        panel = g.panel or run.cfg.raters.panel
        update: dict[str, Any] = {"attributes": {**panel.attributes, "group": g.name}}
        if g.panel is None:
            update["seed"] = panel.seed + i
        out.append((g.name, panel.model_copy(update=update)))
    return out


def label_criteria(run: Run, r: int) -> list[str]:
    """The prompt criteria of the labels up to round r (each gets a reward model of its own
    with ``reward.per_criterion``)."""
    return sorted(
        {
            criterion_of(row.get("metadata"))
            for k in range(r + 1)
            for row in read_jsonl(run.round_dir(k, "labels") / "comparisons.jsonl")
        }
    )


def reward_routes(run: Run, r: int) -> dict[str, str]:
    """{criterion: reward model directory} of round r (empty without ``reward.per_criterion``)."""
    if not run.cfg.reward.per_criterion:
        return {}
    d = run.round_dir(r, "reward") / "criteria"
    return {c: str(d / c / "final") for c in label_criteria(run, r)}


def comparisons_file(run: Run, r: int, part: str | None = None) -> Path:
    """The comparisons round r's reward model trains on: every round's labels so far (rounds
    ≥ 1 concatenate them into ``round-r/labels/all.jsonl``); with rater groups, those of
    ``raters.train_groups``. ``part`` ``groups/<g>``: group g's labels alone;
    ``criteria/<c>``: the labels of criterion c's prompts alone (``labels/<part>.jsonl``)."""
    kind, _, name = (part or "").partition("/")
    keep = [name] if kind == "groups" else run.cfg.raters.train_groups
    if r == 0 and keep is None and not part:
        return run.dir("labels") / "comparisons.jsonl"
    rows = [
        row
        for k in range(r + 1)
        for row in read_jsonl(run.round_dir(k, "labels") / "comparisons.jsonl")
        if (keep is None or row.get("metadata", {}).get("group") in keep)
        and (kind != "criteria" or criterion_of(row.get("metadata")) == name)
    ]
    d = run.round_dir(r, "labels")
    path = d / f"{part}.jsonl" if part else d / ("all.jsonl" if r else "train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return path


def criterion_prompts(run: Run, r: int, criterion: str, source: Path, kind: str) -> str:
    """``source`` (a prompts or samples file) cut to the rows whose prompt is of ``criterion``,
    written beside round r's labels of that criterion: a criterion's reward model is normalised
    on the policy's samples of its own prompts."""
    of = run.criteria()
    rows = [
        rec
        for rec in read_jsonl(source)
        if of.get(prompt_text(rec["prompt"]), DEFAULT_CRITERION) == criterion
    ]
    path = run.round_dir(r, "labels") / "criteria" / f"{criterion}-{kind}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return str(path)


def reward_config(run: Run, r: int = 0, part: str | None = None) -> RewardConfig:
    """Round r's reward stage as a plain ``palate reward train`` config, on every label so far
    (``part``: one more model on some of them, see :func:`comparisons_file`).

    Normalisation is on the round policy's samples with PPO's sampling settings: the pairs
    stage's samples when they were drawn with exactly those settings (free), else fresh samples
    of the policy on the training prompts (for ``criteria/<c>``: on c's prompts alone). Settings
    the user gave win.
    """
    data = run.cfg.reward.model_dump(exclude={"per_criterion"})
    given = run.cfg.reward.normalize.model_fields_set
    norm = data["normalize"]
    kind, _, criterion = (part or "").partition("/")
    if not {"policy", "responses"} & given:
        samples = run.round_dir(r, "pairs") / "samples.jsonl"
        if run.cfg.pairs.sampling == run.cfg.ppo.sampling and samples.is_file():
            norm["responses"] = str(samples)
            if kind == "criteria":
                norm["responses"] = criterion_prompts(run, r, criterion, samples, "samples")
        else:
            norm["policy"] = round_policy(run, r)
            if "prompts" not in given:
                norm["prompts"] = str(run.root / "prompts" / "train.jsonl")
                if kind == "criteria":
                    norm["prompts"] = criterion_prompts(
                        run, r, criterion, run.root / "prompts" / "train.jsonl", "prompts"
                    )
            if "sampling" not in given:
                norm["sampling"] = run.cfg.ppo.sampling.model_dump()
    out = run.round_dir(r, "reward")
    data.update(
        data=str(comparisons_file(run, r, part)),
        output_dir=str(out / part if part else out),
    )
    return RewardConfig.model_validate(data)


def ppo_config(run: Run, r: int = 0) -> PPOConfig:
    """Round r's PPO stage as a plain ``palate ppo`` config. Later rounds continue the previous
    round's LoRA adapter (the reference stays the initial policy) at its last KL coefficient, or
    at ``ppo.later_rounds_kl_coef``, fixed."""
    data = run.cfg.ppo.model_dump(exclude=set(RunOnlyPPO.model_fields))
    later_coef = run.cfg.ppo.later_rounds_kl_coef
    shares = run.cfg.ppo.prompt_shares
    own = run.cfg.ppo.ptx_own_declines
    if r == 0 and (adapter := warm_start_adapter(run)) is not None:
        data["init_adapter"] = str(adapter)
    if own is not None:  # written by stage_ppo before training; none found: no ptx this round
        demos = own_declines_file(run, r)
        if demos.is_file() and demos.stat().st_size > 0:
            data["ppo"].update(ptx_coef=own.coef, ptx_data=str(demos))
    data.update(
        model=run.policy,
        prompts=str(ppo_prompts_file(run, r) if shares else run.root / "prompts" / "train.jsonl"),
        output_dir=str(run.round_dir(r, "ppo")),
    )
    data["reward"]["model"] = str(run.round_dir(r, "reward") / "final")
    data["reward"]["routes"] = reward_routes(run, r)
    if r > 0:
        prev = RunDir(run.round_dir(r - 1, "ppo"))
        last = prev.latest_checkpoint()
        if last is None:
            raise DataError(f"{prev.path}: no checkpoint to continue from")
        data["init_adapter"] = str(last / "policy")
        beta = prev.read_summary().get("kl_coef_last")
        if later_coef is not None:  # a fixed, usually stiffer leash for the later rounds
            data["kl"].update(coef=later_coef, adaptive=False)
        elif run.cfg.ppo.kl.adaptive and beta is not None:
            data["kl"]["coef"] = float(beta)
    return PPOConfig.model_validate(data)


def ppo_prompts_file(run: Run, r: int) -> Path:
    """Where round r's PPO prompts are with ``ppo.prompt_shares``."""
    return run.round_dir(r, "ppo") / "prompts.jsonl"


def own_declines_file(run: Run, r: int) -> Path:
    """Where round r's PPO-ptx demonstrations of ``ppo.ptx_own_declines`` are."""
    return run.round_dir(r, "ppo") / "ptx-own-declines.jsonl"


def warm_start_dir(run: Run) -> Path:
    """Where ``ppo.sft_own_declines`` fine-tunes round 0's starting adapter."""
    return run.round_dir(0, "ppo") / "warm-start"


def warm_start_adapter(run: Run) -> Path | None:
    """The adapter round 0's PPO starts from, once ``ppo.sft_own_declines`` has trained it."""
    final = warm_start_dir(run) / "final"
    ready = run.cfg.ppo.sft_own_declines is not None and RunDir(warm_start_dir(run)).is_complete()
    return final if ready and (final / "adapter_config.json").is_file() else None
