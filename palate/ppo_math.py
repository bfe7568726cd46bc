"""The PPO / RLHF maths as pure functions on tensors — each one unit-tested by hand.

Shapes: B rollouts, T response positions. ``mask`` is 1 on real response tokens (up to and
including EOS) and 0 on padding after them.
"""

from __future__ import annotations

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "gae",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "penalised_rewards",
    "policy_loss",
    "value_loss",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean / unit variance over masked positions; padding is set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's k1/k2/k3).

    k1 = log π_θ − log π_ref (unbiased, can be negative per token); k2 = ½(log ratio)²;
    k3 = (r − 1) − log r with r = π_ref/π_θ (unbiased, always ≥ 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def penalised_rewards(
    scores: torch.Tensor,  # (B,) reward-model score per response
    kl: torch.Tensor,  # (B, T) per-token KL estimate
    mask: torch.Tensor,  # (B, T)
    beta: float,
) -> torch.Tensor:  # (B, T)
    """Per-token reward: ``−β·KL_t`` everywhere, plus the score at the last real token (EOS)."""
    rewards = -beta * kl * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()  # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor,  # (B, T)
    values: torch.Tensor,  # (B, T) V(s_t), the value before emitting token t
    mask: torch.Tensor,  # (B, T)
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages, returns: (B, T)
    """Generalised advantage estimation (Schulman et al. 2016), masked.

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t) and A_t = δ_t + γλ·A_{t+1}; the state after the last real
    token is terminal (value 0). Returns are A_t + V(s_t).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,  # (B, T) log π_θ (new)
    old_logprobs: torch.Tensor,  # (B, T) log π_old (at rollout time)
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)).

    Returns (loss, clip fraction, approx KL(π_old ‖ π_θ) = mean ½(log ρ)²).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approxkl


def value_loss(
    values: torch.Tensor,  # (B, T) V_θ (new)
    old_values: torch.Tensor,  # (B, T) V at rollout time
    returns: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½·mean max((V−R)², (clip(V, V_old±ε)−R)²). Returns (loss, clipfrac)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


class FixedKLController:
    """β stays where it was set."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): steer β so the observed KL tracks a target.

    e = clip(KL/target − 1, −0.2, 0.2);  β ← β·(1 + e·n_steps/horizon)
    """

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean/std over batches (Chan et al. parallel update), for score normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        b_mean, b_var, b_n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = b_mean - self.mean, self.count + b_n
        m2 = self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / total
        self.mean += delta * b_n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
