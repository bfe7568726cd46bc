"""The SFT loss: cross-entropy on response tokens only (a pure function of logits and labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from palate.lm import IGNORE_INDEX

__all__ = ["sft_loss"]


def sft_loss(
    logits: torch.Tensor,  # (B, T, V) next-token logits at every position
    labels: torch.Tensor,  # (B, T) token ids, IGNORE_INDEX where no loss (prompt, padding)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token cross-entropies, number of response tokens).

    Position t predicts token t+1, so logits are shifted against labels. Returning the sum lets
    callers normalise by the token count of a whole optimiser step (gradient accumulation and
    several processes then give the same update as one big batch). Training computes the same
    quantity with the LM head applied at response positions only
    (:func:`palate.lm.response_cross_entropy`).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum")
    return ce, mask.sum()
