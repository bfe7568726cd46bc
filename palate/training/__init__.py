"""Training plumbing shared by SFT, the reward model and PPO.

Precision (bf16 autocast where the hardware has it), LoRA via peft, dropout off, optimizer and
learning-rate schedule, exact checkpoint/resume (weights, optimizer, scheduler, RNG, position),
accelerate set-up (devices, multi-process, trackers) and the stage loop. The RLHF maths lives
in the stage packages; this is the part every trainer needs and none should repeat.

* :mod:`~palate.training.settings` — the settings every stage shares (LoRA, optimiser, seed,
  precision, checkpoints, tracker, batching).
* :mod:`~palate.training.precision` — bf16 autocast, frozen weights stored in bf16.
* :mod:`~palate.training.prepare` — dropout off, LoRA, frozen bottom layers, the optimiser.
* :mod:`~palate.training.rng` — seeding, RNG state for exact resume.
* :mod:`~palate.training.checkpoints` — writing, pruning and resuming checkpoints.
* :mod:`~palate.training.engine` — accelerate, trackers, the start of a stage.
* :mod:`~palate.training.orders` — resumable data orders.
* :mod:`~palate.training.loop` — the stage loop (:func:`run_steps`) and :class:`StepTrainer`.
"""

from palate.training.checkpoints import (
    load_training_state,
    prune_checkpoints,
    resume_training,
    save_training_state,
    write_checkpoint,
)
from palate.training.engine import (
    begin_stage,
    check_engine,
    flat_hparams,
    make_accelerator,
    maybe_no_sync,
    start_trackers,
)
from palate.training.loop import (
    LoopResult,
    OptimiserSteps,
    StepOutcome,
    StepTrainer,
    run_steps,
    total_steps,
)
from palate.training.orders import epoch_order, grouped_order, length_grouped_order
from palate.training.precision import (
    autocast,
    bf16_supported,
    resolve_precision,
    store_frozen_linears,
)
from palate.training.prepare import (
    apply_lora,
    build_optimizer,
    disable_dropout,
    freeze_bottom,
    trainable_parameters,
)
from palate.training.rng import rank_rng, restore_rng, rng_state, seed_everything
from palate.training.settings import (
    LoraSettings,
    OptimSettings,
    StageConfig,
    StageSettings,
    Tracker,
    TrainSettings,
)

__all__ = [
    "LoopResult",
    "LoraSettings",
    "OptimSettings",
    "OptimiserSteps",
    "StageConfig",
    "StageSettings",
    "StepOutcome",
    "StepTrainer",
    "Tracker",
    "TrainSettings",
    "apply_lora",
    "autocast",
    "begin_stage",
    "bf16_supported",
    "build_optimizer",
    "check_engine",
    "disable_dropout",
    "epoch_order",
    "flat_hparams",
    "freeze_bottom",
    "grouped_order",
    "length_grouped_order",
    "load_training_state",
    "make_accelerator",
    "maybe_no_sync",
    "prune_checkpoints",
    "rank_rng",
    "resolve_precision",
    "restore_rng",
    "resume_training",
    "rng_state",
    "run_steps",
    "save_training_state",
    "seed_everything",
    "start_trackers",
    "store_frozen_linears",
    "total_steps",
    "trainable_parameters",
    "write_checkpoint",
]
