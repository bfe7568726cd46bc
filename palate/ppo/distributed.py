"""PPO in several processes (``accelerate launch`` / ``torchrun``): data parallel.

What each process (rank) does, for a global batch of B prompts and W processes:

* **sample, score**: rank r rolls out its share, the prompts ``r, r + W, r + 2W, ...`` (B/W
  each; B must be a multiple of W), and computes their log π_old, log π_ref, V_old and score.
* **gather** (:func:`gather_episodes`): the per-episode tensors (a few (B, T) floats) go to
  every rank, back in the global order, so the KL-penalised reward, GAE, the advantage
  whitening, score normalisation, the KL controller, the monitors and the logged metrics are
  computed on the global batch — identically on every rank, exactly as one process would.
* **update**: each minibatch (the same permutation everywhere, drawn on rank 0) is split
  between the ranks; each rank's loss is its tokens' share of the minibatch's token mean, so
  the gradients summed over ranks (:func:`all_reduce_gradients`) are the one-process gradient.
  Every rank then takes the same optimiser step: weights stay equal without a DDP wrapper (the
  policy forward goes through the decoder and the fp32 head, not ``model.forward``, so DDP's
  hooks would not fire anyway).

The reference policy (the LoRA base with adapters off, or the frozen copy) and the reward
model are replicated per rank, like the policy. Checkpoints, samples and logs are written by
rank 0; a checkpoint keeps every rank's RNG state, so a resumed run samples what the
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_gradients",
    "broadcast_list",
    "broadcast_parameters",
    "gather_episodes",
    "gather_objects",
    "global_order",
]


def global_order(batch: int, world: int) -> list[int]:
    """Where each global episode sits after an all-gather of the ranks' shares.

    Rank r holds episodes r, r + W, ...; the gather concatenates rank 0's, rank 1's, ...:
    global episode i = j·W + r is at position r·(B/W) + j.
    """
    per_rank = batch // world
    return [(i % world) * per_rank + i // world for i in range(batch)]


def _all_gather(x: torch.Tensor, world: int) -> torch.Tensor:
    dtype = x.dtype
    if dtype == torch.bool:  # gloo gathers no bools
        x = x.to(torch.uint8)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(dtype)


def gather_episodes(
    tensors: dict[str, torch.Tensor],
    *,
    world: int,
    pad: dict[str, tuple[str, int | float]],
) -> dict[str, torch.Tensor]:
    """All-gather per-episode tensors (dim 0 = this rank's episodes) into the global order.

    ``pad[name] = (side, value)`` pads dim 1 of a 2-D tensor to the widest rank first:
    ``left`` for left-padded prompts, ``right`` for responses (and their masks, log-probs).
    """
    out: dict[str, torch.Tensor] = {}
    first = next(iter(tensors.values()))
    order = torch.tensor(global_order(first.shape[0] * world, world))
    padded = [name for name in tensors if name in pad]
    widths = torch.tensor([tensors[name].shape[1] for name in padded], device=first.device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)  # every padded width in one all-reduce
    widest = dict(zip(padded, widths.tolist(), strict=True))
    for name, x in tensors.items():
        if name in pad:
            side, value = pad[name]
            extra = widest[name] - x.shape[1]
            if extra:
                spec = (extra, 0) if side == "left" else (0, extra)
                x = torch.nn.functional.pad(x, spec, value=value)
        out[name] = _all_gather(x, world)[order.to(x.device)]
    return out


def gather_objects(items: Sequence[Any], world: int) -> list[Any]:
    """All-gather a per-episode Python list (e.g. decoded texts) into the global order."""
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(items))
    flat = [x for part in parts for x in part]
    return [flat[k] for k in global_order(len(flat), world)]


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], bucket: int = 2**25) -> None:
    """Sum the gradients over ranks (a parameter without a gradient counts as zeros: a rank
    whose share of a minibatch was empty). Flattened into buckets of up to ``bucket`` elements
    per dtype (one all-reduce each, as DDP's buckets), so full fine-tuning does not need a
    second copy of every gradient at once."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    buckets: list[list[int]] = []
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    for k, g in enumerate(grads):
        idx, size = open_bucket.get(g.dtype, ([], 0))
        if idx and size + g.numel() > bucket:
            buckets.append(idx)
            idx, size = [], 0
        open_bucket[g.dtype] = (idx + [k], size + g.numel())
    buckets += [idx for idx, _ in open_bucket.values()]
    for idx in buckets:
        flat = torch.cat([grads[k].reshape(-1) for k in idx])
        dist.all_reduce(flat)
        offset = 0
        for k in idx:
            n = grads[k].numel()
            params[k].grad = flat[offset : offset + n].view_as(params[k]).clone()
            offset += n


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Rank 0's values everywhere (fresh LoRA / value heads are drawn from the RNG)."""
    for p in params:
        dist.broadcast(p.data, src=0)


def broadcast_list(values: list[int]) -> list[int]:
    """Rank 0's list of ints on every rank (same length everywhere)."""
    t = torch.tensor(values, dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return t.cpu().tolist()
