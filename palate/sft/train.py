"""``palate sft``: supervised fine-tuning on demonstrations.

:meth:`SFTTrainer.train` reads like the steps it takes: tokenize the demonstrations → batches →
response-token cross-entropy → optimiser step → held-out loss and greedy samples at each epoch
end → checkpoint → save ``final/``. The step loop is the one every trainer shares
(:func:`palate.training.run_steps`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from palate.data import Demonstration, prompt_text, read_records, split_heldout, write_jsonl
from palate.errors import ConfigError
from palate.lm import IGNORE_INDEX, response_cross_entropy
from palate.models import load_model
from palate.progress import console
from palate.sampling import SamplingConfig, generate_responses
from palate.sft.config import SFTConfig
from palate.sft.data import Example, collate, tokenize_demonstration
from palate.training import (
    LoopResult,
    StepTrainer,
    apply_lora,
    autocast,
    disable_dropout,
    epoch_order,
    total_steps,
)

__all__ = ["SFTTrainer", "evaluate_loss", "load_demonstrations", "save_model", "sft"]


def sft(cfg: SFTConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run supervised fine-tuning; returns the summary (also ``summary.json``).

    ``stop_after=k`` stops after optimiser step k with a checkpoint, as if interrupted (used to
    test exact resume). Ctrl-C also saves a checkpoint before exiting.
    """
    return SFTTrainer(cfg).train(stop_after=stop_after)


