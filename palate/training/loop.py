"""The stage loop every trainer shares (SFT, reward model, PPO), and the batched optimiser
step of the step-based ones (SFT, reward model).

:func:`run_steps` runs a stage's steps: progress, the metrics log, ``stop_after``, periodic
checkpoints (and one at the end, when stopped or halted) and a checkpoint on Ctrl-C. A stage
gives it two callables: ``update(step)`` (the step's optimisation, applied) and
``finish(step, update)`` (what follows it: evaluation, monitors, samples; it returns the
:class:`StepOutcome` the loop logs). :class:`StepTrainer` is the stage set-up of SFT and the
reward model; :class:`OptimiserSteps` their update over micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from palate.progress import progress_bar
from palate.training.checkpoints import resume_training, write_checkpoint
from palate.training.engine import begin_stage, maybe_no_sync
from palate.training.prepare import build_optimizer, trainable_parameters
from palate.training.settings import OptimSettings, StageConfig, TrainSettings

__all__ = [
    "LoopResult",
    "OptimiserSteps",
    "StepOutcome",
    "StepTrainer",
    "run_steps",
    "total_steps",
]

U = TypeVar("U")  # what a stage's update hands to its finish


@dataclasses.dataclass
class StepOutcome:
    """What one finished step hands the loop."""

    row: dict[str, Any]  # the step's metrics
    bar: dict[str, float]  # shown on the progress bar
    log: bool = True  # write ``row`` to the metrics log
    halt: bool = False  # end training after this step, with a checkpoint (a monitor's stop)
    seconds: float = 0.0  # time spent in the step's optimisation


@dataclasses.dataclass
class LoopResult:
    step: int  # optimiser steps done
    stopped: bool  # stopped early (stop_after)
    last: dict[str, Any]  # the last metrics row
    seconds: float  # time spent in optimiser steps
    halted: bool = False  # ended by a step's ``halt``


def run_steps(
    update: Callable[[int], U],
    finish: Callable[[int, U], StepOutcome],
    *,
    start: int,
    total: int,
    checkpoint_every: int,
    checkpoint: Callable[[int], None],
    metrics: Any,
    desc: str,
    stop_after: int | None = None,
    checkpoint_on_interrupt: bool = True,
) -> LoopResult:
    """The stage loop shared by every trainer: steps ``start+1 … total``.

    Each step is ``update(step)`` (``step``: the steps done before it), then
    ``finish(step + 1, that update)``; the finished row is logged (``metrics.log``, rank 0
    writes) and shown. ``checkpoint(step)`` saves every ``checkpoint_every`` steps, at the end,
    when stopped (``stop_after=k``: after step k, as if interrupted) or halted. Ctrl-C saves a
    checkpoint of the steps done (unless ``checkpoint_on_interrupt`` is false), closes the
    log and re-raises.
    """
    step, seconds, last = start, 0.0, {}
    stopped = halted = False
    with progress_bar(desc, total=total, completed=step) as bar:
        try:
            while step < total:
                done = update(step)
                step += 1
                out = finish(step, done)
                seconds += out.seconds
                last = out.row
                if out.log:
                    metrics.log(step, out.row)  # writes on the main process only
                bar.update(step, **out.bar)
                stopped = stop_after is not None and stop_after <= step < total
                halted = out.halt
                if step % checkpoint_every == 0 or step == total or stopped or halted:
                    checkpoint(step)
                if stopped or halted:
                    break
        except KeyboardInterrupt:
            if checkpoint_on_interrupt:
                checkpoint(step)
            metrics.close()
            raise
    return LoopResult(step=step, stopped=stopped, last=last, seconds=seconds, halted=halted)


def total_steps(settings: TrainSettings, n_examples: int, world: int) -> int:
    per_step = settings.batch_size * settings.grad_accum * world
    return settings.max_steps or settings.epochs * math.ceil(n_examples / per_step)


@dataclasses.dataclass
class StepSums:
    """One optimiser step's sums (over every process) before its metrics row is built."""

    loss_total: float
    n_global: int
    stats: dict[str, float]
    grad_norm: Any
    seconds: float


