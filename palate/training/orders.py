"""Data orders that depend only on (seed, epoch), so that resuming mid-epoch is exact."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = ["epoch_order", "grouped_order", "length_grouped_order"]


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
