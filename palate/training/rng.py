"""Random-number state: seeding every generator, and saving/restoring them for exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rank_rng", "restore_rng", "rng_state", "seed_everything"]


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
