"""Config of ``palate ppo``.

:class:`PPORecipe` is how PPO runs (everything but the policy, the prompts, the reward source and
the output directory); :class:`PPOConfig` adds those for ``palate ppo``, and ``palate run``
supplies them itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from palate.compiling import CompileSettings
from palate.config import ADDED_LATER, Config
from palate.feedback.config import JudgeSettings
from palate.ppo.monitors import MonitorSettings
from palate.sampling import SamplingConfig
from palate.training import LoraSettings, OptimSettings, StageConfig, StageSettings

__all__ = [
    "CriticSettings",
    "KLSettings",
    "PPOConfig",
    "PPOOptimSettings",
    "PPORecipe",
    "PPOSettings",
    "RewardShaping",
    "RewardSource",
]


class PPOOptimSettings(OptimSettings):
    """PPO's optimiser: AdamW with the references' epsilon 1e-5 (openai/lm-human-preferences
    and Huang et al. 2024 use Adam(eps=1e-5); with 1e-8, parameters whose second moment is tiny
    take near-sign-sized steps), a constant learning rate and no warm-up."""

    lr: float = Field(5e-5, gt=0, description="Learning rate (AdamW).")
    eps: float = Field(1e-5, gt=0, description="AdamW epsilon (1e-5 as in the references).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "constant", description="Decay after warm-up: cosine, linear (to 0) or constant."
    )
    warmup_ratio: float = Field(
        0.0, ge=0, le=1, description="Fraction of optimiser steps spent warming up linearly."
    )


class RewardShaping(Config):
    """How scores become PPO's reward: batching, missing-EOS penalty, clipping, whitening."""

    batch_size: int = Field(16, ge=1, description="Sequences scored together by a reward model.")
    missing_eos_penalty: float | None = Field(
        1.0,
        description="Subtract this from the score of responses cut off at max_new_tokens (no "
        "EOS); a palate reward model's unit is one std of the initial policy's rewards. "
        "null: off.",
    )
    decline_bonus: dict[str, float] = Field(
        default_factory=dict,
        description="A rule-based reward (Mu et al. 2024, Rule Based Rewards for Language Model "
        "Safety): {criterion: bonus} added to the score of a response that declines "
        "(palate.text.declines: refuses and says it cannot or will not help; an apology or "
        "sympathy alone does not) to a prompt of that criterion (its metadata.criterion in the "
        "prompts file; helpfulness when absent); a negative bonus is a penalty. In the score's "
        "units (a palate reward model's: one std of the initial policy's rewards); added before "
        "clipping and whitening. Empty: off.",
        json_schema_extra=ADDED_LATER,
    )
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip].")
    normalize: bool = Field(
        False, description="Whiten scores with running mean/std across updates."
    )


class RewardSource(RewardShaping):
    """Where scores come from — a palate reward model, a Python callable or an AI judge (direct
    RLAIF) — and their shaping."""

    model: str | None = Field(None, description="A trained reward model directory (RUN/final).")
    function: str | None = Field(
        None,
        description="Or 'module:function' taking (prompts, responses) and returning scores.",
    )
    judge: JudgeSettings | None = Field(
        None,
        description="Or an AI judge scoring each response directly (d-RLAIF): its expected 1-9 "
        "rating under the principles' rating questions, mapped to [-1, 1].",
    )
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="{criterion: reward model directory}: a prompt whose criterion (its "
        "metadata.criterion in the prompts file; helpfulness when absent) has a model here is "
        "scored by that model, every other prompt by reward.model (Llama 2's separate safety "
        "and helpfulness reward models; palate.reward.routed).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        if sum(x is not None for x in (self.model, self.function, self.judge)) != 1:
            raise ValueError("set exactly one of reward.model, reward.function and reward.judge")
        if self.routes and self.model is None:
            raise ValueError("reward.routes needs reward.model (the model of other prompts)")
        return self


