"""The stages of ``palate run``, one module each: each builds its step's inputs from the run
(configs from :mod:`palate.pipeline.recipes`) and calls one library function.

``sft`` → ``pairs`` → ``labels`` → ``reward`` → ``ppo`` → (``round-k``: :mod:`.rounds`) →
``eval`` → ``report``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from palate.pipeline.run import Run
from palate.pipeline.stages.eval import stage_eval
from palate.pipeline.stages.labels import stage_labels
from palate.pipeline.stages.pairs import stage_pairs
from palate.pipeline.stages.ppo import stage_ppo
from palate.pipeline.stages.report import stage_report
from palate.pipeline.stages.reward import stage_reward
from palate.pipeline.stages.rounds import stage_round
from palate.pipeline.stages.sft import stage_sft

__all__ = ["STAGE_FNS", "stage_round"]

STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "sft": stage_sft,
    "pairs": stage_pairs,
    "labels": stage_labels,
    "reward": stage_reward,
    "ppo": stage_ppo,
    "eval": stage_eval,
    "report": stage_report,
}
