"""``palate reward train``: Bradley-Terry training of a reward model (or an ensemble of them).

:meth:`RewardTrainer.train` reads like the steps it takes: encode the comparisons → batches of
pairs → the preference loss → optimiser step → held-out evaluation → checkpoint → normalise the
scores → save. The step loop itself is the one every trainer shares
(:func:`palate.training.run_steps`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from palate.data import Comparison, prompt_text, read_records, split_heldout, write_jsonl
from palate.errors import ConfigError
from palate.progress import console
from palate.reward.config import RewardConfig
from palate.reward.loss import preference_loss
from palate.reward.metrics import preference_metrics, score_comparisons
from palate.reward.model import (
    META_FILE,
    EncodedPair,
    RewardEnsemble,
    RewardModel,
    encode_pairs,
    forward_pairs,
)
from palate.reward.normalize import fit_normalisation, reference_set
from palate.rundir import RunDir
from palate.training import (
    LoopResult,
    StepTrainer,
    apply_lora,
    autocast,
    disable_dropout,
    epoch_order,
    freeze_bottom,
    grouped_order,
    length_grouped_order,
    resolve_precision,
)

__all__ = ["RewardTrainer", "split_comparisons", "train_reward"]


def train_reward(cfg: RewardConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """``palate reward train``: Bradley-Terry training, normalisation, held-out evaluation.

    ``stop_after=k`` stops after optimiser step k with a checkpoint, as if interrupted.
    """
    if cfg.ensemble > 1:
        return train_ensemble(cfg, stop_after=stop_after)
    return RewardTrainer(cfg).train(stop_after=stop_after)


def split_comparisons(cfg: RewardConfig) -> tuple[list[Comparison], list[Comparison]]:
    """(training, held-out) comparisons: ``eval_data``, or a seeded split of ``data`` (by
    comparison, or by whole prompts)."""
    comps = kept_sources(read_records(cfg.data, "comparisons").records, cfg)[: cfg.max_examples]
    if not comps:
        raise ConfigError(f"{cfg.data}: no comparisons (after reward.sources)")
    if cfg.eval_data:
        return comps, kept_sources(read_records(cfg.eval_data, "comparisons").records, cfg)
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    by_prompt = cfg.split_by == "prompt"
    train, heldout = split_heldout(
        comps,
        cfg.eval_fraction,
        seed,
        group=(lambda c: prompt_text(c.prompt)) if by_prompt else None,
    )
    if not train:
        raise ConfigError(f"{cfg.data}: no training comparisons left after the held-out split")
    return train, heldout


def kept_sources(comps: list[Comparison], cfg: RewardConfig) -> list[Comparison]:
    """The comparisons whose source has a non-zero weight in ``cfg.sources``."""
    return [c for c in comps if cfg.sources.get(c.source, 1.0) > 0]


class RewardTrainer(StepTrainer[RewardConfig]):
    """One reward model: its data, model, optimiser and run directory."""

    stage = "reward"

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg, cfg.train, cfg.optim)
        self.train_comps, self.eval_comps = split_comparisons(cfg)
        if self.acc.is_main_process and self.eval_comps and not cfg.eval_data:
            write_jsonl(self.run.path / "heldout.jsonl", self.eval_comps)
        self.rm = self._model()
        self.pairs_seen = 0

    def _model(self) -> RewardModel:
        """Backbone + fresh scalar head, LoRA or frozen bottom layers, checkpoint weights."""
        cfg = self.cfg
        rm = RewardModel.from_backbone(cfg.model, cfg.max_length, cfg.pooling, cfg.head_init)
        disable_dropout(rm.model)
        if cfg.finetune == "lora":
            rm.model = apply_lora(rm.model, cfg.lora, task_type="SEQ_CLS")
        else:
            freeze_bottom(rm.model, cfg.freeze_layers)
        if self.ckpt is not None:
            from safetensors.torch import load_file

            state_dict = load_file(self.ckpt / "trainable.safetensors")
            missing = set(state_dict) - {n for n, _ in rm.model.named_parameters()}
            if missing:
                raise ConfigError(
                    f"{self.ckpt}: checkpoint does not match the model ({sorted(missing)[:3]})"
                )
            rm.model.load_state_dict(state_dict, strict=False)
        rm.model.train()
        rm.precision = self.precision
        return rm

    # ----------------------------------------------------------------- the stage

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        self.train_pairs, self.eval_pairs = self.encode()  # comparisons → token ids
        reference = reference_responses(self.cfg, self.train_comps, self.precision)
        self.rm.model = self.prepare(self.rm.model, len(self.train_pairs))  # optimiser, resume
        eval_start = self.evaluate() if self.start_step == 0 else {}
        if eval_start:
            self.metrics.log(0, eval_start)
        # batches of pairs → preference loss → optimiser step → held-out evaluation → checkpoint
        result = self.optimise(stop_after=stop_after)
        summary = self.summary(result, eval_start)
        if result.stopped:
            summary["stopped_at"] = result.step
            return summary
        self.rm.model = self.acc.unwrap_model(self.rm.model)
        self.rm.model.eval()
        if reference is not None:  # gain and offset: the initial policy's rewards ~ (0, 1)
            summary.update(normalise(self.rm, self.cfg, reference))
        summary["offset"], summary["gain"] = self.rm.offset, self.rm.gain
        if self.acc.is_main_process:
            self.save(summary)
        self.acc.end_training()
        return summary

    # ----------------------------------------------------------------- the steps

    def encode(self) -> tuple[list[EncodedPair], list[EncodedPair]]:
        """Token ids of every training and held-out pair; reports truncation."""
        use_margin = self.cfg.loss.use_margin
        train_pairs = encode_pairs(self.rm, self.train_comps, use_margin, self.cfg.sources)
        eval_pairs = encode_pairs(self.rm, self.eval_comps, use_margin)
        both = train_pairs + eval_pairs
        self.truncated = sum(p.chosen.truncated or p.rejected.truncated for p in both)
        if self.truncated and self.acc.is_main_process:
            console.print(
                f"[yellow]{self.truncated} of {len(both)} pairs truncated to "
                f"max_length={self.cfg.max_length} (prompt from the left; responses kept whole "
                "when they fit)"
            )
        return train_pairs, eval_pairs

    def batches(self, epoch: int) -> list[int]:
        """The epoch's order of training pairs (similar lengths batched together by default, or
        each prompt's pairs together)."""
        cfg = self.cfg
        if cfg.train.group_by_prompt:
            prompts = [prompt_text(c.prompt) for c in self.train_comps]
            return grouped_order(prompts, cfg.seed, epoch)
        if cfg.train.group_by_length:
            lengths = [p.length for p in self.train_pairs]
            return length_grouped_order(lengths, cfg.train.batch_size, cfg.seed, epoch)
        return epoch_order(len(self.train_pairs), cfg.seed, epoch)

    def pair_losses(
        self, pairs: list[EncodedPair], r_chosen: torch.Tensor, r_rejected: torch.Tensor
    ) -> torch.Tensor:  # (B,)
        """The Bradley-Terry loss of each pair (margins, soft labels, ties, smoothing)."""
        device = r_chosen.device
        return preference_loss(
            r_chosen,
            r_rejected,
            margin=torch.tensor([p.margin for p in pairs], device=device),
            prob_chosen=torch.tensor([p.prob_chosen for p in pairs], device=device),
            tie=torch.tensor([p.tie for p in pairs], device=device),
            label_smoothing=self.cfg.loss.label_smoothing,
            center_coef=self.cfg.loss.center_coef,
        )

    def units(self, micro_batch: list[int]) -> int:
        return len(micro_batch)  # the loss is a mean over pairs

    def loss(self, micro_batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss of a micro-batch of training pairs, and summed statistics."""
        pairs = [self.train_pairs[j] for j in micro_batch]
        with autocast(self.device, self.precision):
            r_c, r_r = forward_pairs(self.rm, pairs, self.cfg.train.forward_chunks)
        loss = self.pair_losses(pairs, r_c, r_r)
        if self.cfg.sources:  # per-source weights (reward.sources)
            loss = loss * torch.tensor([p.weight for p in pairs], device=loss.device)
        r_c, r_r = r_c.detach(), r_r.detach()
        return loss.sum(), {
            "correct": float((r_c > r_r).sum()),
            "margin": float((r_c - r_r).sum()),
            "reward": float((r_c + r_r).sum() / 2),
        }

    def after_step(
        self, step: int, epoch_done: bool, stats: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        """The step's metrics row; held-out evaluation at epoch ends (or every eval_every)."""
        n = stats["units"]  # pairs in the step, all processes (stats are summed over them)
        self.pairs_seen += int(n)
        row: dict[str, Any] = {
            "train/accuracy": stats["correct"] / n,
            "train/margin": stats["margin"] / n,
            "train/mean_reward": stats["reward"] / n,
            "train/pairs_per_s": n / seconds,
        }
        every = self.cfg.train.eval_every
        if epoch_done or (every and step % every == 0):
            row.update(self.evaluate())
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and accuracy (on pairs with a decided preference)."""
        pairs = self.eval_pairs
        if not pairs:
            return {}
        model = self.rm.model
        was = model.training
        model.eval()
        losses, correct, decided_count = 0.0, 0, 0
        try:
            size = self.cfg.train.batch_size * 2
            order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
            for start in range(0, len(order), size):
                chunk = [pairs[j] for j in order[start : start + size]]
                with autocast(self.device, self.precision):
                    r_c, r_r = forward_pairs(self.rm, chunk, self.cfg.train.forward_chunks)
                losses += float(self.pair_losses(chunk, r_c, r_r).sum())
                decided = torch.tensor([not p.tie and p.prob_chosen != 0.5 for p in chunk])
                prefers_chosen = torch.tensor([p.prob_chosen > 0.5 for p in chunk])
                ok = ((r_c > r_r).cpu() == prefers_chosen)[decided]
                correct += int(ok.sum())
                decided_count += int(decided.sum())
        finally:
            model.train(was)
        return {"eval/loss": losses / len(pairs), "eval/accuracy": correct / max(decided_count, 1)}

    def save_weights(self, path: Path) -> None:
        """The trainable weights (the head, and the backbone or its adapters)."""
        from safetensors.torch import save_file

        model = self.acc.unwrap_model(self.rm.model)
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(trainable, path / "trainable.safetensors")

    def save(self, summary: dict[str, Any]) -> None:
        """``final/``, the held-out metrics of the saved model, and ``summary.json``."""
        self.rm.save(self.run.final)
        summary["final"] = str(self.run.final)
        if self.eval_comps:
            r_c, r_r = score_comparisons(self.rm, self.eval_comps, self.cfg.train.batch_size * 2)
            heldout = preference_metrics(self.eval_comps, r_c, r_r, self.rm.tokenizer)
            summary.update({f"eval_{k}": v for k, v in heldout.items()})
        self.run.write_summary(summary)

    def summary(self, result: LoopResult, eval_start: dict[str, float]) -> dict[str, Any]:
        return {
            "stage": "reward",
            "output_dir": str(self.run.path),
            "steps": result.step,
            "total_steps": self.steps,
            "train_pairs": len(self.train_pairs),
            "eval_pairs": len(self.eval_pairs),
            "train_loss": result.last.get("train/loss"),
            "eval_accuracy_before": eval_start.get("eval/accuracy"),
            "pairs_per_s": self.pairs_seen / result.seconds if result.seconds else None,
            "train_seconds": result.seconds,
            "precision": self.precision,
            "processes": self.acc.num_processes,
            "truncated_pairs": self.truncated,
        }


# --------------------------------------------------------------------------- ensembles


def train_ensemble(cfg: RewardConfig, *, stop_after: int | None) -> dict[str, Any]:
    """Train ``cfg.ensemble`` members in ``RUN/members/member-k`` (each resumable on its own),
    then normalise, save and evaluate their average as ``RUN/final``."""
    run = RunDir(cfg.output_dir)
    run.create(cfg)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    members: list[dict[str, Any]] = []
    train_c, eval_c = split_comparisons(cfg)  # the members' split (split_seed, else seed)
    reference = reference_responses(
        cfg,
        train_c,
        resolve_precision(cfg.precision, "cuda" if torch.cuda.is_available() else "cpu"),
    )
    for k in range(cfg.ensemble):
        member_dir = run.path / "members" / f"member-{k}"
        sub = cfg.model_copy(
            update={
                "normalize": cfg.normalize.model_copy(update={"enabled": False}),
                "ensemble": 1,
                "seed": cfg.seed + k,
                "split_seed": split_seed,
                "output_dir": str(member_dir),
            }
        )
        if (member_dir / "summary.json").is_file() and (member_dir / "final" / META_FILE).is_file():
            members.append(json.loads((member_dir / "summary.json").read_text()))
            continue
        console.print(f"ensemble member {k + 1}/{cfg.ensemble} (seed {sub.seed})")
        summary = train_reward(sub, stop_after=stop_after)
        if "stopped_at" in summary:
            return {"stage": "reward", "output_dir": str(run.path), "member": k, **summary}
        members.append(summary)
    ens = RewardEnsemble([RewardModel.load(Path(m["final"])) for m in members])
    ens.precision = resolve_precision(cfg.precision, ens.device)
    fitted = normalise(ens, cfg, reference) if reference is not None else {}
    ens.save(run.final)
    summary = {
        **fitted,
        "stage": "reward",
        "output_dir": str(run.path),
        "final": str(run.final),
        "ensemble": cfg.ensemble,
        "train_pairs": len(train_c),
        "eval_pairs": len(eval_c),
        "train_seconds": sum(m.get("train_seconds") or 0 for m in members),
        "member_eval_accuracy": [m.get("eval_accuracy") for m in members],
        "offset": ens.offset,
        "gain": ens.gain,
        "truncated_pairs": members[0].get("truncated_pairs"),
        "precision": ens.precision,
    }
    if eval_c:
        if not cfg.eval_data:
            write_jsonl(run.path / "heldout.jsonl", eval_c)
        r_c, r_r = score_comparisons(ens, eval_c, cfg.train.batch_size * 2)
        heldout = preference_metrics(eval_c, r_c, r_r, ens.tokenizer)
        summary.update({f"eval_{k}": v for k, v in heldout.items()})
    run.write_summary(summary)
    return summary


Reference = tuple[list[Any], list[str], str]  # (prompts, responses, where they came from)


def reference_responses(
    cfg: RewardConfig, comparisons: list[Comparison], precision: str
) -> Reference | None:
    """The responses normalisation will be fitted on, gathered *before* training so a bad
    file or policy fails fast; None when normalisation is off."""
    if not cfg.normalize.enabled:
        return None
    return reference_set(cfg.normalize, comparisons, precision=precision, seed=cfg.seed)


def normalise(
    scorer: RewardModel | RewardEnsemble, cfg: RewardConfig, reference: Reference
) -> dict[str, Any]:
    """Fit the scorer's gain and offset on ``reference``; the summary's fields."""
    prompts, responses, source = reference
    settings = cfg.normalize
    fitted = fit_normalisation(
        scorer,
        prompts,
        responses,
        target_mean=settings.target_mean,
        target_std=settings.target_std,
        batch_size=cfg.train.batch_size * 2,
    )
    console.print(
        f"normalised on {len(responses)} responses ({source}): raw mean "
        f"{fitted['raw_mean']:.3f}, std {fitted['raw_std']:.3f} → gain {fitted['gain']:.3f}, "
        f"offset {fitted['offset']:.3f}"
    )
    return {
        "normalize_source": source,
        "normalize_samples": len(responses),
        "normalize_raw_mean": fitted["raw_mean"],
        "normalize_raw_std": fitted["raw_std"],
    }