class KLSettings(Config):
    """The KL leash: per-token penalty β·KL(π_θ ‖ π_ref)."""

    coef: float = Field(0.05, ge=0, description="β, the initial (or fixed) KL coefficient.")
    adaptive: bool = Field(True, description="Adapt β toward `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per response (nats), if adaptive.")
    horizon: int | None = Field(
        None,
        ge=1,
        description="Adaptive controller horizon in episodes (null: the run's length, "
        "ppo.updates × ppo.batch_size, so β can move by up to ±20%·e over the run).",
    )
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
    forward_chunks: int | None = Field(
        None,
        ge=1,
        description="Run each forward as this many groups of rows sorted by prompt length, "
        "each trimmed to its own padding (same maths, less padding computed); null = 2 on a "
        "CPU, 1 on a GPU (where each forward's launch overhead costs more than the padding).",
    )
    ptx_coef: float = Field(0.0, ge=0, description="Weight of an SFT loss mixed in (PPO-ptx).")
    ptx_data: str | None = Field(None, description="Demonstrations for the PPO-ptx loss.")


class PPORecipe(StageSettings):
    """How PPO runs: everything but the policy, the prompts, the reward source and the run
    directory."""

    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="LoRA (the reference is the base with adapters off) or full (frozen copy).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    init_adapter: str | None = Field(
        None,
        description="finetune lora: start from this LoRA adapter (a PPO checkpoint's policy/, "
        "e.g. the previous round's) instead of fresh adapters; the reference stays the base "
        "model (adapters off), so the KL is to the initial policy.",
        json_schema_extra=ADDED_LATER,
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0),
        description="Rollout sampling (log-probs use the same temperature).",
    )
    episode_seeds: bool = Field(
        False,
        description="Draw each episode's sampling noise from its own seed (run seed, update, "
        "episode; Gumbel-max, palate.sampling.EpisodeNoise) instead of the global RNG: a run "
        "then samples the same episodes in any number of processes or batch layouts. Costs "
        "batch × vocabulary random numbers per token.",
        json_schema_extra=ADDED_LATER,
    )
    max_prompt_length: int = Field(256, ge=8, description="Prompts are cut from the left to this.")
    rollout_engine: Literal["auto", "policy", "merged"] = Field(
        "auto",
        description="Sampler: 'policy' generates with the training policy; 'merged' with an "
        "inference copy (LoRA merged, frozen weights in bf16; faster, one more model in memory); "
        "'auto' = merged for LoRA or bf16, else policy.",
    )
    compile: CompileSettings = Field(
        default_factory=CompileSettings,
        description="torch.compile of the training forwards and of rollout decoding (on a GPU "
        "by default; see palate.compiling).",
    )
    kl: KLSettings = Field(default_factory=KLSettings, description="KL penalty.")
    critic: CriticSettings = Field(default_factory=CriticSettings, description="Critic.")
    ppo: PPOSettings = Field(default_factory=PPOSettings, description="PPO.")
    optim: PPOOptimSettings = Field(
        default_factory=PPOOptimSettings, description="Optimiser (policy, value head and critic)."
    )
    sample_every: int = Field(5, ge=1, description="Write sample responses every N updates.")
    checkpoint_every: int = Field(5, ge=1, description="Checkpoint every N updates.")
    monitors: MonitorSettings = Field(
        default_factory=MonitorSettings,
        description="Alarms during training: reward hacking (with a gold), length inflation, "
        "KL budget, diversity collapse, one answer for many prompts, repetition.",
    )

    @field_validator("sampling")
    @classmethod
    def _plain_sampling(cls, s: SamplingConfig) -> SamplingConfig:
        if s.temperature == 0 or s.top_p < 1 or s.top_k > 0:
            raise ValueError(
                "PPO samples at a plain temperature (temperature > 0, top_p 1, top_k 0): log π "
                "is computed at the tempered distribution, so greedy or truncated sampling "
                "would make every rollout off-policy"
            )
        return s

    @model_validator(mode="after")
    def _check(self) -> PPORecipe:
        if self.ppo.batch_size % self.ppo.mini_batch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.mini_batch_size")
        if self.ppo.ptx_coef > 0 and not self.ppo.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data")
        if self.init_adapter is not None and self.finetune != "lora":
            raise ValueError("init_adapter needs finetune: lora")
        return self


class PPOConfig(PPORecipe, StageConfig):
    """Config for ``palate ppo``."""

    model: str = Field(
        "smollm2-135m-instruct", description="Initial policy (usually the SFT run's final/)."
    )
    prompts: str = Field(description="Prompts JSONL (any palate data file; prompts are used).")
    reward: RewardSource = Field(description="Reward model or function, and shaping.")
