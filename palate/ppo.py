"""Step 4 — PPO against the reward model, on a KL leash.

One PPO update reads like the paper (see :func:`ppo`):

    sample → score → KL-penalised reward → advantages → clipped update → log → adapt KL

* **sample** (:func:`rollout`): the policy answers a batch of prompts (KV cache, temperature,
  top-p/k, stop at EOS); one forward then gives log π_θ and V(s) at every response position,
  and the same forward with the LoRA adapters switched off gives log π_ref (no second copy of
  the weights).
* **score**: the reward model (or any ``score(prompts, responses)`` callable) scores each
  response; a response that never emits EOS can be penalised (``reward.missing_eos_penalty``).
* **KL-penalised reward** (:func:`palate.ppo_math.penalised_rewards`): −β·KL_t on every token,
  plus the score on the last one.
* **advantages** (:func:`palate.ppo_math.gae`): GAE(γ, λ), then whitened over real tokens.
* **clipped update** (:func:`ppo_epochs`): several epochs × minibatches of the clipped
  surrogate + clipped value loss (− entropy bonus, + optional SFT/pretraining loss), with an
  optional early stop on approx-KL.
* **adapt KL**: β follows a fixed value or the adaptive controller of Ziegler et al.

The maths lives in :mod:`palate.ppo_math`; this module holds the dataflow and the loop.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from palate.config import Config
from palate.data import Prompt, prompt_text, read_records, write_jsonl
from palate.errors import ConfigError
from palate.formatting import pad_batch, prompt_ids
from palate.generation import MergedCopyEngine, PolicyEngine, RolloutEngine, SamplingConfig
from palate.lm import base_model
from palate.models import load_model
from palate.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    value_loss,
)
from palate.progress import console, progress_bar
from palate.rundir import MetricsLogger, RunDir
from palate.training import (
    LoraSettings,
    OptimSettings,
    apply_lora,
    autocast,
    build_optimizer,
    disable_dropout,
    epoch_order,
    load_training_state,
    make_accelerator,
    prune_checkpoints,
    resolve_precision,
    restore_rng,
    save_training_state,
    seed_everything,
    start_trackers,
    store_frozen_linears,
)

__all__ = ["PPOConfig", "Rollout", "ppo"]

ScoreFn = Callable[[Sequence[Prompt], Sequence[str]], Any]


# --------------------------------------------------------------------------- config


class RewardSource(Config):
    """Where scores come from: a palate reward model or a Python callable."""

    model: str | None = Field(None, description="A trained reward model directory (RUN/final).")
    function: str | None = Field(
        None,
        description="Or 'module:function' taking (prompts, responses) and returning scores.",
    )
    batch_size: int = Field(16, ge=1, description="Sequences scored together by a reward model.")
    missing_eos_penalty: float | None = Field(
        None, description="Subtract this from the score of responses that never emit EOS."
    )
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip].")
    normalize: bool = Field(
        False, description="Whiten scores with running mean/std across updates."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        if (self.model is None) == (self.function is None):
            raise ValueError("set exactly one of reward.model and reward.function")
        return self


class KLSettings(Config):
    """The KL leash: per-token penalty β·KL(π_θ ‖ π_ref)."""

    coef: float = Field(0.05, ge=0, description="β, the initial (or fixed) KL coefficient.")
    adaptive: bool = Field(True, description="Adapt β toward `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per response (nats), if adaptive.")
    horizon: int = Field(10000, ge=1, description="Adaptive controller horizon (episodes).")
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token estimator used in the reward (k1 as in the papers)."
    )


class CriticSettings(Config):
    """The value function V(s)."""

    mode: Literal["shared", "separate"] = Field(
        "shared",
        description="'shared': a value head on the policy's backbone (one forward for both); "
        "'separate': its own backbone.",
    )
    init: Literal["policy", "reward_model"] = Field(
        "reward_model",
        description="'separate' only: start from the reward model (if causal) or the policy.",
    )


class PPOSettings(Config):
    """PPO hyper-parameters."""

    updates: int = Field(20, ge=1, description="Number of PPO updates (rollout batches).")
    batch_size: int = Field(8, ge=1, description="Rollouts (prompts) per update.")
    mini_batch_size: int = Field(4, ge=1, description="Rollouts per gradient step.")
    epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip ε.")
    cliprange_value: float | None = Field(0.2, gt=0, description="Value clip (null = none).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    ent_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over real tokens.")
    target_approx_kl: float | None = Field(
        None, gt=0, description="Stop this update's epochs early when approx-KL exceeds it."
    )
    forward_chunks: int = Field(
        2,
        ge=1,
        description="Run each forward as this many groups of rows sorted by prompt length, "
        "each trimmed to its own padding (same maths, less padding computed).",
    )
    ptx_coef: float = Field(0.0, ge=0, description="Weight of an SFT loss mixed in (PPO-ptx).")
    ptx_data: str | None = Field(None, description="Demonstrations for the PPO-ptx loss.")


class PPOConfig(Config):
    """Config for ``palate ppo``."""

    model: str = Field(
        "smollm2-135m-instruct", description="Initial policy (usually the SFT run's final/)."
    )
    prompts: str = Field(description="Prompts JSONL (any palate data file; prompts are used).")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    output_dir: str = Field(description="Run directory.")
    seed: int = Field(0, description="Seed for prompt order and sampling.")
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="LoRA (the reference is the base with adapters off) or full (frozen copy).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    reward: RewardSource = Field(description="Reward model or function.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0),
        description="Rollout sampling (log-probs use the same temperature).",
    )
    max_prompt_length: int = Field(256, ge=8, description="Prompts are cut from the left to this.")
    rollout_engine: Literal["auto", "policy", "merged"] = Field(
        "auto",
        description="Sampler: 'policy' generates with the training policy; 'merged' with an "
        "inference copy (LoRA merged, frozen weights in bf16; faster, one more model in memory); "
        "'auto' = merged for LoRA or bf16, else policy.",
    )
    kl: KLSettings = Field(default_factory=KLSettings, description="KL penalty.")
    critic: CriticSettings = Field(default_factory=CriticSettings, description="Critic.")
    ppo: PPOSettings = Field(default_factory=PPOSettings, description="PPO.")
    optim: OptimSettings = Field(
        default_factory=lambda: OptimSettings(lr=5e-5, schedule="constant", warmup_ratio=0.0),
        description="Optimiser (policy, value head and critic).",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast where supported (auto), or force one."
    )
    sample_every: int = Field(5, ge=1, description="Write sample responses every N updates.")
    checkpoint_every: int = Field(5, ge=1, description="Checkpoint every N updates.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    tracker: str = Field("none", description="Experiment tracker via accelerate.")
    resume: bool = Field(True, description="Continue from the newest checkpoint in output_dir.")

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.ppo.batch_size % self.ppo.mini_batch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.mini_batch_size")
        if self.ppo.ptx_coef > 0 and not self.ppo.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data")
        return self


# --------------------------------------------------------------------------- dataflow


@dataclass
class Rollout:
    """One batch of episodes and everything PPO derives from it."""

    query_ids: torch.Tensor  # (B, Tq) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, T) sampled tokens, pad after EOS
    mask: torch.Tensor  # (B, T) 1 on real response tokens (through EOS)
    logprobs: torch.Tensor  # (B, T) log π_old(a_t | s_t)
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a_t | s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    scores: torch.Tensor  # (B,) reward score after shaping
    raw_scores: torch.Tensor  # (B,) reward score as returned
    finished: torch.Tensor  # (B,) bool: emitted EOS
    texts: list[str]  # decoded responses
    prompts: list[Prompt]
    rewards: torch.Tensor | None = None  # (B, T) −β·KL_t (+ score at the last token)
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate used in the reward
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)


class ValueHead(torch.nn.Module):
    """Scalar value per position from a backbone's hidden states."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


