"""Training plumbing shared by SFT, the reward model and PPO.

Precision (bf16 autocast where the hardware has it), LoRA via peft, dropout off, optimizer and
learning-rate schedule, exact checkpoint/resume (weights, optimizer, scheduler, RNG, position),
and accelerate set-up (devices, multi-process, trackers). The RLHF maths lives in the stage
modules; this is the part every trainer needs and none should repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field

from palate.config import Config
from palate.errors import ConfigError
from palate.progress import console, progress_bar
from palate.rundir import MetricsLogger, RunDir

__all__ = [
    "LoraSettings",
    "OptimSettings",
    "StageConfig",
    "StageSettings",
    "StepTrainer",
    "Tracker",
    "TrainSettings",
    "autocast",
    "begin_stage",
    "bf16_supported",
    "build_optimizer",
    "check_engine",
    "disable_dropout",
    "make_accelerator",
    "resolve_precision",
    "rank_rng",
    "restore_rng",
    "resume_training",
    "rng_state",
    "run_steps",
    "seed_everything",
    "store_frozen_linears",
]


class LoraSettings(Config):
    """LoRA adapters (peft). Used when ``finetune: lora``."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (effective scale alpha/r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' or a list of module names (q_proj, ...).",
    )


class OptimSettings(Config):
    """Optimiser and learning-rate schedule."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (added to √v̂).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up: cosine, linear (to 0) or constant."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Fraction of optimiser steps spent warming up linearly."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this (null = no clipping)."
    )


# Experiment trackers accelerate can log to.
Tracker = Literal[
    "none",
    "tensorboard",
    "wandb",
    "trackio",
    "mlflow",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
]


class StageSettings(Config):
    """What every training stage (SFT, reward model, PPO) has, under the same names."""

    seed: int = Field(
        0, description="Seed for the data split and order, initialisation and sampling."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast where the hardware supports it (auto), or force one."
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N optimiser steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    resume: bool = Field(True, description="Continue from the newest checkpoint in output_dir.")
    tracker: Tracker = Field("none", description="Experiment tracker (via accelerate).")


class StageConfig(StageSettings):
    """A training stage's config: its settings plus the run directory it writes."""

    output_dir: str = Field(description="Run directory.")


# --------------------------------------------------------------------------- precision


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast is fast on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → ``bf16`` where supported, else ``fp32``; explicit values are checked."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: expected auto, bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision == 'bf16'`` (weights and optimiser stay fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def store_frozen_linears(model: torch.nn.Module, precision: str) -> int:
    """Under bf16 autocast, store frozen ``nn.Linear`` weights in bf16; returns how many.

    Autocast casts an fp32 weight to bf16 at *every* call (it caches casts only for weights that
    require grad), so a frozen base — LoRA's, a reference policy's, a reward model's — pays a
    full copy of its weights per forward; during generation that is once per token. Storing
    them in bf16 computes exactly the same numbers (autocast would round them the same way),
    halves their memory and skips the casts. Embeddings (and heads tied to them) and norms
    stay fp32, so the residual stream keeps its precision.
    """
    if precision != "bf16":
        return 0
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        if id(module.weight) in tied or module.weight.dtype != torch.float32:
            continue
        module.weight.data = module.weight.data.to(torch.bfloat16)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(torch.bfloat16)
        n += 1
    return n


def freeze_bottom(model: torch.nn.Module, n_layers: int) -> int:
    """Freeze the embeddings and the lowest ``n_layers`` transformer blocks; returns how many
    parameters were frozen. Cheaper steps (no backward below the frozen part) and, on small
    preference sets, less forgetting of what pre-training learned."""
    if n_layers <= 0:
        return 0
    base: Any = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = None
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == getattr(
            model.config, "num_hidden_layers", -1
        ):
            layers = module
            break
    if layers is None:
        raise ConfigError(f"freeze_layers: cannot find the transformer blocks of {type(model)}")
    if n_layers > len(layers):
        raise ConfigError(f"freeze_layers={n_layers} but the model has {len(layers)} layers")
    parts: list[torch.nn.Module] = [
        getattr(base, "embeddings", None) or base.get_input_embeddings()
    ]
    parts += list(layers[:n_layers])
    n = 0
    for part in parts:
        for p in part.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
    return n


