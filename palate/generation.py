"""Batched sampling from a causal LM with the KV cache (``model.generate``).

Used to sample responses for inspection, for labeling campaigns and (later) PPO rollouts.
Prompts are rendered with :mod:`palate.formatting` and left-padded; each response is cut at its
first EOS and reports whether it ever emitted one (``finished``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from palate.config import Config
from palate.data import Prompt
from palate.formatting import prompt_ids

__all__ = ["Generated", "SamplingConfig", "generate_responses"]


class SamplingConfig(Config):
    """How responses are sampled."""

    max_new_tokens: int = Field(128, ge=1, description="Maximum tokens generated per response.")
    temperature: float = Field(
        0.7, ge=0.0, description="Softmax temperature; 0 means greedy decoding."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0 = off).")


@dataclass
class Generated:
    """One sampled response."""

    text: str  # decoded response, special tokens removed
    token_ids: list[int]  # response tokens up to and including EOS when finished
    finished: bool  # emitted EOS within max_new_tokens


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Sample one response per prompt, ``batch_size`` prompts at a time."""
    sampling = sampling or SamplingConfig()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Generated] = []
    greedy = sampling.temperature == 0.0
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not greedy,
        "pad_token_id": pad,
        "eos_token_id": eos,
    }
    if not greedy:
        gen_kwargs.update(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
        )
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # left padding
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention[i, width - len(ids) :] = 1
            seqs = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kwargs
            )
            for row in seqs[:, width:].tolist():
                finished = eos in row
                ids = row[: row.index(eos) + 1] if finished else row
                text = tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Generated(text=text.strip(), token_ids=ids, finished=finished))
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return out
