"""Step 1 — supervised fine-tuning (SFT) on demonstrations.

The model learns to produce the demonstrated response given the prompt: cross-entropy on the
*response* tokens only (prompt tokens are masked out of the labels), with EOS appended to every
response so the model learns to stop. This is the starting point (π_SFT) that RLHF refines and
the reference the PPO KL penalty keeps the policy close to.

Where things are:

* :func:`tokenize_demonstration` — prompt (chat template) + response + EOS, labels masked,
  truncation from the left of the prompt, reported.
* :func:`sft_loss` — the loss, a pure function of logits and labels.
* :func:`sft` — the training loop (``palate sft CONFIG.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from palate.config import Config
from palate.data import Demonstration, prompt_text, read_records, split_heldout, write_jsonl
from palate.errors import ConfigError
from palate.formatting import prompt_ids, response_ids
from palate.generation import SamplingConfig, generate_responses
from palate.lm import selected_logits
from palate.models import load_model
from palate.progress import console
from palate.training import (
    LoraSettings,
    OptimSettings,
    TrainSettings,
    apply_lora,
    autocast,
    begin_stage,
    build_optimizer,
    disable_dropout,
    epoch_order,
    prune_checkpoints,
    resume_training,
    run_steps,
    save_training_state,
    total_steps,
    trainable_parameters,
)

__all__ = ["IGNORE_INDEX", "Example", "SFTConfig", "collate", "sft", "sft_loss"]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- config


class SFTTrainSettings(TrainSettings):
    """Batching, schedule and checkpointing for SFT."""

    fast_lm_head: bool = Field(
        True,
        description="Apply the LM head only at response positions (faster; off under DDP).",
    )


class SFTConfig(Config):
    """Config for ``palate sft``."""

    model: str = Field(
        "smollm2-135m-instruct", description="Model spec to fine-tune (see `palate models list`)."
    )
    data: str = Field(
        description="Demonstrations JSONL (a comparisons/HH file also works: chosen replies)."
    )
    eval_data: str | None = Field(
        None, description="Held-out demonstrations; default: split eval_fraction off `data`."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of `data` held out when eval_data is not given."
    )
    max_examples: int | None = Field(
        None, ge=1, description="Use only the first N demonstrations of `data` (before the split)."
    )
    output_dir: str = Field(description="Run directory.")
    seed: int = Field(0, description="Seed for the split, data order and initialisation.")
    max_length: int = Field(
        512, ge=8, description="Max tokens of prompt + response; prompts are cut from the left."
    )
    finetune: Literal["lora", "full"] = Field(
        "lora", description="Train LoRA adapters (default) or all weights."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimiser.")
    train: SFTTrainSettings = Field(default_factory=SFTTrainSettings, description="Training.")
    save: Literal["merged", "adapter"] = Field(
        "merged",
        description="LoRA only: save final/ as a plain merged HF model, or as the adapter alone.",
    )
    sample_prompts: int = Field(
        4, ge=0, description="Held-out prompts answered (greedy) after each epoch, for a look."
    )
    sample_max_new_tokens: int = Field(64, ge=1, description="Length of those sample answers.")
    tracker: str = Field(
        "none", description="Experiment tracker via accelerate: none, tensorboard, wandb, trackio."
    )
    resume: bool = Field(True, description="Continue from the newest checkpoint in output_dir.")


# --------------------------------------------------------------------------- data → tensors


@dataclass
class Example:
    """One tokenized demonstration."""

    input_ids: list[int]  # prompt ids + response ids (+ EOS)
    labels: list[int]  # IGNORE_INDEX on prompt positions, the token id on response positions
    truncated: str | None = None  # None, "prompt" or "response"


def tokenize_demonstration(tokenizer: Any, demo: Demonstration, max_length: int) -> Example:
    """Prompt (chat template) + response + EOS; prompt tokens masked in the labels.

    Too long: the prompt loses tokens from the left (the response is what we train on). If the
    response alone does not fit, it is cut from the right (it then has no EOS).
    """
    p = prompt_ids(tokenizer, demo.prompt)
    r = response_ids(tokenizer, demo.response)
    truncated = None
    if len(p) + len(r) > max_length:
        min_prompt = min(len(p), max(1, max_length // 4))
        if len(r) > max_length - min_prompt:
            r = r[: max_length - min_prompt]
            truncated = "response"
        else:
            truncated = "prompt"
        p = p[len(p) - (max_length - len(r)) :]
    return Example(p + r, [IGNORE_INDEX] * len(p) + r, truncated)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``/``attention_mask``/``labels`` tensors, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- the loss


def sft_loss(
    logits: torch.Tensor,  # (B, T, V) next-token logits at every position
    labels: torch.Tensor,  # (B, T) token ids, IGNORE_INDEX where no loss (prompt, padding)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token cross-entropies, number of response tokens).

    Position t predicts token t+1, so logits are shifted against labels. Returning the sum lets
    callers normalise by the token count of a whole optimiser step (gradient accumulation and
    several processes then give the same update as one big batch).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum")
    return ce, mask.sum()


def _response_ce(model: Any, batch: dict[str, torch.Tensor], fast: bool) -> tuple[Any, Any]:
    """``sft_loss`` computed with the LM head applied at response positions only."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = targets != IGNORE_INDEX
    logits = selected_logits(
        model, batch["input_ids"], batch["attention_mask"], positions, fast=fast
    )  # (N, V)
    ce = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")
    return ce, positions.sum()


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    fast: bool = True,
) -> float:
    """Mean cross-entropy per response token over ``examples`` (nan when empty)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {
                k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()
            }
            with autocast(device, precision):
                ce, n = _response_ce(model, batch, fast)
            total += float(ce)
            count += int(n)
    finally:
        model.train(was)
    return total / count if count else float("nan")


# --------------------------------------------------------------------------- the stage


def _load_demos(cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    report = read_records(cfg.data, "demonstrations")
    if report.skipped:
        console.print(
            f"{cfg.data}: {report.skipped} row(s) skipped ({dict(report.warnings)}), "
            f"{len(report.records)} demonstrations"
        )
    demos = list(report.records)[: cfg.max_examples]
    if cfg.eval_data:
        return demos, list(read_records(cfg.eval_data, "demonstrations").records)
    return split_heldout(demos, cfg.eval_fraction, cfg.seed)


def _save_model(model: Any, tokenizer: Any, path: Path, *, merged: bool, base_spec: str) -> None:
    import json

    path.mkdir(parents=True, exist_ok=True)
    if merged and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():  # point the adapter at the portable spec, not a cache path
        data = json.loads(adapter_cfg.read_text())
        data["base_model_name_or_path"] = base_spec
        adapter_cfg.write_text(json.dumps(data, indent=2))


def sft(cfg: SFTConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run supervised fine-tuning; returns the summary (also ``summary.json``).

    ``stop_after=k`` stops after optimiser step k with a checkpoint, as if interrupted (used to
    test exact resume). Ctrl-C also saves a checkpoint before exiting.
    """
    acc, run, device, precision = begin_stage(cfg, cfg.train.precision)

    train_demos, eval_demos = _load_demos(cfg)
    if not train_demos:
        raise ConfigError(f"{cfg.data}: no training demonstrations left after the held-out split")
    ckpt = run.latest_checkpoint() if cfg.resume else None

    if cfg.finetune == "full" and ckpt is not None:
        model, tok = load_model(str(ckpt / "model"))
    else:
        model, tok = load_model(cfg.model)
    disable_dropout(model)
    if cfg.finetune == "lora":
        if ckpt is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ckpt / "model", is_trainable=True)
        else:
            model = apply_lora(model, cfg.lora)
    model.train()

    train_ex = [tokenize_demonstration(tok, d, cfg.max_length) for d in train_demos]
    eval_ex = [tokenize_demonstration(tok, d, cfg.max_length) for d in eval_demos]
    truncated = {
        "prompt": sum(e.truncated == "prompt" for e in train_ex + eval_ex),
        "response": sum(e.truncated == "response" for e in train_ex + eval_ex),
    }
    if any(truncated.values()) and acc.is_main_process:
        console.print(
            f"[yellow]truncated to max_length={cfg.max_length}: {truncated['prompt']} prompts "
            f"(from the left), {truncated['response']} responses (from the right, no EOS)"
        )

    world = acc.num_processes
    steps = total_steps(cfg.train, len(train_ex), world)
    steps_per_epoch = total_steps(
        cfg.train.model_copy(update={"max_steps": None, "epochs": 1}), len(train_ex), world
    )
    params = trainable_parameters(model)
    optimizer, scheduler = build_optimizer(params, cfg.optim, steps)
    model, optimizer = acc.prepare(model, optimizer)
    fast = cfg.train.fast_lm_head and world == 1
    pad_id = tok.pad_token_id

    step, metrics = resume_training(
        acc=acc, run=run, ckpt=ckpt, optimizer=optimizer, scheduler=scheduler, total=steps,
        tracker=cfg.tracker, project="palate-sft", cfg=cfg,
    )  # fmt: skip

    def do_eval() -> float:
        return evaluate_loss(model, eval_ex, pad_id, cfg.train.batch_size, device, precision, fast)

    def do_samples(tag: str) -> None:
        if not (cfg.sample_prompts and eval_demos and acc.is_main_process):
            return
        chosen = eval_demos[: cfg.sample_prompts]
        gens = generate_responses(
            acc.unwrap_model(model),
            tok,
            [d.prompt for d in chosen],
            SamplingConfig(temperature=0.0, max_new_tokens=cfg.sample_max_new_tokens),
        )
        rows = [
            {"prompt": prompt_text(d.prompt), "response": g.text, "reference": d.response}
            for d, g in zip(chosen, gens, strict=True)
        ]
        write_jsonl(run.path / "samples" / f"{tag}.jsonl", rows)

    def checkpoint(at: int) -> None:
        if not acc.is_main_process:
            return
        path = run.checkpoint_dir(at)
        _save_model(acc.unwrap_model(model), tok, path / "model", merged=False, base_spec=cfg.model)
        save_training_state(
            path,
            optimizer=optimizer,
            scheduler=scheduler,
            state={"step": at, "total_steps": steps, "stage": "sft"},
        )
        prune_checkpoints(run.checkpoints, cfg.train.keep_checkpoints)

    eval_before = None
    if step == 0:
        eval_before = do_eval()
        metrics.log(0, {"eval/loss": eval_before, "eval/ppl": math.exp(min(eval_before, 50))})
        do_samples("epoch-000")
    else:
        first = next((r for r in run.metrics() if r["step"] == 0 and "eval/loss" in r), None)
        eval_before = first["eval/loss"] if first else None
    eval_after = eval_before
    n_targets = [sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in train_ex]
    tokens_seen = 0

    def loss_sum(mb: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(device) for k, v in collate([train_ex[j] for j in mb], pad_id).items()}
        with autocast(device, precision):
            ce, _ = _response_ce(model, batch, fast)
        return ce, {"tokens": float(batch["attention_mask"].sum())}

    def after_step(at: int, epoch_done: bool, stats: dict[str, float], dt: float) -> dict:
        nonlocal eval_after, tokens_seen
        tokens_seen += int(stats["tokens"])
        row: dict[str, Any] = {
            "train/tokens_per_s": stats["tokens"] * world / dt,
            "train/response_tokens": stats["units"],
        }
        if epoch_done and eval_ex:
            eval_after = do_eval()
            row["eval/loss"] = eval_after
            row["eval/ppl"] = math.exp(min(eval_after, 50))
            do_samples(f"epoch-{math.ceil(at / steps_per_epoch):03d}")
        return row

    result = run_steps(
        acc=acc,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        settings=cfg.train,
        max_grad_norm=cfg.optim.max_grad_norm,
        order=lambda epoch: epoch_order(len(train_ex), cfg.seed, epoch),
        n_examples=len(train_ex),
        start_step=step,
        units=lambda mb: sum(n_targets[j] for j in mb),
        loss_sum=loss_sum,
        after_step=after_step,
        checkpoint=checkpoint,
        metrics=metrics,
        desc="sft",
        stop_after=stop_after,
    )
    metrics.close()
    step, stopped, last_loss = result.step, result.stopped, result.last.get("train/loss")
    train_time = result.seconds
    summary: dict[str, Any] = {
        "stage": "sft",
        "output_dir": str(run.path),
        "steps": step,
        "total_steps": steps,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "train_loss": last_loss,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "tokens_per_s": tokens_seen * world / train_time if train_time else None,
        "train_seconds": train_time,
        "precision": precision,
        "finetune": cfg.finetune,
        "truncated_prompts": truncated["prompt"],
        "truncated_responses": truncated["response"],
    }
    if stopped:
        summary["stopped_at"] = step
        return summary
    if acc.is_main_process:
        _save_model(
            acc.unwrap_model(model),
            tok,
            run.final,
            merged=cfg.save == "merged",
            base_spec=cfg.model,
        )
        summary["final"] = str(run.final)
        run.write_summary(summary)
    acc.end_training()
    return summary