# --------------------------------------------------------------------------- models


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF convention: log-probs must be deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def apply_lora(model: Any, settings: LoraSettings, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def build_optimizer(
    params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW plus warm-up and the chosen decay, as a per-step LambdaLR."""
    from transformers import get_scheduler

    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(
        params,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        eps=settings.eps,
        fused=fused or None,  # one kernel for all parameters: faster on CPU and GPU
    )
    warmup = int(round(settings.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(settings.schedule, settings.schedule)
    sched = get_scheduler(
        name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1)
    )
    return opt, sched


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- RNG and checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng(blob: dict[str, Any], rank: int, world: int, seed: int) -> dict[str, Any]:
    """The RNG state this process resumes with: its own when the checkpoint holds one per
    process (``rng_by_rank``, PPO in several processes), else the (rank 0) ``rng``. Resumed in
    another number of processes, ranks beyond the saved ones start fresh streams."""
    per_rank = blob.get("rng_by_rank")
    if per_rank is not None and len(per_rank) == world:
        return per_rank[rank]
    if rank == 0 or per_rank is None:
        return blob["rng"]
    seed_everything(seed + 7919 * rank)
    return rng_state()


def save_training_state(
    ckpt: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write optimizer/scheduler/RNG state, then ``state.json`` last (the completeness marker)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **(extra or {}),
        },
        ckpt / "trainer.pt",
    )
    tmp = ckpt / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, ckpt / "state.json")


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json contents, trainer.pt contents) of a complete checkpoint."""
    state = json.loads((ckpt / "state.json").read_text())
    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    return state, blob


def prune_checkpoints(run: RunDir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints of ``run``."""
    for old in run.complete_checkpoints()[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- accelerate


def make_accelerator(tracker: Tracker, project_dir: str | Path) -> Any:
    """An ``accelerate.Accelerator`` (devices, processes) with an optional experiment tracker.

    Mixed precision is handled by :func:`autocast`, not by accelerate, so bf16 on CPU works the
    same way everywhere.
    """
    from accelerate import Accelerator

    log_with = None if tracker == "none" else tracker
    return Accelerator(log_with=log_with, project_dir=str(project_dir))


def flat_hparams(cfg: Config) -> dict[str, int | float | str | bool]:
    """A config as flat ``a.b: scalar`` pairs (what trackers accept as hyper-parameters)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, bool | int | float | str):
            out[prefix.rstrip(".")] = value
        else:
            out[prefix.rstrip(".")] = json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def start_trackers(accelerator: Any, tracker: Tracker, project: str, cfg: Config) -> None:
    """Start the experiment tracker (if any) with the config as hyper-parameters."""
    if tracker != "none":
        accelerator.init_trackers(project, config=flat_hparams(cfg))


@contextlib.contextmanager
def maybe_no_sync(accelerator: Any, model: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation window."""
    if sync or accelerator.num_processes == 1:
        yield
    else:
        with accelerator.no_sync(model):
            yield


# --------------------------------------------------------------------------- the step loop


class TrainSettings(Config):
    """Batching and schedule (shared by the step-based training stages: SFT, reward model)."""

    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides epochs)."
    )
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    log_every: int = Field(1, ge=1, description="Write a metrics row every N steps.")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): resumable data order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, mega: int = 32
) -> list[int]:
    """Shuffled order in which each run of ``batch_size`` has similar lengths (less padding).

    Shuffle, cut into chunks of ``mega`` batches, sort each chunk by length, then shuffle the
    batches. Deterministic in (seed, epoch), like :func:`epoch_order`.
    """
    order = epoch_order(len(lengths), seed, epoch)
    chunk = batch_size * mega
    batches: list[list[int]] = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=lambda j: lengths[j], reverse=True)
        batches.extend(part[k : k + batch_size] for k in range(0, len(part), batch_size))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [j for b in perm for j in batches[b]]


def grouped_order(keys: Sequence[Hashable], seed: int, epoch: int) -> list[int]:
    """Shuffled order in which the items sharing a key are consecutive: the distinct keys in a
    seeded random order, each key's items shuffled. Deterministic in (seed, epoch)."""
    groups: dict[Hashable, list[int]] = {}
    for i in epoch_order(len(keys), seed, epoch):
        groups.setdefault(keys[i], []).append(i)
    names = list(groups)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 11)
    return [i for k in torch.randperm(len(names), generator=g).tolist() for i in groups[names[k]]]


@dataclasses.dataclass
class LoopResult:
    step: int  # optimiser steps done
    stopped: bool  # stopped early (stop_after)
    last: dict[str, Any]  # the last metrics row
    seconds: float  # time spent in optimiser steps


def run_steps(
    *,
    acc: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    settings: TrainSettings,
    checkpoint_every: int,
    max_grad_norm: float | None,
    order: Callable[[int], list[int]],
    n_examples: int,
    start_step: int,
    units: Callable[[list[int]], int],
    loss_sum: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
    after_step: Callable[[int, bool, dict[str, float], float], dict[str, Any]],
    checkpoint: Callable[[int], None],
    metrics: Any,
    desc: str,
    stop_after: int | None = None,
) -> LoopResult:
    """The optimisation loop shared by every trainer.

    Each step takes the next ``batch_size × grad_accum × processes`` examples of the epoch's
    ``order(epoch)``, this process's share cut into micro-batches. ``loss_sum(micro)`` returns
    the *summed* loss and summed statistics; the loss is normalised by the number of loss units
    (``units``: tokens for SFT, pairs for the reward model) in the whole step on all processes,
    so accumulation and process count do not change the update. ``after_step`` adds metrics
    (evaluation at epoch ends); ``checkpoint`` saves state every ``checkpoint_every`` steps, at
    the end and when stopped. Ctrl-C saves a checkpoint first.
    """
    world = acc.num_processes
    per_step = settings.batch_size * settings.grad_accum * world
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = settings.max_steps or settings.epochs * steps_per_epoch
    step, seconds, last = start_step, 0.0, {}
    stopped = False
    cached: tuple[int, list[int]] | None = None
    with progress_bar(desc, total=total, completed=step) as bar:
        try:
            while step < total:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if cached is None or cached[0] != epoch:
                    cached = (epoch, order(epoch))
                idx = cached[1][in_epoch * per_step : (in_epoch + 1) * per_step]
                mine = idx[acc.process_index :: world]
                micro = [
                    mine[i : i + settings.batch_size]
                    for i in range(0, len(mine), settings.batch_size)
                ]
                t0 = time.perf_counter()
                n_local = sum(units(mb) for mb in micro)
                n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum"))
                loss_total = 0.0
                stats: dict[str, float] = {}
                for k, mb in enumerate(micro):
                    with maybe_no_sync(acc, model, sync=k == len(micro) - 1):
                        loss, st = loss_sum(mb)
                        acc.backward(loss * world / max(n_global, 1))
                    loss_total += float(loss.detach())
                    for key, v in st.items():
                        stats[key] = stats.get(key, 0.0) + float(v)
                if world > 1:  # the step's metrics over every process's share, not rank 0's
                    keys = sorted(stats)
                    sums = torch.tensor(
                        [loss_total, *(stats[k] for k in keys)], dtype=torch.float64
                    )
                    sums = acc.reduce(sums.to(acc.device), "sum").tolist()
                    loss_total, stats = sums[0], dict(zip(keys, sums[1:], strict=True))
                grad_norm = None
                if max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                seconds += dt
                row: dict[str, Any] = {
                    "train/loss": loss_total / max(n_global, 1),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": step / steps_per_epoch,
                    "timing/step": dt,
                }
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                epoch_done = step % steps_per_epoch == 0 or step == total
                stats["units"] = n_global  # stats are sums over all processes
                row.update(after_step(step, epoch_done, stats, dt))
                last = row
                if step % settings.log_every == 0 or epoch_done:
                    metrics.log(step, row)  # writes on the main process only
                bar.update(step, loss=row["train/loss"])
                stopped = stop_after is not None and stop_after <= step < total
                if step % checkpoint_every == 0 or step == total or stopped:
                    checkpoint(step)
                if stopped:
                    break
        except KeyboardInterrupt:
            checkpoint(step)
            metrics.close()
            raise
    return LoopResult(step=step, stopped=stopped, last=last, seconds=seconds)


def total_steps(settings: TrainSettings, n_examples: int, world: int) -> int:
    per_step = settings.batch_size * settings.grad_accum * world
    return settings.max_steps or settings.epochs * math.ceil(n_examples / per_step)


def resume_training(
    *,
    acc: Any,
    run: RunDir,
    ckpt: Path | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    total: int,
    cfg: StageConfig,
    project: str,
    restore: Callable[[Path, dict[str, Any]], None] | None = None,
    unit: str = "step",
) -> tuple[int, MetricsLogger]:
    """Restore a checkpoint (if any) and open the metrics log and tracker.

    From ``ckpt``: the optimiser, scheduler and RNG state, plus whatever the stage keeps
    beyond them (``restore(ckpt, trainer_blob)``: PPO's weights, KL controller, ...). Returns
    (the step to start from, a :class:`palate.rundir.MetricsLogger` that dropped the rows the
    interrupted run wrote after ``ckpt``).
    """
    step = 0
    if ckpt is not None:
        state, blob = load_training_state(ckpt)
        if restore is not None:
            restore(ckpt, blob)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        restore_rng(rank_rng(blob, acc.process_index, acc.num_processes, cfg.seed))
        step = state["step"]
        if acc.is_main_process:
            console.print(f"resuming from {ckpt} ({unit} {step}/{total})")
    metrics = MetricsLogger(
        run.metrics_path,
        resume_step=step if ckpt is not None else None,
        accelerator=acc if cfg.tracker != "none" else None,
        enabled=acc.is_main_process,  # one log, written by rank 0
    )
    start_trackers(acc, cfg.tracker, project, cfg)
    return step, metrics


StageConfigT = TypeVar("StageConfigT", bound=StageConfig)


class StepTrainer(Generic[StageConfigT]):
    """What the step-based trainers (SFT, reward model) share: the stage set-up, optimiser and
    resume (:meth:`prepare`), the step loop (:meth:`optimise`, :func:`run_steps`) and
    checkpoints.

    A subclass sets ``stage`` and gives the data and the maths: ``batches(epoch)`` (the epoch's
    order of examples), ``units(micro_batch)`` (what the loss is averaged over: tokens, pairs),
    ``loss(micro_batch)`` (the summed loss and statistics), ``after_step`` (the step's metrics;
    evaluation at epoch ends) and ``save_weights(path)``.
    """

    stage: ClassVar[str]  # "sft", "reward": progress bar, tracker project, checkpoint state

    def __init__(self, cfg: StageConfigT, train: TrainSettings, optim: OptimSettings):
        self.cfg = cfg
        self.train_settings, self.optim = train, optim
        self.acc, self.run, self.device, self.precision = begin_stage(cfg)
        self.ckpt = self.run.latest_checkpoint() if cfg.resume else None

    def prepare(self, model: Any, n_examples: int) -> Any:
        """Optimiser and schedule over ``model``'s trainable parameters, both prepared by
        accelerate, restored from the newest checkpoint when resuming; returns the prepared
        model. Sets ``steps``, ``start_step`` and ``metrics``."""
        self.n_examples = n_examples
        self.steps = total_steps(self.train_settings, n_examples, self.acc.num_processes)
        self.params = trainable_parameters(model)
        self.optimizer, self.scheduler = build_optimizer(self.params, self.optim, self.steps)
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.start_step, self.metrics = resume_training(
            acc=self.acc,
            run=self.run,
            ckpt=self.ckpt,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            total=self.steps,
            cfg=self.cfg,
            project=f"palate-{self.stage}",
        )
        return self.model

    def optimise(self, *, stop_after: int | None = None) -> LoopResult:
        """The optimiser steps (:func:`run_steps` over this trainer's hooks); closes the log."""
        result = run_steps(
            acc=self.acc,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
            settings=self.train_settings,
            checkpoint_every=self.cfg.checkpoint_every,
            max_grad_norm=self.optim.max_grad_norm,
            order=self.batches,
            n_examples=self.n_examples,
            start_step=self.start_step,
            units=self.units,
            loss_sum=self.loss,
            after_step=self.after_step,
            checkpoint=self.checkpoint,
            metrics=self.metrics,
            desc=self.stage,
            stop_after=stop_after,
        )
        self.metrics.close()
        return result

    def checkpoint(self, step: int) -> None:
        """The weights, then optimiser/scheduler/RNG state (``state.json`` last); older
        checkpoints pruned."""
        if not self.acc.is_main_process:
            return
        path = self.run.checkpoint_dir(step)
        path.mkdir(parents=True, exist_ok=True)
        self.save_weights(path)
        save_training_state(
            path,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={"step": step, "total_steps": self.steps, "stage": self.stage},
        )
        prune_checkpoints(self.run, self.cfg.keep_checkpoints)

    # ----------------------------------------------------------------- hooks

    def batches(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def units(self, micro_batch: list[int]) -> int:
        raise NotImplementedError

    def loss(self, micro_batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(
        self, step: int, epoch_done: bool, stats: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        raise NotImplementedError

    def save_weights(self, path: Path) -> None:
        raise NotImplementedError


def check_engine(distributed_type: Any) -> None:
    """palate's trainers are data-parallel: weights, optimiser state and checkpoints replicated
    (written by rank 0). DeepSpeed ZeRO and FSDP shard them, which the checkpoints would lose
    silently, so they are refused (docs/scaling.md)."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate config: distributed_type {name} is not supported yet — palate's "
            "checkpoints and final weights are written by rank 0 and are not sharding-aware. "
            "Launch with data parallelism (examples/accelerate/ddp.yaml, or none); see "
            "docs/scaling.md"
        )


def begin_stage(cfg: StageConfig) -> tuple[Any, RunDir, torch.device, str]:
    """(accelerator, run directory, device, precision) for a training stage: the run directory
    and its resolved config written by the main process, every RNG seeded with ``cfg.seed``."""
    acc = make_accelerator(cfg.tracker, cfg.output_dir)
    check_engine(acc.distributed_type)
    run = RunDir(cfg.output_dir)
    if acc.is_main_process:
        run.create(cfg)
    acc.wait_for_everyone()
    seed_everything(cfg.seed)
    return acc, run, acc.device, resolve_precision(cfg.precision, acc.device)
