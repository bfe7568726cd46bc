"""Demonstrations → token ids: prompt (chat template) + response + EOS, prompt masked out of the
labels, truncation from the left of the prompt (reported)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from palate.data import Demonstration
from palate.formatting import prompt_ids, response_ids
from palate.lm import IGNORE_INDEX

__all__ = ["Example", "collate", "tokenize_demonstration"]


@dataclass
class Example:
    """One tokenized demonstration."""

    input_ids: list[int]  # prompt ids + response ids (+ EOS)
    labels: list[int]  # IGNORE_INDEX on prompt positions, the token id on response positions
    truncated: str | None = None  # None, "prompt" or "response"


def tokenize_demonstration(tokenizer: Any, demo: Demonstration, max_length: int) -> Example:
    """Prompt (chat template) + response + EOS; prompt tokens masked in the labels.

    Too long: the prompt loses tokens from the left (the response is what we train on). If the
    response alone does not fit, it is cut from the right (it then has no EOS).
    """
    p = prompt_ids(tokenizer, demo.prompt)
    r = response_ids(tokenizer, demo.response)
    truncated = None
    if len(p) + len(r) > max_length:
        min_prompt = min(len(p), max(1, max_length // 4))
        if len(r) > max_length - min_prompt:
            r = r[: max_length - min_prompt]
            truncated = "response"
        else:
            truncated = "prompt"
        p = p[len(p) - (max_length - len(r)) :]
    return Example(p + r, [IGNORE_INDEX] * len(p) + r, truncated)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``/``attention_mask``/``labels`` tensors, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