@dataclasses.dataclass
class OptimiserSteps:
    """The optimiser steps of the step-based trainers (SFT, reward model), for :func:`run_steps`.

    Each step takes the next ``batch_size × grad_accum × processes`` examples of the epoch's
    ``order(epoch)``, this process's share cut into micro-batches. ``loss_sum(micro)`` returns
    the *summed* loss and summed statistics; the loss is normalised by the number of loss units
    (``units``: tokens for SFT, pairs for the reward model) in the whole step on all processes,
    so accumulation and process count do not change the update. ``after_step`` adds metrics
    (evaluation at epoch ends).
    """

    acc: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    settings: TrainSettings
    max_grad_norm: float | None
    order: Callable[[int], list[int]]
    n_examples: int
    units: Callable[[list[int]], int]
    loss_sum: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
    after_step: Callable[[int, bool, dict[str, float], float], dict[str, Any]]

    def __post_init__(self) -> None:
        self.world = self.acc.num_processes
        self.per_step = self.settings.batch_size * self.settings.grad_accum * self.world
        self.steps_per_epoch = math.ceil(self.n_examples / self.per_step)
        self.total = self.settings.max_steps or self.settings.epochs * self.steps_per_epoch
        self._cached: tuple[int, list[int]] | None = None  # (epoch, its order)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches of the step after ``step``."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.order(epoch))
        idx = self._cached[1][in_epoch * self.per_step : (in_epoch + 1) * self.per_step]
        mine = idx[self.acc.process_index :: self.world]
        size = self.settings.batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def update(self, step: int) -> StepSums:
        """Accumulate the micro-batches' gradients, clip, step the optimiser and schedule."""
        acc, world = self.acc, self.world
        micro = self.micro_batches(step)
        t0 = time.perf_counter()
        n_local = sum(self.units(mb) for mb in micro)
        n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum"))
        loss_total = 0.0
        stats: dict[str, float] = {}
        for k, mb in enumerate(micro):
            with maybe_no_sync(acc, self.model, sync=k == len(micro) - 1):
                loss, st = self.loss_sum(mb)
                acc.backward(loss * world / max(n_global, 1))
            loss_total += float(loss.detach())
            for key, v in st.items():
                stats[key] = stats.get(key, 0.0) + float(v)
        if world > 1:  # the step's metrics over every process's share, not rank 0's
            keys = sorted(stats)
            sums = torch.tensor([loss_total, *(stats[k] for k in keys)], dtype=torch.float64)
            sums = acc.reduce(sums.to(acc.device), "sum").tolist()
            loss_total, stats = sums[0], dict(zip(keys, sums[1:], strict=True))
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepSums(loss_total, n_global, stats, grad_norm, time.perf_counter() - t0)

    def finish(self, step: int, done: StepSums) -> StepOutcome:
        """The step's metrics row (with ``after_step``'s); logged every ``log_every`` steps and
        at epoch ends."""
        row: dict[str, Any] = {
            "train/loss": done.loss_total / max(done.n_global, 1),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/epoch": step / self.steps_per_epoch,
            "timing/step": done.seconds,
        }
        if done.grad_norm is not None:
            row["train/grad_norm"] = float(done.grad_norm)
        epoch_done = step % self.steps_per_epoch == 0 or step == self.total
        stats = done.stats
        stats["units"] = done.n_global  # stats are sums over all processes
        row.update(self.after_step(step, epoch_done, stats, done.seconds))
        return StepOutcome(
            row,
            bar={"loss": row["train/loss"]},
            log=step % self.settings.log_every == 0 or epoch_done,
            seconds=done.seconds,
        )


StageConfigT = TypeVar("StageConfigT", bound=StageConfig)


class StepTrainer(Generic[StageConfigT]):
    """What the step-based trainers (SFT, reward model) share: the stage set-up, optimiser and
    resume (:meth:`prepare`), the step loop (:meth:`optimise`: :func:`run_steps` over
    :class:`OptimiserSteps`) and checkpoints.

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
        steps = OptimiserSteps(
            acc=self.acc,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
            settings=self.train_settings,
            max_grad_norm=self.optim.max_grad_norm,
            order=self.batches,
            n_examples=self.n_examples,
            units=self.units,
            loss_sum=self.loss,
            after_step=self.after_step,
        )
        result = run_steps(
            steps.update,
            steps.finish,
            start=self.start_step,
            total=steps.total,
            checkpoint_every=self.cfg.checkpoint_every,
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
        write_checkpoint(
            self.run,
            step,
            save_weights=self.save_weights,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={"total_steps": self.steps, "stage": self.stage},
            keep=self.cfg.keep_checkpoints,
        )

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
