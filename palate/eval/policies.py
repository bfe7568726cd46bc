"""A policy's answers on held-out prompts, scored, and two policies head to head.

:func:`sample_and_score` samples a policy once per prompt and scores the answers: the **gold**
(a preference the reward model never saw, e.g. the simulated panel's rubric), the **proxy**
(the reward model) and the KL to a reference. :func:`head_to_head` compares two scored policies
(gold and proxy win rates with bootstrap intervals, :mod:`palate.eval.stats`). Proxy rising
while gold falls is over-optimisation. ``palate run`` samples the initial policy once and
compares every PPO checkpoint against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.data import Prompt, read_jsonl
from palate.eval.stats import order_agreement, pairwise_wins, win_rates
from palate.formatting import pad_batch, prompt_ids
from palate.lm import policy_forward
from palate.reward.model import ScoreFn
from palate.sampling import SamplingConfig, generate_responses
from palate.training import autocast

__all__ = [
    "PolicySamples",
    "ScoredSamples",
    "head_to_head",
    "rollout_curve",
    "sample_and_score",
    "sample_policy",
    "sequence_kl",
]


@dataclass
class PolicySamples:
    prompts: list[Prompt]
    responses: list[str]
    finished: list[bool]
    token_ids: list[list[int]]  # sampled response tokens (through EOS when finished)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]


def sample_policy(
    model: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    batch_size: int = 8,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> PolicySamples:
    """One response per prompt (seeded, so two policies see the same random stream)."""
    torch.manual_seed(seed)
    gens = generate_responses(
        model, tok, prompts, sampling, batch_size=batch_size, precision=precision, on_batch=on_batch
    )
    return PolicySamples(
        list(prompts),
        [g.text for g in gens],
        [g.finished for g in gens],
        [list(g.token_ids) for g in gens],
    )


@torch.no_grad()
def sequence_kl(
    policy: Any,
    reference: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    precision: str = "fp32",
) -> list[float]:
    """Per-response KL estimate Σ_t (log π(y_t) − log π_ref(y_t)) on the policy's own sampled
    tokens (k1, the estimator PPO's penalty uses, logits divided by the sampling temperature);
    its mean estimates KL(π ‖ π_ref). Token ids, not decoded text: re-tokenising text is not
    faithful (special tokens, merges)."""
    device = next(policy.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        batch_responses = responses[start : start + batch_size]
        query, query_mask = pad_batch([prompt_ids(tok, p) for p in batch_prompts], tok.pad_token_id)
        response, response_mask = pad_batch(
            [list(x) or [tok.eos_token_id] for x in batch_responses], tok.pad_token_id, "right"
        )
        width = query.shape[1]
        ids = torch.cat([query, response], 1).to(device)
        mask = torch.cat([query_mask, response_mask], 1).to(device)
        with autocast(device, precision):
            logp, _, _ = policy_forward(policy, None, ids, mask, width, temperature)
            ref_logp, _, _ = policy_forward(reference, None, ids, mask, width, temperature)
        real = mask[:, width:].float()
        out.extend(((logp - ref_logp) * real).sum(1).cpu().tolist())
    return out


@dataclass
class ScoredSamples:
    """A policy's samples on the evaluation prompts with their scores."""

    samples: PolicySamples
    gold: list[float] | None = None  # (N,) gold score per response
    proxy: list[float] | None = None  # (N,) reward-model score per response
    kl: list[float] | None = None  # (N,) Σ_t log π/π_ref on the response (vs the reference)

    def means(self, n: int | None = None) -> dict[str, float]:
        """Mean length, gold, proxy and KL (those present), over the first ``n`` prompts."""
        out = {"length": float(np.mean(self.samples.lengths[:n]))}
        for k in ("gold", "proxy", "kl"):
            v = getattr(self, k)
            if v is not None:
                out[k] = float(np.mean(v[:n]))
        return out


def sample_and_score(
    model: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    reference: Any = None,
    gold: ScoreFn | None = None,
    proxy: ScoreFn | None = None,
    seed: int = 0,
    batch_size: int = 8,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> ScoredSamples:
    """Sample ``model`` once per prompt and score the responses (gold, proxy, KL to
    ``reference`` when given)."""
    s = sample_policy(
        model,
        tok,
        prompts,
        sampling,
        seed=seed,
        batch_size=batch_size,
        precision=precision,
        on_batch=on_batch,
    )
    out = ScoredSamples(s)
    if gold is not None:
        out.gold = [float(x) for x in gold(s.prompts, s.responses)]
    if proxy is not None:
        out.proxy = [float(x) for x in proxy(s.prompts, s.responses)]
    if reference is not None:
        out.kl = sequence_kl(
            model,
            reference,
            tok,
            s.prompts,
            s.token_ids,
            temperature=sampling.temperature or 1.0,
            batch_size=batch_size,
            precision=precision,
        )
    return out


def head_to_head(new: ScoredSamples, old: ScoredSamples, *, seed: int = 0) -> dict[str, Any]:
    """Final vs initial: gold and proxy win rates (bootstrap 95% CI) and their
    length-controlled versions, means, KL, lengths, and the paired samples with their scores."""
    out: dict[str, Any] = {
        "prompts": len(new.samples.prompts),
        "length_new": float(np.mean(new.samples.lengths)),
        "length_old": float(np.mean(old.samples.lengths)),
    }
    if new.kl is not None:
        out["kl"] = float(np.mean(new.kl))
    for name in ("gold", "proxy"):
        a, b = getattr(new, name), getattr(old, name)
        if a is None or b is None:
            continue
        if not len(a):
            raise ValueError("compare needs at least one prompt")
        wr = win_rates(pairwise_wins(a, b), new.samples.lengths, old.samples.lengths, seed)
        out.update(
            {
                f"{name}_win_rate": wr["win_rate"],
                f"{name}_win_rate_low": wr["low"],
                f"{name}_win_rate_high": wr["high"],
                f"{name}_new": float(np.mean(a)),
                f"{name}_old": float(np.mean(b)),
            }
        )
        if "lc_win_rate" in wr:  # the win rate with the length difference regressed out
            out.update(
                {
                    f"{name}_lc_win_rate": wr["lc_win_rate"],
                    f"{name}_lc_win_rate_low": wr["lc_low"],
                    f"{name}_lc_win_rate_high": wr["lc_high"],
                }
            )
    if None not in (new.gold, old.gold, new.proxy, old.proxy):
        dg = np.asarray(new.gold) - np.asarray(old.gold)
        dp = np.asarray(new.proxy) - np.asarray(old.proxy)
        # how often the reward model orders the two answers as the gold does
        out["proxy_gold_agreement"] = order_agreement(dp, dg)
    samples = []
    for i, p in enumerate(new.samples.prompts):
        row: dict[str, Any] = {
            "prompt": p,
            "new": new.samples.responses[i],
            "old": old.samples.responses[i],
        }
        for name in ("gold", "proxy"):
            for side, sc in (("new", new), ("old", old)):
                v = getattr(sc, name)
                if v is not None:
                    row[f"{name}_{side}"] = v[i]
        samples.append(row)
    out["samples"] = samples
    return out


# --------------------------------------------------------------------------- loading policies


def rollout_curve(samples_dir: Path, gold: ScoreFn) -> list[dict[str, Any]]:
    """Gold vs proxy on PPO's own rollouts (``RUN/ppo/samples/update-N.jsonl``, each row with
    the reward model's ``score``), one point per logged update."""
    points = []
    for f in sorted(samples_dir.glob("update-*.jsonl")):
        rows = read_jsonl(f)
        if not rows:
            continue
        g = [float(x) for x in gold([r["prompt"] for r in rows], [r["response"] for r in rows])]
        points.append(
            {
                "update": int(f.stem.split("-")[1]),
                "gold": sum(g) / len(g),
                "proxy": sum(r["score"] for r in rows) / len(rows),
            }
        )
    return points
