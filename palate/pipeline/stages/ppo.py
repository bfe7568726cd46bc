"""Stage ``ppo``: PPO against the round's reward model (``palate ppo``'s config), after the
inputs some settings prepare: repeated prompts (``ppo.prompt_shares``), PPO-ptx on the run's own
declines (``ppo.ptx_own_declines``), a warm-start adapter (``ppo.sft_own_declines``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palate.data import prompt_text, read_jsonl, write_jsonl
from palate.pipeline.launch import launched, run_here
from palate.pipeline.recipes import own_declines_file, ppo_prompts_file, warm_start_dir
from palate.pipeline.run import Run
from palate.progress import console
from palate.rundir import RunDir
from palate.sft import SFTConfig, sft
from palate.sft.config import SFTTrainSettings
from palate.text import decline_opening
from palate.training import OptimSettings


def write_ppo_prompts(run: Run, r: int) -> dict[str, int]:
    """``ppo.prompt_shares``: the training prompts with each listed criterion's prompts repeated
    so that they make up about its share of PPO's prompts: a criterion with n of the prompts
    and share s is repeated round(s·M / ((1 − S)·n)) times (at least once), in place, M being
    the prompts of unlisted criteria and S the listed shares' sum. A listed criterion no
    training prompt has (a flag that matched none) is skipped with a warning."""
    shares = run.cfg.ppo.prompt_shares
    train = run.root / "prompts" / "train.jsonl"
    recs = read_jsonl(train)
    of = run.criteria()
    criterion = [of[prompt_text(rec["prompt"])] for rec in recs]
    counts = {c: n for c in shares if (n := criterion.count(c))}
    if missing := sorted(set(shares) - set(counts)):  # e.g. a flag that matched no prompt
        console.print(
            f"[yellow]ppo.prompt_shares: no training prompt in {train} has criterion "
            f"{', '.join(missing)}; PPO's prompts hold none of it[/]"
        )
    others = len(recs) - sum(counts.values())
    total = sum(shares[c] for c in counts)
    repeats = {c: max(1, round(shares[c] * others / ((1 - total) * n))) for c, n in counts.items()}
    out = [rec for rec, c in zip(recs, criterion, strict=True) for _ in range(repeats.get(c, 1))]
    path = ppo_prompts_file(run, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, out)
    console.print(
        "PPO prompts: "
        + "".join(f"{c} {counts[c]} × {repeats[c]}, " for c in counts)
        + f"{len(out)} in all"
    )
    return {f"ppo_prompts_{c}": counts.get(c, 0) * repeats.get(c, 1) for c in shares}


def write_own_declines_to(
    run: Run, r: int, criteria: list[str], path: Path, use: str, if_none: str
) -> tuple[int, int]:
    """The declines among the pairs samples of rounds 0..r on prompts of ``criteria``, each cut
    after its first declining sentence (:func:`palate.text.decline_opening`), without
    repeats, written to ``path`` as demonstrations (and said, for ``use``); returns (how many,
    on how many prompts)."""

    of, keep = run.criteria(), set(criteria)
    demos: dict[tuple[str, str], dict[str, Any]] = {}
    samples = 0
    for i in range(r + 1):
        for rec in read_jsonl(run.round_dir(i, "pairs") / "samples.jsonl"):
            if of.get(prompt_text(rec["prompt"])) not in keep:
                continue
            samples += 1
            cut = decline_opening(rec["response"])
            if cut is not None:
                key = (json.dumps(rec["prompt"], sort_keys=True), cut)
                demos.setdefault(key, {"prompt": rec["prompt"], "response": cut})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, list(demos.values()))
    prompts = len({k for k, _ in demos})
    console.print(
        f"{use}: {len(demos)} from {samples} samples on {'/'.join(sorted(keep))} prompts "
        f"({prompts} prompts)" + ("" if demos else f"; none, so {if_none}")
    )
    return len(demos), prompts


def write_own_declines(run: Run, r: int) -> dict[str, int]:
    """``ppo.ptx_own_declines``: round r's PPO-ptx demonstrations, the declines among the pairs
    samples of rounds 0..r on prompts of the chosen criteria (:func:`write_own_declines_to`).
    They are the initial and the newer policies' own words, so the ptx loss keeps a behaviour
    the policy already had rather than teaching a new one (PPO-ptx: InstructGPT, Ouyang et al.
    2022 §3.5)."""
    own = run.cfg.ppo.ptx_own_declines
    assert own is not None
    n, prompts = write_own_declines_to(
        run,
        r,
        own.criteria,
        own_declines_file(run, r),
        "PPO-ptx on own declines",
        "this round runs without ptx",
    )
    return {"ptx_demos": n, "ptx_demo_prompts": prompts}


def warm_start(run: Run) -> dict[str, Any]:
    """``ppo.sft_own_declines``: fine-tune LoRA adapters (PPO's shape) on the initial model's
    own declines among round 0's pairs samples on the chosen criteria, for round 0's PPO to
    start from. Skipped when done; with no decline to learn from, PPO starts fresh."""

    warm = run.cfg.ppo.sft_own_declines
    assert warm is not None
    out = warm_start_dir(run)
    if RunDir(out).is_complete():
        return RunDir(out).read_summary()
    path = run.round_dir(0, "ppo") / "warm-start-declines.jsonl"
    n, prompts = write_own_declines_to(
        run,
        0,
        warm.criteria,
        path,
        "PPO warm start on own declines",
        "PPO starts from fresh adapters",
    )
    if not n:
        return {"warm_start_demos": 0}
    ppo = run.cfg.ppo
    cfg = SFTConfig(
        model=run.policy,
        data=str(path),
        eval_fraction=0.0,
        finetune="lora",
        lora=ppo.lora,
        optim=OptimSettings(lr=warm.lr, schedule="constant", warmup_ratio=0.0),
        train=SFTTrainSettings(epochs=warm.epochs, batch_size=warm.batch_size),
        save="adapter",
        sample_prompts=0,
        seed=run.cfg.seed,
        precision=ppo.precision,
        checkpoint_every=10_000,
        output_dir=str(out),
    )
    summary = sft(cfg)
    return {"warm_start_demos": n, "warm_start_prompts": prompts, **summary}


def stage_ppo(run: Run, stop_after: int | None = None, r: int = 0) -> dict[str, Any]:
    if r == 0 and run.cfg.ppo.sft_own_declines is not None:
        warm_start(run)
    if run.cfg.ppo.prompt_shares:
        write_ppo_prompts(run, r)
    if run.cfg.ppo.ptx_own_declines is not None:
        write_own_declines(run, r)
    # stopping early (stop_after) is the library's, in this process
    summary = launched(run, "ppo", r) if stop_after is None else None
    return summary or run_here(run, "ppo", r, stop_after=stop_after)
