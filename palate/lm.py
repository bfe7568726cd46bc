"""Causal-LM helpers shared by SFT and PPO: logits only where they are needed.

A full forward computes ``(B, T, V)`` logits; with V = 49k that is most of the memory and a
large share of the time. SFT and PPO only need next-token distributions at response positions,
so :func:`selected_logits` runs the decoder, gathers the hidden states at the requested
positions and applies the LM head to those alone.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["base_model", "selected_logits"]


def base_model(model: Any) -> Any:
    """The transformers model under peft / DDP / accelerate wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module  # DDP
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # peft
        else:
            return model


def _head_is_plain(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    special = ("final_logit_softcapping", "logit_scale", "output_mult", "logits_scaling")
    return cfg is not None and not any(getattr(cfg, k, None) for k in special)


def selected_logits(
    model: Any,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    positions: torch.Tensor,  # (B, T) bool: positions whose next-token logits are wanted
    *,
    fast: bool = True,
) -> torch.Tensor:  # (N, V) with N = positions.sum(), in row-major order
    """Next-token logits at ``positions`` only.

    With ``fast`` the LM head runs on the selected hidden states alone. It falls back to a full
    forward for heads with extra scaling/soft-capping, and must be off under DDP (calling a
    submodule bypasses DDP's gradient hooks).
    """
    base = base_model(model)
    if fast and _head_is_plain(base) and hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return base.get_output_embeddings()(hidden[positions])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[positions]
