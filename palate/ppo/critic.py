"""The value function V(s): a head on the policy's hidden states, or a critic of its own
(:func:`separate_critic`: its set-up from the reward model or the initial policy)."""

from __future__ import annotations

import copy

import torch

from palate.lm import base_model
from palate.models import load_model
from palate.ppo.config import PPOConfig
from palate.progress import console
from palate.reward.model import RewardModelScorer, ScoreFn
from palate.reward.routed import RoutedScorer
from palate.training import disable_dropout, store_frozen_linears

__all__ = ["SeparateCritic", "ValueHead", "separate_critic"]


class ValueHead(torch.nn.Module):
    """Scalar value per position from a backbone's hidden states (zero-initialised), computed
    in fp32 even under bf16 autocast (returns and advantages are fp32; the references' value
    head is fp32)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) → (B, T)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


class SeparateCritic(torch.nn.Module):
    """A critic with its own decoder backbone and a value head."""

    def __init__(self, decoder: torch.nn.Module, head: ValueHead):
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, Tq + T)
        attention_mask: torch.Tensor,  # (B, Tq + T)
        position_ids: torch.Tensor,  # (B, Tq + T)
        start: int,
        length: int,
    ) -> torch.Tensor:  # (B, T) values at positions start … start+length-1
        h = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.head(h[:, start : start + length])


def separate_critic(cfg: PPOConfig, score_fn: ScoreFn, precision: str) -> SeparateCritic:
    """``critic.mode: separate``: a decoder of its own with a value head, started from the
    reward model (``critic.init: reward_model``, a causal one: V starts as its normalised
    score) or from the initial policy; LoRA adapters on it under ``finetune: lora``."""
    # heavy: transformers loads only when a model is built
    from transformers import AutoModelForCausalLM

    scorer = score_fn if isinstance(score_fn, RewardModelScorer) else None
    if isinstance(score_fn, RoutedScorer) and isinstance(score_fn.default, RewardModelScorer):
        scorer = score_fn.default  # V starts as the default route's reward model
    rm = scorer.reward_model if scorer is not None else None
    if cfg.critic.init == "reward_model" and rm is not None and rm.kind == "causal":
        src = copy.deepcopy(base_model(rm.model))
        decoder, score = src.model, src.score
        head = ValueHead(score.in_features)
        with torch.no_grad():  # V starts as the reward model's normalised score
            head.linear.weight.copy_(score.weight[:1] * rm.gain)
            bias = float(score.bias[0]) if score.bias is not None else 0.0
            head.linear.bias.fill_(bias * rm.gain + rm.offset)
    else:
        if cfg.critic.init == "reward_model" and rm is not None:
            console.print("[yellow]reward model is not a causal LM: critic starts from the policy")
        model, _ = load_model(cfg.model, auto_class=AutoModelForCausalLM)
        decoder, head = model.get_decoder(), ValueHead(model.config.hidden_size)
    disable_dropout(decoder)
    if cfg.finetune == "lora":
        # heavy: loaded only when LoRA is used
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        decoder = get_peft_model(
            decoder,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=0.0,
                target_modules=lora.target_modules,
            ),
        )
        store_frozen_linears(decoder, precision)
    return SeparateCritic(decoder, head)
