"""Step 5 (first version) — did RLHF work, or did it cheat?

On held-out prompts, the final policy against the initial one: the **gold** win rate (a
preference the reward model never saw, e.g. the simulated panel's rubric) with a bootstrap 95%
interval, the **proxy** (reward-model) win rate, mean gold and proxy scores, KL to the
reference and response length. Proxy rising while gold falls is over-optimisation.

Pieces are plain functions (:func:`win_rate`, :func:`sequence_kl`, :func:`evaluate_policy`,
:func:`compare`) so ``palate run`` samples the initial policy once and compares every PPO
checkpoint against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.data import Prompt, read_jsonl
from palate.formatting import pad_batch, prompt_ids
from palate.lm import policy_forward
from palate.models import load_model
from palate.reward.model import ScoreFn
from palate.sampling import SamplingConfig, generate_responses, inference_model
from palate.training import autocast

__all__ = [
    "PolicySamples",
    "bootstrap_mean",
    "length_controlled_win_rate",
    "pairwise_wins",
    "ScoredSamples",
    "checkpoint_policy",
    "compare",
    "evaluate_policy",
    "load_sampler",
    "rollout_curve",
    "sample_policy",
    "sequence_kl",
    "win_rate",
    "win_rates",
]


def pairwise_wins(
    new: Sequence[float] | np.ndarray, old: Sequence[float] | np.ndarray
) -> np.ndarray:
    """1 where ``new`` scores above ``old``, ½ on ties, else 0 (one per prompt). Scores of
    different shapes are an error (numpy would broadcast them silently)."""
    a, b = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"pairwise_wins needs scores of one shape (got {a.shape} and {b.shape})")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def order_agreement(
    delta: Sequence[float] | np.ndarray, gold_delta: Sequence[float] | np.ndarray
) -> float | None:
    """How often score differences ``delta`` (e.g. a reward model's, answer x minus answer y)
    have the sign of the gold's ``gold_delta``; pairs the gold ties are left out (None if all)."""
    d, g = np.asarray(delta, dtype=float), np.asarray(gold_delta, dtype=float)
    decided = g != 0
    return float((np.sign(d) == np.sign(g))[decided].mean()) if decided.any() else None


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of per-prompt values with a percentile-bootstrap interval over prompts (scipy)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return {"mean": mean, "low": mean, "high": mean, "n": int(x.size)}
    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": int(x.size)}


def win_rate(
    new: Sequence[float],
    old: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Fraction of prompts where ``new`` scores above ``old`` (ties count half), with a
    percentile-bootstrap interval over prompts."""
    m = bootstrap_mean(
        pairwise_wins(new, old), confidence=confidence, resamples=resamples, seed=seed
    )
    return {"win_rate": m["mean"], "low": m["low"], "high": m["high"], "n": m["n"]}


def length_controlled_win_rate(
    wins: Sequence[float] | np.ndarray,
    len_new: Sequence[float],
    len_old: Sequence[float],
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """The win rate with the length advantage regressed out, as AlpacaEval's length-controlled
    win rate (Dubois et al. 2024): fit ``P(win) = σ(a + b·tanh(Δ/σ_Δ))`` on the per-prompt wins
    (ties ½) with Δ = len_new − len_old, and report ``σ(a)``: the win rate when both answers
    are equally long. A policy that only got longer has a raw win rate above ½ and an LC win rate
    near ½. Percentile-bootstrap interval over prompts (refits); a small L2 penalty on b keeps
    the fit finite when length separates wins perfectly."""
    from scipy.optimize import minimize

    w = np.asarray(wins, dtype=float)
    delta = np.asarray(len_new, dtype=float) - np.asarray(len_old, dtype=float)
    if w.shape != delta.shape or w.size < 2:
        raise ValueError("length-controlled win rate needs ≥ 2 prompts with wins and lengths")
    scale = float(delta.std()) or 1.0
    x = np.tanh(delta / scale)

    def fit(idx: np.ndarray) -> float:
        ww, xx = w[idx], x[idx]

        def loss(theta: np.ndarray) -> float:
            z = theta[0] + theta[1] * xx
            # soft-target binary cross-entropy, −[w log σ(z) + (1 − w) log σ(−z)]
            bce = np.logaddexp(0, -z) * ww + np.logaddexp(0, z) * (1 - ww)
            return float(bce.sum() + 1e-2 * theta[1] ** 2) / len(ww)

        a = minimize(loss, np.zeros(2), method="BFGS").x[0]
        return float(1 / (1 + np.exp(-a)))

    rate = fit(np.arange(w.size))
    rng = np.random.default_rng(seed)
    boots = sorted(fit(rng.integers(0, w.size, w.size)) for _ in range(resamples))
    lo = boots[int((1 - confidence) / 2 * resamples)]
    hi = boots[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
    return {"lc_win_rate": rate, "low": lo, "high": hi, "n": int(w.size)}


def win_rates(
    wins: Sequence[float] | np.ndarray, len_new: Sequence[int], len_old: Sequence[int], seed: int
) -> dict[str, Any]:
    """From per-prompt wins (ties ½): the win rate with its bootstrap interval and the
    length-controlled win rate ({n, win_rate, low, high, lc_win_rate, lc_low, lc_high})."""
    out: dict[str, Any] = {"n": len(wins)}
    if len(wins) == 0:
        return out
    m = bootstrap_mean(wins, seed=seed)
    out.update({"win_rate": m["mean"], "low": m["low"], "high": m["high"]})
    if len(wins) >= 2:
        lc = length_controlled_win_rate(wins, len_new, len_old, seed=seed)
        out.update({"lc_win_rate": lc["lc_win_rate"], "lc_low": lc["low"], "lc_high": lc["high"]})
    return out


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


def evaluate_policy(
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


def compare(new: ScoredSamples, old: ScoredSamples, *, seed: int = 0) -> dict[str, Any]:
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


def load_sampler(spec: str, precision: str, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) frozen for sampling (bf16 weights under bf16), on ``device`` (CPU by
    default)."""
    model, tok = load_model(spec, device=device)
    return inference_model(model, precision), tok


def checkpoint_policy(path: Path, base_spec: str, precision: str) -> Any:
    """A PPO checkpoint's policy (``path/policy``: a LoRA adapter over ``base_spec`` or a full
    model), merged and frozen for sampling."""
    policy = path / "policy"
    if (policy / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model(base_spec)
        model = PeftModel.from_pretrained(base, str(policy)).merge_and_unload()
    else:
        model, _ = load_model(str(policy))
    return inference_model(model, precision)


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
