"""Judge backends: where an AI rater's answers come from.

A backend answers two questions about chat conversations (lists of ``{role, content}`` ending in
a user message):

- :meth:`~JudgeBackend.choice_probs`: the probability of each of a few one-token answers
  (``"A"``/``"B"`` for a comparison, ``"1"``…``"9"`` for a rating), normalised over those
  answers — the *soft label* of RLAIF (Lee et al. 2023) and of Constitutional AI's
  multiple-choice feedback (Bai et al. 2022b, §4.1);
- :meth:`~JudgeBackend.generate`: a reply (critiques and revisions for SL-CAI).

Two ship: :class:`LocalBackend` (any palate model spec, next-token log-probabilities) and
:class:`palate.feedback.remote.OpenAIBackend` (any OpenAI-compatible chat-completions server).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from palate.data import Conversation
from palate.errors import ConfigError
from palate.formatting import pad_batch, prompt_ids
from palate.lm import position_ids
from palate.sampling import SamplingConfig, generate_responses, load_sampler
from palate.training import autocast, resolve_precision

__all__ = ["Conversation", "JudgeBackend", "LocalBackend", "answer_token_ids"]


class JudgeBackend(Protocol):
    """What a judge needs from a model."""

    name: str  # the model's name, as the rater ``ai:<name>`` shows it

    def choice_probs(
        self, conversations: Sequence[Conversation], options: Sequence[str]
    ) -> list[list[float]]:
        """For each conversation, P(reply starts with option i), normalised over ``options``."""
        ...

    def generate(
        self, conversations: Sequence[Conversation], *, max_new_tokens: int, temperature: float
    ) -> list[str]:
        """One reply per conversation."""
        ...


def answer_token_ids(tokenizer: Any, options: Sequence[str]) -> list[int]:
    """The token id of each answer option; each must be exactly one token for this tokenizer
    (a clear error otherwise: the soft label would be ill-defined)."""
    ids = []
    for opt in options:
        toks = tokenizer(opt, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ConfigError(
                f"judge answer {opt!r} is {len(toks)} tokens for this tokenizer; answers must "
                "be single tokens"
            )
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"judge answers {list(options)} share a token")
    return ids


class LocalBackend:
    """A causal LM in this process (any palate model spec or a loaded model).

    The soft label is the next-token distribution right after the chat-templated conversation
    (``add_generation_prompt``), restricted to the answer tokens and renormalised:
    ``P(A) = exp(ℓ_A) / (exp(ℓ_A) + exp(ℓ_B))`` for logits ℓ.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "local",
        batch_size: int = 8,
        precision: str = "fp32",
        max_tokens: int = 2048,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.precision = precision
        self.max_tokens = max_tokens
        self.on_batch = on_batch

    @classmethod
    def load(cls, spec: str, *, precision: str = "auto", **kwargs: Any) -> LocalBackend:

        precision = resolve_precision(precision)
        model, tok = load_sampler(spec, precision)
        return cls(model, tok, name=spec, precision=precision, **kwargs)

    def _ids(self, conversation: Conversation) -> list[int]:

        ids = prompt_ids(self.tokenizer, conversation)
        # keep the end (the question and the answer slot) when a conversation is too long
        return ids[-self.max_tokens :]

    @torch.no_grad()
    def choice_probs(
        self, conversations: Sequence[Conversation], options: Sequence[str]
    ) -> list[list[float]]:

        option_ids = torch.tensor(answer_token_ids(self.tokenizer, options))
        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = [self._ids(c) for c in conversations[start : start + self.batch_size]]
            input_ids, mask = pad_batch(chunk, self.tokenizer.pad_token_id)  # left-padded
            input_ids, mask = input_ids.to(device), mask.to(device)
            with autocast(device, self.precision):
                logits = self.model(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)
                ).logits[:, -1, :]  # (B, V) the next token after the prompt
            probs = torch.softmax(logits.float()[:, option_ids.to(device)], dim=-1)  # (B, K)
            out.extend(probs.cpu().tolist())
            if self.on_batch is not None:
                self.on_batch(len(chunk))
        return out

    def generate(
        self, conversations: Sequence[Conversation], *, max_new_tokens: int, temperature: float
    ) -> list[str]:

        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        gens = generate_responses(
            self.model,
            self.tokenizer,
            list(conversations),
            sampling,
            batch_size=self.batch_size,
            precision=self.precision,
        )
        return [g.text for g in gens]