class SeparateCritic(torch.nn.Module):
    """A critic with its own decoder backbone and a value head."""

    def __init__(self, decoder: torch.nn.Module, head: ValueHead):
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, start: int, length: int) -> torch.Tensor:  # fmt: skip
        h = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state  # fmt: skip
        return self.head(h[:, start : start + length])


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(
    policy: Any,
    value_head: ValueHead | None,
    input_ids: torch.Tensor,  # (B, Tq + T)
    attention_mask: torch.Tensor,  # (B, Tq + T)
    tq: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π(a_t|s_t) at the T response positions, V(s_t) from the same forward, entropy.

    The LM head runs on the response slice only; positions follow the attention mask (left
    padding), exactly as in ``generate``.
    """
    base = base_model(policy)
    T = input_ids.shape[1] - tq
    h = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)
    ).last_hidden_state
    h = h[:, tq - 1 : tq - 1 + T]  # states before each response token
    logits = base.get_output_embeddings()(h).float() / max(temperature, 1e-6)
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, tq:].unsqueeze(-1)).squeeze(-1)
    values = value_head(h) if value_head is not None else None
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, values, entropy


def in_chunks(
    fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor | None, ...]],
    input_ids: torch.Tensor,  # (B, Tq + T)
    attention_mask: torch.Tensor,  # (B, Tq + T)
    tq: int,
    chunks: int,
) -> tuple[torch.Tensor | None, ...]:
    """``fn(ids, mask, tq)`` over groups of rows of similar prompt length, reassembled.

    Rows are sorted by prompt length and cut into ``chunks`` groups; each group drops the
    leading columns that are padding in all its rows and the response columns past its longest
    response, so less padding is computed. Outputs are (B, T) again, in the original row order,
    zero where trimmed (always masked positions). Same maths as one call; the graph is kept.
    """
    B, T = input_ids.shape[0], input_ids.shape[1] - tq
    q_len = attention_mask[:, :tq].sum(1)
    r_len = attention_mask[:, tq:].sum(1).clamp(min=1)
    order = torch.argsort(q_len, stable=True)
    size = math.ceil(B / max(1, min(chunks, B)))
    parts: list[tuple[torch.Tensor | None, ...]] = []
    for start in range(0, B, size):
        idx = order[start : start + size]
        lead, tail = tq - int(q_len[idx].max()), int(r_len[idx].max())
        out = fn(input_ids[idx, lead : tq + tail], attention_mask[idx, lead : tq + tail], tq - lead)
        parts.append(tuple(None if o is None else F.pad(o, (0, T - tail)) for o in out))
    inverse = torch.argsort(order)
    return tuple(
        None if parts[0][k] is None else torch.cat([p[k] for p in parts])[inverse]  # type: ignore[misc]
        for k in range(len(parts[0]))
    )


# --------------------------------------------------------------------------- scoring


def load_score_fn(source: RewardSource, device: torch.device, precision: str) -> ScoreFn:
    """A ``score(prompts, responses) -> tensor`` callable for the configured reward source."""
    if source.function:
        mod, _, name = source.function.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.function {source.function!r}: {err}") from err
        return fn
    from palate.reward import RewardModel

    rm = RewardModel.load(source.model)  # type: ignore[arg-type]
    for module in rm.modules():
        module.to(device).requires_grad_(False)
    rm.precision = precision

    def score(prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return rm.score(prompts, responses, batch_size=source.batch_size)

    score.reward_model = rm  # type: ignore[attr-defined]
    return score


# --------------------------------------------------------------------------- the stage


class PPOTrainer:
    """Holds the models, optimiser and controllers; :meth:`step` is one PPO update."""

    def __init__(self, cfg: PPOConfig, score_fn: ScoreFn | None = None):
        self.cfg = cfg
        self.acc = make_accelerator(cfg.tracker, cfg.output_dir)
        self.device = self.acc.device
        self.precision = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)
        self.prompts = [r.prompt for r in read_records(cfg.prompts, "prompts").records][
            : cfg.max_prompts
        ]
        if len(self.prompts) < cfg.ppo.batch_size:
            raise ConfigError(
                f"{cfg.prompts}: {len(self.prompts)} prompts, fewer than ppo.batch_size"
            )
        policy, self.tok = load_model(cfg.model)
        disable_dropout(policy)
        self.ref: Any = None
        if cfg.finetune == "lora":
            policy = apply_lora(policy, cfg.lora)
            store_frozen_linears(policy, self.precision)  # the base is also π_ref
        else:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
            store_frozen_linears(self.ref, self.precision)
        self.policy = policy.to(self.device)
        hidden = base_model(policy).config.hidden_size
        self.value_head: ValueHead | None = None
        self.critic: SeparateCritic | None = None
        self.score_fn = score_fn or load_score_fn(cfg.reward, self.device, self.precision)
        if cfg.critic.mode == "shared":
            self.value_head = ValueHead(hidden).to(self.device)
        else:
            self.critic = self._separate_critic().to(self.device)
        rm = getattr(self.score_fn, "reward_model", None)
        if rm is not None:  # after the critic copied its fp32 weights
            for module in rm.modules():
                store_frozen_linears(module, self.precision)
        engine = cfg.rollout_engine
        if engine == "auto":
            engine = "merged" if cfg.finetune == "lora" or self.precision == "bf16" else "policy"
        ac = lambda: autocast(self.device, self.precision)  # noqa: E731
        self.engine: RolloutEngine = (
            MergedCopyEngine(self.acc.unwrap_model(self.policy), self.precision, ac)
            if engine == "merged" else PolicyEngine(ac)
        )  # fmt: skip
        params = [p for p in self.policy.parameters() if p.requires_grad]
        params += list(self.value_head.parameters()) if self.value_head is not None else []
        params += [p for p in self.critic.parameters() if p.requires_grad] if self.critic else []
        self.params = params
        self.optimizer, self.scheduler = build_optimizer(params, cfg.optim, cfg.ppo.updates)
        kl = cfg.kl
        self.kl_ctl: FixedKLController = (
            AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive
            else FixedKLController(kl.coef)
        )  # fmt: skip
        self.score_moments = RunningMoments()
        self.ptx: list[Any] = []
        if cfg.ppo.ptx_coef > 0:
            from palate.sft import tokenize_demonstration

            demos = read_records(cfg.ppo.ptx_data, "demonstrations").records  # type: ignore[arg-type]
            self.ptx = [tokenize_demonstration(self.tok, d, 512) for d in demos]
        self.step_no = 0

    def _separate_critic(self) -> SeparateCritic:
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        rm = getattr(self.score_fn, "reward_model", None)
        if cfg.critic.init == "reward_model" and rm is not None and rm.kind == "causal":
            src = copy.deepcopy(base_model(rm.model))
            decoder, score = src.model, src.score
            head = ValueHead(score.in_features)
            with torch.no_grad():
                head.linear.weight.copy_(score.weight[:1])
        else:
            if cfg.critic.init == "reward_model" and rm is not None:
                console.print(
                    "[yellow]reward model is not a causal LM: critic starts from the policy"
                )
            model, _ = load_model(cfg.model, auto_class=AutoModelForCausalLM)
            decoder, head = model.get_decoder(), ValueHead(model.config.hidden_size)
        disable_dropout(decoder)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            decoder = get_peft_model(decoder, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                target_modules=cfg.lora.target_modules))  # fmt: skip
            store_frozen_linears(decoder, self.precision)
        return SeparateCritic(decoder, head)

    # ----------------------------------------------------------------- pieces

    def _forward(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, tq: int, *,
                 with_entropy: bool = False, reference: bool = False) -> tuple[Any, Any, Any]:  # fmt: skip
        """log π, V and entropy at the T response positions: ``(B, T)`` each (V, entropy may be
        None), in ``ppo.forward_chunks`` length-sorted groups."""
        temperature = self.cfg.sampling.temperature or 1.0
        head = None if reference else self.value_head
        chunks = self.cfg.ppo.forward_chunks

        def fn(i: torch.Tensor, m: torch.Tensor, t: int) -> tuple[Any, ...]:
            logp, v, ent = policy_forward(model, head, i, m, t, temperature, with_entropy)
            if self.critic is not None and not reference:
                v = self._values(i, m, t)
            return logp, v, ent

        return in_chunks(fn, ids, mask, tq, chunks)

    def _values(self, ids: torch.Tensor, mask: torch.Tensor, tq: int) -> torch.Tensor | None:
        if self.critic is None:
            return None
        T = ids.shape[1] - tq
        return self.critic(ids, mask, _positions(mask), tq - 1, T)

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt]) -> Rollout:
        """Sample responses, then log π_old, log π_ref and V_old in one pass each."""
        cfg, tok = self.cfg, self.tok
        s = cfg.sampling
        q, qm = pad_batch([prompt_ids(tok, p)[-cfg.max_prompt_length :] for p in prompts],
                          tok.pad_token_id)  # fmt: skip
        tq = q.shape[1]
        q, qm = q.to(self.device), qm.to(self.device)
        self.engine.sync(self.acc.unwrap_model(self.policy))
        out = self.engine.generate(q, qm, s, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)  # fmt: skip
        resp = out[:, tq:]
        if resp.shape[1] == 0:
            resp = torch.full((len(prompts), 1), tok.eos_token_id, device=self.device)
        is_eos = resp == tok.eos_token_id
        finished = is_eos.any(1)
        first_eos = torch.where(
            finished,
            is_eos.float().argmax(1),
            torch.full_like(finished, resp.shape[1], dtype=torch.long),
        )
        ar = torch.arange(resp.shape[1], device=self.device)
        mask = (ar[None, :] <= first_eos[:, None]).long()
        mask[~finished] = 1
        resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
        full = torch.cat([q, resp], 1)
        full_mask = torch.cat([qm, mask], 1)
        with autocast(self.device, self.precision):
            logprobs, values, _ = self._forward(self.policy, full, full_mask, tq)
            if self.ref is not None:
                ref_logprobs, _, _ = self._forward(self.ref, full, full_mask, tq, reference=True)
            else:
                with base_model_adapter_disabled(self.policy):
                    ref_logprobs, _, _ = self._forward(self.policy, full, full_mask, tq,
                                                       reference=True)  # fmt: skip
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip()
                 for r, m in zip(resp, mask, strict=True)]  # fmt: skip
        raw = torch.as_tensor(self.score_fn(prompts, texts), dtype=torch.float32).reshape(-1)
        scores = self._shape_scores(raw.to(self.device), finished)
        mask = mask.float()
        return Rollout(
            query_ids=q, query_mask=qm, response_ids=resp, mask=mask,
            logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
            values=(values.float() * mask) if values is not None else torch.zeros_like(mask),
            scores=scores, raw_scores=raw, finished=finished, texts=texts, prompts=prompts,
        )  # fmt: skip

    def _shape_scores(self, scores: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        r = self.cfg.reward
        if r.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, scores - r.missing_eos_penalty)
        if r.normalize:
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if r.clip is not None:
            scores = scores.clamp(-r.clip, r.clip)
        return scores

    def ppo_epochs(self, ro: Rollout) -> dict[str, float]:
        """Clipped policy/value updates over minibatches for ``ppo.epochs`` passes."""
        cfg = self.cfg.ppo
        B = ro.response_ids.shape[0]
        tq = ro.query_ids.shape[1]
        full = torch.cat([ro.query_ids, ro.response_ids], 1)
        full_mask = torch.cat([ro.query_mask, ro.mask.long()], 1)
        stats: dict[str, list[float]] = {}
        self.policy.train()
        stop = False
        epochs_done = 0
        for _epoch in range(cfg.epochs):
            epochs_done += 1
            perm = torch.randperm(B).tolist()
            for start in range(0, B, cfg.mini_batch_size):
                idx = perm[start : start + cfg.mini_batch_size]
                m = ro.mask[idx]
                with autocast(self.device, self.precision):
                    logp, v, ent = self._forward(self.policy, full[idx], full_mask[idx], tq,
                                                 with_entropy=True)  # fmt: skip
                pg, clipfrac, approxkl = policy_loss(
                    logp,
                    ro.logprobs[idx],
                    ro.advantages[idx],
                    m,
                    cfg.cliprange,  # type: ignore[index]
                )
                vf, vf_clipfrac = value_loss(
                    v.float(),
                    ro.values[idx],
                    ro.returns[idx],
                    m,
                    cfg.cliprange_value,  # type: ignore[union-attr,index]
                )
                entropy = masked_mean(ent, m)
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
                if cfg.ptx_coef > 0:
                    loss = loss + cfg.ptx_coef * self._ptx_loss()
                self.acc.backward(loss)
                gn = None
                if self.cfg.optim.max_grad_norm is not None:
                    gn = self.acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, val in (("policy/loss", pg), ("policy/clipfrac", clipfrac),
                               ("policy/approxkl", approxkl), ("value/loss", vf),
                               ("value/clipfrac", vf_clipfrac), ("objective/entropy", entropy),
                               ("policy/grad_norm", gn)):  # fmt: skip
                    if val is not None:
                        stats.setdefault(k, []).append(
                            float(val.detach() if hasattr(val, "detach") else val)
                        )
            if cfg.target_approx_kl is not None and (
                sum(stats["policy/approxkl"][-math.ceil(B / cfg.mini_batch_size):])
                / math.ceil(B / cfg.mini_batch_size) > cfg.target_approx_kl
            ):  # fmt: skip
                stop = True
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/epochs"] = epochs_done
        out["policy/early_stop"] = float(stop)
        return out

    def _ptx_loss(self) -> torch.Tensor:
        from palate.sft import _response_ce, collate

        j = torch.randint(len(self.ptx), (self.cfg.ppo.mini_batch_size,)).tolist()
        batch = {k: v.to(self.device) for k, v in collate([self.ptx[i] for i in j],
                                                           self.tok.pad_token_id).items()}  # fmt: skip
        with autocast(self.device, self.precision):
            ce, n = _response_ce(self.policy, batch, fast=True)
        return ce / n.clamp(min=1)

    # ----------------------------------------------------------------- one update

    def step(self, prompts: list[Prompt]) -> tuple[dict[str, float], Rollout]:
        """One PPO update, as in the paper."""
        cfg = self.cfg
        t0 = time.perf_counter()
        ro = self.rollout(prompts)  # sample + score
        t_rollout = time.perf_counter() - t0
        beta = self.kl_ctl.value
        ro.kl = kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator) * ro.mask
        ro.rewards = penalised_rewards(ro.scores, ro.kl, ro.mask, beta)  # KL-penalised reward
        adv, ro.returns = gae(ro.rewards, ro.values, ro.mask, cfg.ppo.gamma, cfg.ppo.lam)
        ro.advantages = masked_whiten(adv, ro.mask) if cfg.ppo.whiten_advantages else adv
        t1 = time.perf_counter()
        stats = self.ppo_epochs(ro)  # clipped update
        self.scheduler.step()
        t_update = time.perf_counter() - t1
        kl_seq = ro.kl.sum(1).mean().item()
        k3 = (kl_estimate(ro.logprobs, ro.ref_logprobs, "k3") * ro.mask).sum(1).mean().item()
        ev = 1 - masked_var(ro.returns - ro.values, ro.mask) / masked_var(
            ro.returns, ro.mask
        ).clamp(min=1e-8)
        lengths = ro.mask.sum(1)
        row = {  # log
            "objective/score": ro.raw_scores.mean().item(),
            "objective/score_shaped": ro.scores.mean().item(),
            "objective/kl": kl_seq,
            "objective/kl_k3": k3,
            "objective/kl_coef": beta,
            "objective/rlhf_reward": ro.rewards.sum(1).mean().item(),
            "objective/non_score_reward": (-beta * ro.kl).sum(1).mean().item(),
            **stats,
            "value/explained_variance": ev.item(),
            "value/mean": masked_mean(ro.values, ro.mask).item(),
            "response/length": lengths.mean().item(),
            "response/eos_rate": ro.finished.float().mean().item(),
            "timing/rollout": t_rollout,
            "timing/update": t_update,
            "throughput/episodes_per_s": len(prompts) / (t_rollout + t_update),
        }
        self.kl_ctl.update(kl_seq, len(prompts))  # adapt KL
        self.step_no += 1
        return row, ro

    # ----------------------------------------------------------------- state

    def save_checkpoint(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        pol = self.acc.unwrap_model(self.policy)
        pol.save_pretrained(path / "policy", safe_serialization=True)
        self.tok.save_pretrained(path / "policy")
        extra: dict[str, Any] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), path / "value_head.safetensors")
        if self.critic is not None:
            trainable = {n: p.detach().cpu().contiguous()
                         for n, p in self.critic.named_parameters() if p.requires_grad}  # fmt: skip
            save_file(trainable, path / "critic.safetensors")
        save_training_state(path, optimizer=self.optimizer, scheduler=self.scheduler,
                            state={"step": self.step_no, "stage": "ppo"}, extra=extra)  # fmt: skip

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        pol = self.acc.unwrap_model(self.policy)
        if self.cfg.finetune == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(pol, load_file(path / "policy" / "adapter_model.safetensors"))
        else:
            weights = load_file(path / "policy" / "model.safetensors")
            pol.load_state_dict(weights, strict=False)
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(path / "value_head.safetensors"))
        if self.critic is not None:
            self.critic.load_state_dict(load_file(path / "critic.safetensors"), strict=False)
        state, blob = load_training_state(path)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.kl_ctl.load_state_dict(blob["kl_ctl"])
        self.score_moments.load_state_dict(blob["score_moments"])
        restore_rng(blob["rng"])
        self.step_no = state["step"]


class base_model_adapter_disabled:  # noqa: N801 - used as a context manager
    """``with base_model_adapter_disabled(policy):`` runs the policy as its frozen base (π_ref)."""

    def __init__(self, model: Any):
        m = model.module if hasattr(model, "module") else model
        self._ctx = m.disable_adapter() if hasattr(m, "disable_adapter") else None

    def __enter__(self) -> None:
        if self._ctx is None:
            raise ConfigError("finetune: lora needs a peft model for the reference policy")
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)


def merged_policy(spec: str, peft_policy: Any) -> Any:
    """The fp32 initial weights with the trained adapters merged in.

    The policy in memory may hold its frozen base in bf16 (see
    :func:`palate.training.store_frozen_linears`); merging there would round the update away,
    so the adapters are merged into a fresh fp32 load of the initial model.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base, _ = load_model(spec)
    fresh = get_peft_model(base, copy.deepcopy(peft_policy.peft_config["default"]))
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_policy))
    return fresh.merge_and_unload()


