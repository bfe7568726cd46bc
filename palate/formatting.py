"""Turning prompts and responses into token ids, the same way for every stage.

The prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``) when
it has one, and with a plain ``User: ... / Assistant:`` template otherwise. A response is its
tokens followed by EOS, so a model trained on it learns to stop. Prompt and response are
tokenized separately: the response ids are exactly what generation appends after the prompt ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from palate.data import Conversation, Prompt, as_messages

__all__ = ["PLAIN_TEMPLATE_ROLES", "pad_batch", "prompt_ids", "render_prompt", "response_ids"]

PLAIN_TEMPLATE_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_prompt(tokenizer: Any, prompt: Prompt | Conversation) -> str:
    """The prompt as the text the model sees, ending where the assistant's reply starts."""
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{PLAIN_TEMPLATE_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def prompt_ids(tokenizer: Any, prompt: Prompt | Conversation) -> list[int]:
    """Token ids of the rendered prompt (BOS added only when the template does not add one)."""
    text = render_prompt(tokenizer, prompt)
    with_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not with_template)["input_ids"])


def response_ids(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Token ids of a response, with EOS appended (the stop signal the policy must learn)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (N, longest): prompts are padded on the left (generation
    appends on the right), responses on the right."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        span = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        ids[i, span] = torch.tensor(list(x), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
