"""sample → score: PPO's rollouts.

The policy answers a batch of prompts through a rollout engine (KV cache, temperature, stop at
EOS); one forward then gives log π_θ and V(s) at every response position
(:meth:`ActorCritic.forward`, over :func:`palate.lm.policy_forward`), and the same forward with
the LoRA adapters switched off gives log π_ref (no second copy of the weights). The reward
source scores each response; rule rewards are added and the scores shaped
(:mod:`palate.ppo.rewards`) on the global batch.

In W processes each rank samples its share of the prompts and the episodes of all ranks are
gathered (:mod:`palate.ppo.distributed`): a :class:`Rollout` is the global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from palate.data import Prompt
from palate.formatting import pad_batch, prompt_ids
from palate.lm import policy_forward, position_ids, trimmed_by_prompt_length
from palate.models import adapters_disabled
from palate.ppo.config import PPOConfig
from palate.ppo.critic import SeparateCritic, ValueHead
from palate.ppo.distributed import gather_episodes, gather_objects
from palate.ppo.rewards import rule_rewards, shape_scores
from palate.ppo_math import RunningMoments
from palate.reward.model import ScoreFn
from palate.sampling import RolloutEngine, episode_seed
from palate.training import autocast

__all__ = ["ActorCritic", "Rollout", "RolloutSampler"]


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
    rule_scores: torch.Tensor | None = None  # (B,) reward.decline_bonus, added before shaping
    rewards: torch.Tensor | None = None  # (B, T) −β·KL_t (+ score at the last token)
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate used in the reward
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)


@dataclass
class ActorCritic:
    """The networks PPO runs: π_θ with V (a value head on the policy, or a separate critic) and
    π_ref (a frozen copy for full fine-tuning, else the policy with its LoRA adapters off)."""

    policy: Any
    ref: Any  # None: LoRA, whose base is π_ref
    value_head: ValueHead | None
    critic: SeparateCritic | None
    temperature: float  # log π of the sampling distribution
    chunks: int  # length-sorted groups per forward

    def forward(
        self,
        model: Any,
        input_ids: torch.Tensor,  # (B, Tq + T)
        attention_mask: torch.Tensor,  # (B, Tq + T)
        prompt_width: int,
        *,
        with_entropy: bool = False,
        reference: bool = False,
    ) -> tuple[Any, ...]:
        """log π, V and entropy at the T response positions: ``(B, T)`` each (V, entropy may be
        None), in ``ppo.forward_chunks`` length-sorted groups."""
        head = None if reference else self.value_head

        def forward(ids: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[Any, ...]:
            logp, values, entropy = policy_forward(
                model, head, ids, mask, width, self.temperature, with_entropy
            )
            if self.critic is not None and not reference:
                values = self.critic(ids, mask, position_ids(mask), width - 1, ids.shape[1] - width)
            return logp, values, entropy

        return trimmed_by_prompt_length(
            forward, input_ids, attention_mask, prompt_width, self.chunks
        )

    def reference_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """log π_ref at the response positions ``(B, T)``."""
        if self.ref is not None:
            logp, _, _ = self.forward(
                self.ref, input_ids, attention_mask, prompt_width, reference=True
            )
            return logp
        with adapters_disabled(self.policy):
            logp, _, _ = self.forward(
                self.policy, input_ids, attention_mask, prompt_width, reference=True
            )
        return logp


class RolloutSampler:
    """sample → score: each update's :class:`Rollout` (see the module's docstring)."""

    def __init__(
        self,
        cfg: PPOConfig,
        *,
        acc: Any,
        tok: Any,
        nets: ActorCritic,
        engine: RolloutEngine,
        score_fn: ScoreFn,
        criteria: Mapping[str, str],
        score_moments: RunningMoments,
        precision: str,
    ):
        self.cfg, self.acc, self.tok, self.nets, self.engine = cfg, acc, tok, nets, engine
        self.score_fn, self.criteria, self.score_moments = score_fn, criteria, score_moments
        self.device, self.precision = acc.device, precision
        self.world, self.rank = acc.num_processes, acc.process_index

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], update: int) -> Rollout:
        """Sample responses, then log π_old, log π_ref and V_old in one pass each; score them.

        In W processes this rank samples ``prompts[rank::W]`` and the episodes of all ranks are
        gathered (:mod:`palate.ppo.distributed`): the returned rollout is the global batch.
        """
        episodes = list(range(len(prompts)))[self.rank :: self.world]  # this rank's share
        local = self.local([prompts[i] for i in episodes], episodes, update)
        if self.world > 1:
            pad = self.tok.pad_token_id
            texts = gather_objects(local.pop("texts"), self.world)
            gathered: dict[str, Any] = gather_episodes(
                local,
                world=self.world,
                pad={
                    "query_ids": ("left", pad),
                    "query_mask": ("left", 0),
                    "response_ids": ("right", pad),
                    "mask": ("right", 0),
                    "logprobs": ("right", 0.0),
                    "ref_logprobs": ("right", 0.0),
                    "values": ("right", 0.0),
                },
            )
            local = {**gathered, "texts": texts}
        raw, finished = local.pop("raw_scores"), local["finished"]
        bonus = self.cfg.reward.decline_bonus
        rule = rule_rewards(prompts, local["texts"], bonus, self.criteria, self.device)
        # on the global batch: the missing-EOS penalty, normalisation, clipping
        scores = shape_scores(
            raw.to(self.device) + rule, finished, self.cfg.reward, self.score_moments
        )
        return Rollout(**local, scores=scores, raw_scores=raw, prompts=prompts, rule_scores=rule)

    def local(self, prompts: list[Prompt], episodes: list[int], update: int) -> dict[str, Any]:
        """This process's episodes: sampled ids, masks, log π_old, log π_ref, V_old, raw
        scores, decoded texts (``episodes``: their indices in the update's batch)."""
        cfg, tok = self.cfg, self.tok
        query_ids, query_mask = pad_batch(
            [prompt_ids(tok, p)[-cfg.max_prompt_length :] for p in prompts], tok.pad_token_id
        )
        width = query_ids.shape[1]
        query_ids, query_mask = query_ids.to(self.device), query_mask.to(self.device)
        response, mask, finished = self.responses(query_ids, query_mask, episodes, update)
        full = torch.cat([query_ids, response], 1)
        full_mask = torch.cat([query_mask, mask], 1)
        with autocast(self.device, self.precision):
            logprobs, values, _ = self.nets.forward(self.nets.policy, full, full_mask, width)
            ref_logprobs = self.nets.reference_logprobs(full, full_mask, width)
        texts = [
            tok.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(response, mask, strict=True)
        ]
        raw = torch.as_tensor(self.score_fn(prompts, texts), dtype=torch.float32).reshape(-1)
        mask = mask.float()
        return {
            "query_ids": query_ids,
            "query_mask": query_mask,
            "response_ids": response,
            "mask": mask,
            "logprobs": logprobs * mask,
            "ref_logprobs": ref_logprobs * mask,
            "values": (values.float() * mask) if values is not None else torch.zeros_like(mask),
            "raw_scores": raw.to(self.device),
            "finished": finished,
            "texts": texts,
        }

    def responses(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, episodes: list[int], update: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled responses ``(B, T)`` (pad after EOS), their mask ``(B, T)`` (1 through EOS;
        all of a response that never ends) and whether each emitted EOS ``(B,)``."""
        cfg, tok = self.cfg, self.tok
        width = query_ids.shape[1]
        self.engine.sync(self.acc.unwrap_model(self.nets.policy))
        seeds = None
        if cfg.episode_seeds:  # each episode's noise from (seed, update, episode)
            seeds = [episode_seed(cfg.seed, update, i) for i in episodes]
        sampled = self.engine.generate(
            query_ids,
            query_mask,
            cfg.sampling,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            seeds=seeds,
        )
        response = sampled[:, width:]
        if response.shape[1] == 0:
            response = torch.full((len(episodes), 1), tok.eos_token_id, device=self.device)
        is_eos = response == tok.eos_token_id
        finished = is_eos.any(1)
        first_eos = torch.where(
            finished,
            is_eos.float().argmax(1),
            torch.full_like(finished, response.shape[1], dtype=torch.long),
        )
        positions = torch.arange(response.shape[1], device=self.device)
        mask = (positions[None, :] <= first_eos[:, None]).long()
        mask[~finished] = 1
        response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        return response, mask, finished
