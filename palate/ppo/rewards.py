"""What PPO does to the reward model's score before the KL penalty: the rule rewards added to
it and the shaping applied to the sum, on the global batch.

* **decline bonus** (``reward.decline_bonus``, :func:`rule_rewards`): a response that declines,
  to a prompt of a listed criterion, earns that criterion's bonus (Rule Based Rewards).
* **missing-EOS penalty** (``reward.missing_eos_penalty``, :func:`shape_scores`): a response
  cut off without emitting EOS scores this much lower.
* **normalise** (``reward.normalize``): scores whitened by running moments over the run.
* **clip** (``reward.clip``): scores clipped to ``[-clip, clip]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from palate import text
from palate.data import Prompt, prompt_text
from palate.ppo.config import RewardShaping
from palate.ppo_math import RunningMoments

__all__ = ["rule_rewards", "shape_scores"]


def rule_rewards(
    prompts: list[Prompt],
    texts: list[str],
    bonus: Mapping[str, float],
    criteria: Mapping[str, str],
    device: torch.device,
) -> torch.Tensor:
    """``reward.decline_bonus``: each response's rule-based reward, its prompt criterion's
    bonus when it declines (:func:`palate.text.declines`), else 0. ``(B,)``"""
    out = torch.zeros(len(texts), device=device)
    if bonus:
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
            b = bonus.get(criteria.get(prompt_text(p), "helpfulness"))
            if b is not None and text.declines(t):
                out[i] = b
    return out


def shape_scores(
    scores: torch.Tensor,  # (B,) reward score (+ rule rewards)
    finished: torch.Tensor,  # (B,) bool: emitted EOS
    shaping: RewardShaping,
    moments: RunningMoments,  # updated here when normalising
) -> torch.Tensor:
    """The missing-EOS penalty, then normalisation and clipping. ``(B,)``"""
    if shaping.missing_eos_penalty is not None:
        scores = torch.where(finished, scores, scores - shaping.missing_eos_penalty)
    if shaping.normalize:
        moments.update(scores)
        scores = (scores - moments.mean) / moments.std
    if shaping.clip is not None:
        scores = scores.clamp(-shaping.clip, shaping.clip)
    return scores
