"""Step 5 (first version) — did RLHF work, or did it cheat?

On held-out prompts, the final policy against the initial one: the **gold** win rate (a
preference the reward model never saw, e.g. the simulated panel's rubric) with a bootstrap 95%
interval, the **proxy** (reward-model) win rate, mean gold and proxy scores, KL to the
reference and response length. Proxy rising while gold falls is over-optimisation.

Pieces are plain functions (:func:`win_rate`, :func:`sequence_kl`, :func:`score_policy`) so
``palate run`` and the report can call them along PPO checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from palate.data import Prompt
from palate.formatting import pad_batch, prompt_ids
from palate.generation import SamplingConfig, generate_responses

__all__ = ["PolicySamples", "sample_policy", "sequence_kl", "win_rate"]

ScoreFn = Callable[[Sequence[Prompt], Sequence[str]], Any]


def win_rate(new: Sequence[float], old: Sequence[float], *, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Fraction of prompts where ``new`` scores above ``old`` (ties count half), with a
    percentile-bootstrap interval over prompts (scipy)."""
    from scipy.stats import bootstrap

    a, b = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("win_rate needs two equal, non-empty score lists")
    wins = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    rate = float(wins.mean())
    if wins.size < 2 or np.all(wins == wins[0]):
        return {"win_rate": rate, "low": rate, "high": rate, "n": int(wins.size)}
    res = bootstrap((wins,), np.mean, confidence_level=confidence, n_resamples=resamples,
                    method="percentile", random_state=np.random.default_rng(seed))  # fmt: skip
    ci = res.confidence_interval
    return {"win_rate": rate, "low": float(ci.low), "high": float(ci.high), "n": int(wins.size)}


@dataclass
class PolicySamples:
    prompts: list[Prompt]
    responses: list[str]
    finished: list[bool]
    token_ids: list[list[int]]  # sampled response tokens (through EOS when finished)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]


def sample_policy(model: Any, tok: Any, prompts: Sequence[Prompt], sampling: SamplingConfig,
                  *, seed: int = 0, batch_size: int = 8) -> PolicySamples:  # fmt: skip
    """One response per prompt (seeded, so two policies see the same random stream)."""
    torch.manual_seed(seed)
    gens = generate_responses(model, tok, prompts, sampling, batch_size=batch_size)
    return PolicySamples(list(prompts), [g.text for g in gens], [g.finished for g in gens],
                         [list(g.token_ids) for g in gens])  # fmt: skip


@torch.no_grad()
def sequence_kl(policy: Any, reference: Any, tok: Any, prompts: Sequence[Prompt],
                responses: Sequence[Sequence[int]], *, temperature: float = 1.0,
                batch_size: int = 8) -> list[float]:  # fmt: skip
    """Per-response KL estimate Σ_t (log π(y_t) − log π_ref(y_t)) on the policy's own sampled
    tokens (k1, the estimator PPO's penalty uses, logits divided by the sampling temperature);
    its mean estimates KL(π ‖ π_ref). Token ids, not decoded text: re-tokenising text is not
    faithful (special tokens, merges)."""
    from palate.ppo import policy_forward

    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        q, qm = pad_batch([prompt_ids(tok, p) for p in ps], tok.pad_token_id)
        r, rm = pad_batch([list(x) or [tok.eos_token_id] for x in rs], tok.pad_token_id, "right")
        ids, mask, tq = torch.cat([q, r], 1), torch.cat([qm, rm], 1), q.shape[1]
        lp, _, _ = policy_forward(policy, None, ids, mask, tq, temperature)
        lr, _, _ = policy_forward(reference, None, ids, mask, tq, temperature)
        m = mask[:, tq:].float()
        out.extend(((lp - lr) * m).sum(1).tolist())
    return out


def compare_policies(
    new: tuple[Any, Any],
    old: tuple[Any, Any],
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    gold: ScoreFn | None = None,
    proxy: ScoreFn | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample both policies on ``prompts`` and compare them under gold and proxy scores."""
    (m_new, tok), (m_old, _) = new, old
    s_new = sample_policy(m_new, tok, prompts, sampling, seed=seed)
    s_old = sample_policy(m_old, tok, prompts, sampling, seed=seed)
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "length_new": float(np.mean(s_new.lengths)),
        "length_old": float(np.mean(s_old.lengths)),
        "kl": float(
            np.mean(
                sequence_kl(
                    m_new,
                    m_old,
                    tok,
                    prompts,
                    s_new.token_ids,
                    temperature=sampling.temperature or 1.0,
                )
            )
        ),
    }
    for name, fn in (("gold", gold), ("proxy", proxy)):
        if fn is None:
            continue
        a = [float(x) for x in fn(prompts, s_new.responses)]
        b = [float(x) for x in fn(prompts, s_old.responses)]
        wr = win_rate(a, b, seed=seed)
        out.update({f"{name}_win_rate": wr["win_rate"], f"{name}_win_rate_low": wr["low"],
                    f"{name}_win_rate_high": wr["high"], f"{name}_new": float(np.mean(a)),
                    f"{name}_old": float(np.mean(b))})  # fmt: skip
    out["samples"] = [
        {"prompt": p, "new": x, "old": y}
        for p, x, y in zip(prompts, s_new.responses, s_old.responses, strict=True)
    ]
    return out