def load_demonstrations(cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    """(training, held-out) demonstrations: ``eval_data``, or a seeded split of ``data``."""
    report = read_records(cfg.data, "demonstrations")
    if report.skipped:
        console.print(
            f"{cfg.data}: {report.skipped} row(s) skipped ({dict(report.warnings)}), "
            f"{len(report.records)} demonstrations"
        )
    demos = list(report.records)[: cfg.max_examples]
    if cfg.eval_data:
        train, heldout = demos, list(read_records(cfg.eval_data, "demonstrations").records)
    else:
        train, heldout = split_heldout(demos, cfg.eval_fraction, cfg.seed)
    if not train:
        raise ConfigError(f"{cfg.data}: no training demonstrations left after the held-out split")
    return train, heldout


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
            batch = collate(examples[i : i + batch_size], pad_id)
            with autocast(device, precision):
                ce, n = response_cross_entropy(
                    model, {k: v.to(device) for k, v in batch.items()}, fast=fast
                )
            total += float(ce)
            count += int(n)
    finally:
        model.train(was)
    return total / count if count else float("nan")


def save_model(model: Any, tokenizer: Any, path: Path, *, merged: bool, base_spec: str) -> None:
    """Save an HF model (LoRA merged in when ``merged``) and its tokenizer; a saved adapter
    points at the portable ``base_spec``, not a cache path."""
    path.mkdir(parents=True, exist_ok=True)
    if merged and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        data = json.loads(adapter_cfg.read_text())
        data["base_model_name_or_path"] = base_spec
        adapter_cfg.write_text(json.dumps(data, indent=2))


class SFTTrainer(StepTrainer[SFTConfig]):
    """One fine-tuning run: demonstrations, model (LoRA or full), optimiser, run directory."""

    stage = "sft"

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg, cfg.train, cfg.optim)
        self.train_demos, self.eval_demos = load_demonstrations(cfg)
        self.model, self.tok = self._model()
        self.pad_id = self.tok.pad_token_id
        self.fast = cfg.train.fast_lm_head and self.acc.num_processes == 1
        self.tokens_seen = 0

    def _model(self) -> tuple[Any, Any]:
        """The model to train: fresh LoRA adapters or all weights, or the checkpoint's."""
        cfg, ckpt = self.cfg, self.ckpt
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
        return model, tok

    # ----------------------------------------------------------------- the stage

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        self.train_ex, self.eval_ex = self.tokenize()  # demonstrations → token ids
        self.n_targets = [sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in self.train_ex]
        one_epoch = cfg.train.model_copy(update={"max_steps": None, "epochs": 1})
        self.steps_per_epoch = total_steps(one_epoch, len(self.train_ex), self.acc.num_processes)
        self.model = self.prepare(self.model, len(self.train_ex))  # optimiser, resume
        self.eval_before: float | None = None
        if self.start_step == 0:
            before = self.evaluate()
            self.metrics.log(0, {"eval/loss": before, "eval/ppl": math.exp(min(before, 50))})
            self.write_samples("epoch-000")
            self.eval_before = before
        else:
            first = [r for r in self.run.metrics() if r["step"] == 0 and "eval/loss" in r]
            self.eval_before = first[0]["eval/loss"] if first else None
        self.eval_after: float | None = self.eval_before
        # batches → response-token cross-entropy → optimiser step → held-out loss → checkpoint
        result = self.optimise(stop_after=stop_after)
        summary = self.summary(result)
        if result.stopped:
            summary["stopped_at"] = result.step
            return summary
        if self.acc.is_main_process:
            save_model(
                self.acc.unwrap_model(self.model),
                self.tok,
                self.run.final,
                merged=cfg.save == "merged",
                base_spec=cfg.model,
            )
            summary["final"] = str(self.run.final)
            self.run.write_summary(summary)
        self.acc.end_training()
        return summary

    # ----------------------------------------------------------------- the steps

    def tokenize(self) -> tuple[list[Example], list[Example]]:
        """Training and held-out examples; reports truncation."""
        cfg = self.cfg
        train_ex = [tokenize_demonstration(self.tok, d, cfg.max_length) for d in self.train_demos]
        eval_ex = [tokenize_demonstration(self.tok, d, cfg.max_length) for d in self.eval_demos]
        both = train_ex + eval_ex
        self.truncated = {
            "prompt": sum(e.truncated == "prompt" for e in both),
            "response": sum(e.truncated == "response" for e in both),
        }
        if any(self.truncated.values()) and self.acc.is_main_process:
            console.print(
                f"[yellow]truncated to max_length={cfg.max_length}: "
                f"{self.truncated['prompt']} prompts (from the left), "
                f"{self.truncated['response']} responses (from the right, no EOS)"
            )
        return train_ex, eval_ex

    def batches(self, epoch: int) -> list[int]:
        return epoch_order(len(self.train_ex), self.cfg.seed, epoch)

    def units(self, micro_batch: list[int]) -> int:
        return sum(self.n_targets[j] for j in micro_batch)  # a mean over response tokens

    def loss(self, micro_batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed response-token cross-entropy of a micro-batch, and its token count."""
        batch = collate([self.train_ex[j] for j in micro_batch], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, self.precision):
            ce, _ = response_cross_entropy(self.model, batch, fast=self.fast)
        return ce, {"tokens": float(batch["attention_mask"].sum())}

    def after_step(
        self, step: int, epoch_done: bool, stats: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        self.tokens_seen += int(stats["tokens"])  # all processes (stats are summed over them)
        row: dict[str, Any] = {
            "train/tokens_per_s": stats["tokens"] / seconds,
            "train/response_tokens": stats["units"],
        }
        if epoch_done and self.eval_ex:
            self.eval_after = self.evaluate()
            row["eval/loss"] = self.eval_after
            row["eval/ppl"] = math.exp(min(self.eval_after, 50))
            self.write_samples(f"epoch-{math.ceil(step / self.steps_per_epoch):03d}")
        return row

    def evaluate(self) -> float:
        """Mean held-out cross-entropy per response token."""
        return evaluate_loss(
            self.model,
            self.eval_ex,
            self.pad_id,
            self.cfg.train.batch_size,
            self.device,
            self.precision,
            self.fast,
        )

    def write_samples(self, tag: str) -> None:
        """Greedy answers to the first held-out prompts, next to the references."""
        cfg = self.cfg
        if not (cfg.sample_prompts and self.eval_demos and self.acc.is_main_process):
            return
        chosen = self.eval_demos[: cfg.sample_prompts]
        gens = generate_responses(
            self.acc.unwrap_model(self.model),
            self.tok,
            [d.prompt for d in chosen],
            SamplingConfig(temperature=0.0, max_new_tokens=cfg.sample_max_new_tokens),
        )
        rows = [
            {"prompt": prompt_text(d.prompt), "response": g.text, "reference": d.response}
            for d, g in zip(chosen, gens, strict=True)
        ]
        write_jsonl(self.run.path / "samples" / f"{tag}.jsonl", rows)

    def save_weights(self, path: Path) -> None:
        """The LoRA adapter or the full model, as an HF directory."""
        save_model(
            self.acc.unwrap_model(self.model),
            self.tok,
            path / "model",
            merged=False,
            base_spec=self.cfg.model,
        )

    def summary(self, result: LoopResult) -> dict[str, Any]:
        seconds = result.seconds
        return {
            "stage": "sft",
            "output_dir": str(self.run.path),
            "steps": result.step,
            "total_steps": self.steps,
            "train_examples": len(self.train_ex),
            "eval_examples": len(self.eval_ex),
            "train_loss": result.last.get("train/loss"),
            "eval_loss_before": self.eval_before,
            "eval_loss_after": self.eval_after,
            "tokens_per_s": self.tokens_seen / seconds if seconds else None,
            "train_seconds": seconds,
            "precision": self.precision,
            "processes": self.acc.num_processes,
            "finetune": self.cfg.finetune,
            "truncated_prompts": self.truncated["prompt"],
            "truncated_responses": self.truncated["response"],
        }