def ppo(
    cfg: PPOConfig, *, score_fn: ScoreFn | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """``palate ppo``: run ``ppo.updates`` PPO updates; returns the summary.

    ``score_fn`` overrides ``cfg.reward`` with a Python callable (rule-based rewards, remote
    judges). ``stop_after=k`` stops after update k with a checkpoint, as if interrupted.
    """
    run = RunDir(cfg.output_dir)
    run.create(cfg)
    trainer = PPOTrainer(cfg, score_fn)
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        console.print(f"resuming from {ckpt} (update {trainer.step_no}/{cfg.ppo.updates})")
    metrics = MetricsLogger(
        run.metrics_path,
        resume_step=trainer.step_no if ckpt is not None else None,
        accelerator=trainer.acc if cfg.tracker != "none" else None,
    )
    start_trackers(trainer.acc, cfg.tracker, "palate-ppo", cfg)
    n = len(trainer.prompts)
    per_epoch = n // cfg.ppo.batch_size
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def checkpoint() -> None:
        trainer.save_checkpoint(run.checkpoint_dir(trainer.step_no))
        prune_checkpoints(run.checkpoints, cfg.keep_checkpoints)

    stopped = False
    with progress_bar("ppo", total=cfg.ppo.updates, completed=trainer.step_no) as bar:
        try:
            while trainer.step_no < cfg.ppo.updates:
                epoch, k = divmod(trainer.step_no, per_epoch)
                order = epoch_order(n, cfg.seed, epoch)
                batch = [trainer.prompts[i] for i in
                         order[k * cfg.ppo.batch_size : (k + 1) * cfg.ppo.batch_size]]  # fmt: skip
                row, ro = trainer.step(batch)
                rows.append(row)
                metrics.log(trainer.step_no, row)
                if trainer.step_no % cfg.sample_every == 0 or trainer.step_no == 1:
                    write_jsonl(run.path / "samples" / f"update-{trainer.step_no:05d}.jsonl", [
                        {"prompt": prompt_text(p), "response": t, "score": s}
                        for p, t, s in zip(ro.prompts, ro.texts, ro.raw_scores.tolist(), strict=True)
                    ])  # fmt: skip
                bar.update(trainer.step_no, score=row["objective/score"], kl=row["objective/kl"],
                           beta=row["objective/kl_coef"])  # fmt: skip
                stopped = stop_after is not None and stop_after <= trainer.step_no < cfg.ppo.updates
                if (
                    trainer.step_no % cfg.checkpoint_every == 0
                    or stopped
                    or (trainer.step_no == cfg.ppo.updates)
                ):
                    checkpoint()
                if stopped:
                    break
        except KeyboardInterrupt:
            checkpoint()
            metrics.close()
            raise
    metrics.close()
    history = run.metrics()
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary: dict[str, Any] = {
        "stage": "ppo",
        "output_dir": str(run.path),
        "updates": trainer.step_no,
        "score_first": first.get("objective/score"),
        "score_last": last.get("objective/score"),
        "kl_last": last.get("objective/kl"),
        "kl_coef_last": last.get("objective/kl_coef"),
        "eos_rate_last": last.get("response/eos_rate"),
        "length_last": last.get("response/length"),
        "episodes_per_s": (len(rows) * cfg.ppo.batch_size) / (time.perf_counter() - t_start)
        if rows else None,
        "precision": trainer.precision,
    }  # fmt: skip
    if stopped:
        summary["stopped_at"] = trainer.step_no
        return summary
    final = trainer.acc.unwrap_model(trainer.policy)
    if cfg.finetune == "lora":
        final = merged_policy(cfg.model, final)
    final.save_pretrained(run.final, safe_serialization=True)
    trainer.tok.save_pretrained(run.final)
    summary["final"] = str(run.final)
    run.write_summary(summary)
    trainer.acc.end_training()
    return summary
