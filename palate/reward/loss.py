"""The Bradley-Terry preference loss (a pure function of scores and labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["preference_loss"]


def preference_loss(
    r_chosen: torch.Tensor,  # (B,) scores of the chosen responses
    r_rejected: torch.Tensor,  # (B,) scores of the rejected responses
    *,
    margin: torch.Tensor | None = None,  # (B,) ≥ 0: required score gap (strength of preference)
    prob_chosen: torch.Tensor | None = None,  # (B,) soft label P(chosen ≻ rejected), default 1
    tie: torch.Tensor | None = None,  # (B,) bool: rated equal → target 0.5, no margin
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:  # (B,) per-pair loss
    """Bradley-Terry loss per pair.

    With ``Δ = r_chosen − r_rejected − margin`` and target ``q`` (1 for a hard label, the vote
    fraction for a soft label, 0.5 for a tie), the loss is the binary cross-entropy
    ``−q·log σ(Δ) − (1−q)·log σ(−Δ)``; for a hard label that is ``−log σ(Δ)``. Ties drop the
    margin, so they pull the two scores together. Label smoothing ε (noisy raters) moves the
    target toward ½: ``q ← (1−ε)·q + ε·(1−q)``. ``center_coef`` adds
    ``c·(r_chosen + r_rejected)²``, which keeps scores near zero without changing the ranking.
    """
    q = torch.ones_like(r_chosen) if prob_chosen is None else prob_chosen.to(r_chosen)
    m = torch.zeros_like(r_chosen) if margin is None else margin.to(r_chosen)
    if tie is not None:
        tie = tie.to(torch.bool)
        q = torch.where(tie, torch.full_like(q, 0.5), q)
        m = torch.where(tie, torch.zeros_like(m), m)
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing * (1 - q)
    delta = r_chosen - r_rejected - m
    loss = -(q * F.logsigmoid(delta) + (1 - q) * F.logsigmoid(-delta))
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss
