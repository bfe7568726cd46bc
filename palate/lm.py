"""Causal-LM forwards shared by SFT, PPO and evaluation: log-probs and logits only where needed.

A full forward computes ``(B, T, V)`` logits; with V = 49k that is most of the memory and a
large share of the time. SFT, PPO and evaluation only need next-token distributions at response
positions, so the helpers here run the decoder and apply the LM head to those positions alone —
always through the model's own head code, so logit soft-capping (Gemma-2/3), ``logit_scale``
(Cohere) and ``logits_scaling`` (Granite) are applied exactly as in ``generate``.

* :func:`policy_forward` — log π(a_t | s_t) (and V(s_t), entropy) at the response positions:
  what PPO's ratio and KL penalty and the evaluation's KL are made of.
* :func:`response_cross_entropy` — the SFT loss (summed) with the head at response positions.
* :func:`selected_logits` — next-token logits at arbitrary positions.
* :func:`in_length_groups` / :func:`trimmed_by_prompt_length` — the chunked forward: rows sorted
  by length, each group padded only to its own longest row (reward model and PPO).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "base_model",
    "fp32_head",
    "in_length_groups",
    "policy_forward",
    "position_ids",
    "response_cross_entropy",
    "selected_logits",
    "trimmed_by_prompt_length",
]

IGNORE_INDEX = -100  # label of positions without loss (prompt, padding), as in transformers

# Config attributes of models whose forward transforms the LM head's output.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_mult", "logits_scaling")

Outputs = tuple[torch.Tensor | None, ...]


def base_model(model: Any) -> Any:
    """The transformers model under peft / DDP / accelerate wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module  # DDP
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # peft
        else:
            return model


def plain_lm_head(model: Any) -> bool:
    """Whether the model's logits are just its output embedding applied to the last hidden
    state (no soft-capping or scaling in its forward)."""
    cfg = getattr(model, "config", None)
    return cfg is not None and not any(getattr(cfg, k, None) for k in _HEAD_TRANSFORMS)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the attention mask (left padding), as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    if fast and plain_lm_head(base) and hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return base.get_output_embeddings()(hidden[positions])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[positions]


def response_cross_entropy(
    model: Any, batch: dict[str, torch.Tensor], *, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy over response tokens, number of response tokens) for a batch with
    ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX where no loss): the SFT loss
    (:func:`palate.sft.sft_loss`) with the LM head applied at response positions only."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = targets != IGNORE_INDEX
    logits = selected_logits(
        model, batch["input_ids"], batch["attention_mask"], positions, fast=fast
    )  # (N, V)
    ce = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")
    return ce, positions.sum()


def fp32_head(
    head: Any, h: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """``head(h)`` computed in fp32 even under bf16 autocast (``forward``: the head's own
    forward, when ``head.forward`` is replaced).

    log π feeds PPO's ratio and the KL, and bf16 logits are rounded by ~0.06 at |logit| 20
    (8 mantissa bits): noise of the order of the ratio's clip range. The references compute
    log-probs in fp32 (openai/lm-human-preferences runs in fp32; Huang et al. 2024).
    """
    with torch.autocast(device_type=h.device.type, enabled=False):
        if head.weight.dtype != torch.float32 and type(head) is torch.nn.Linear:
            # a frozen copy that stores its weights in bf16
            bias = None if head.bias is None else head.bias.float()
            return F.linear(h.float(), head.weight.float(), bias)
        return (forward or head)(h.to(head.weight.dtype))


@contextlib.contextmanager
def _head_computed_in_fp32(head: Any) -> Iterator[None]:
    """Inside, the module ``head`` computes as :func:`fp32_head` (for models whose own forward
    applies the head and then transforms its output)."""
    head.forward = functools.partial(fp32_head, head, forward=head.forward)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def _head_states_and_logits(
    base: Any,
    input_ids: torch.Tensor,  # (B, Tq + T)
    attention_mask: torch.Tensor,  # (B, Tq + T)
    start: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states the LM head sees, its logits) at positions start … start+length-1."""
    positions = position_ids(attention_mask)
    if plain_lm_head(base):
        h = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,  # no KV cache to build (and no cache index for compiled layers)
        ).last_hidden_state
        h = h[:, start : start + length]  # (B, T, H)
        return h, fp32_head(base.get_output_embeddings(), h)
    # The model's own forward applies its head transform (soft-capping, scaling); the head's
    # input is captured for the value head.
    seen: list[torch.Tensor] = []
    head = base.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    keep = torch.arange(start, start + length, device=input_ids.device)
    try:  # logits_to_keep: the head (and `seen`) see only the kept positions
        with _head_computed_in_fp32(head):
            out = base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                logits_to_keep=keep,
                use_cache=False,
            )
    finally:
        hook.remove()
    return seen[-1], out.logits


def policy_forward(
    policy: Any,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None,
    input_ids: torch.Tensor,  # (B, Tq + T) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor,  # (B, Tq + T)
    prompt_width: int,  # Tq
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log π(a_t|s_t), V(s_t), entropy), each (B, T), at the T response positions.

    Logits are the model's own (head transforms included), computed in fp32 even under bf16
    autocast (:func:`fp32_head`), divided by the sampling temperature, so log π is the
    distribution the tokens were sampled from. The value head (if
    any) reads the same hidden states as the LM head, in the same forward; positions follow the
    attention mask (left padding), exactly as in ``generate``.
    """
    base = base_model(policy)
    T = input_ids.shape[1] - prompt_width
    h, logits = _head_states_and_logits(base, input_ids, attention_mask, prompt_width - 1, T)
    logp_all = F.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)  # (B, T, V)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_width:].unsqueeze(-1)).squeeze(-1)
    values = value_head(h) if value_head is not None else None
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logprobs, values, entropy


# --------------------------------------------------------------------------- chunked forwards


def in_length_groups(
    fn: Callable[[torch.Tensor], Sequence[torch.Tensor | None]],
    lengths: torch.Tensor,  # (N,) sort key of each row
    groups: int,
) -> Outputs:
    """``fn(rows)`` over ``groups`` groups of rows of similar length, outputs reassembled.

    Rows are sorted (stably) by ``lengths`` and cut into ``groups`` equal groups, so a caller
    that pads each group to its own longest row computes less padding than one call over all
    rows. ``fn`` gets the group's row indices and returns tensors whose first dimension is the
    group's rows (or None); the results come back in the original row order.
    """
    n = int(lengths.shape[0])
    order = torch.argsort(lengths, stable=True)
    size = math.ceil(n / max(1, min(groups, n)))
    parts = [tuple(fn(order[start : start + size])) for start in range(0, n, size)]
    inverse = torch.argsort(order)
    out: list[torch.Tensor | None] = []
    for k in range(len(parts[0])):
        pieces = [t for p in parts if (t := p[k]) is not None]  # all groups, or none, give it
        out.append(torch.cat(pieces)[inverse.to(pieces[0].device)] if pieces else None)
    return tuple(out)


def trimmed_by_prompt_length(
    fn: Callable[[torch.Tensor, torch.Tensor, int], Sequence[torch.Tensor | None]],
    input_ids: torch.Tensor,  # (B, Tq + T)
    attention_mask: torch.Tensor,  # (B, Tq + T)
    prompt_width: int,  # Tq
    groups: int,
) -> Outputs:
    """``fn(ids, mask, prompt_width)`` → (B, T) outputs, over groups of similar prompt length.

    Each group drops the leading columns that are padding in all its rows and the response
    columns past its longest response; outputs are (B, T) again, in the original row order,
    zero where trimmed (always masked positions). Same maths as one call; the graph is kept.
    """
    T = input_ids.shape[1] - prompt_width
    # both lengths read to the host at once: one wait for the device, not one per group
    q_len, r_len = attention_mask[:, :prompt_width].sum(1), attention_mask[:, prompt_width:].sum(1)
    q_len, r_len = torch.stack([q_len, r_len.clamp(min=1)]).cpu()

    def group(rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lead, tail = prompt_width - int(q_len[rows].max()), int(r_len[rows].max())
        cols = slice(lead, prompt_width + tail)
        out = fn(input_ids[rows, cols], attention_mask[rows, cols], prompt_width - lead)
        return tuple(None if o is None else F.pad(o, (0, T - tail)) for o in out)

    return in_length_groups(group, q_len, groups)
