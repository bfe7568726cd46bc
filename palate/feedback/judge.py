"""The AI judge: pairwise soft labels under a constitution, with position bias removed.

For a prompt and responses (A, B) the judge is asked a principle's comparison question
(Constitutional AI's multiple-choice feedback, Bai et al. 2022b §4.1; RLAIF, Lee et al. 2023)
and its *soft label* is the normalised probability of answering "A". Small judges prefer a
position, so by default each pair is judged in both orders::

    P(a ≻ b) = ½ · (P_first(a, b) + 1 − P_first(b, a))

(a judge that always picks the first answer gives exactly ½). The judge labels a campaign
through the labeling store like any rater (user ``ai:<model>``, kind ``ai``; the soft label
and the principle are stored with the label), or a comparisons/pairs file (``palate judge``).
Used directly as PPO's reward (``reward.judge``), it rates one response 1–9 under each
principle's rating question: the expected rating, mapped to [−1, 1] (d-RLAIF, Lee et al. 2023).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from palate.data import Prompt, as_messages
from palate.errors import ConfigError
from palate.feedback.backend import Conversation, JudgeBackend, LocalBackend
from palate.feedback.config import JudgeSettings
from palate.feedback.constitution import Constitution, Principle, load_constitution
from palate.feedback.remote import OpenAIBackend, check_server
from palate.progress import progress_bar

__all__ = [
    "Judge",
    "JudgeScorer",
    "Verdict",
    "comparison_conversation",
    "load_backend",
    "load_judge",
    "rating_conversation",
    "transcript",
]

CHOICES = ("A", "B")
RATINGS = tuple(str(i) for i in range(1, 10))
CHUNK = 64  # conversations per backend call (progress granularity)


def transcript(prompt: Prompt | list[dict[str, Any]]) -> str:
    """The conversation so far, as plain text the judge reads."""
    who = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{who[m['role']]}: {m['content']}" for m in as_messages(prompt))


def comparison_conversation(
    prompt: Prompt | list[dict[str, Any]], first: str, second: str, principle: Principle
) -> Conversation:
    """The judge's question about two candidate replies, (A) ``first`` and (B) ``second``."""
    text = (
        "Below is a conversation between a human and an AI assistant, and two candidate "
        "replies for the assistant's next turn.\n\n"
        f"{transcript(prompt)}\n\n"
        f"(A) {first.strip()}\n\n"
        f"(B) {second.strip()}\n\n"
        f"{principle.comparison}\n"
        "Answer with the single letter A or B."
    )
    return [{"role": "user", "content": text}]


def rating_conversation(
    prompt: Prompt | list[dict[str, Any]], response: str, principle: Principle
) -> Conversation:
    """The judge's 1–9 rating question about one reply."""
    assert principle.rating is not None
    text = (
        "Below is a conversation between a human and an AI assistant, and the assistant's "
        "reply.\n\n"
        f"{transcript(prompt)}\n\n"
        f"Reply: {response.strip()}\n\n"
        f"{principle.rating} Rate it from 1 (worst) to 9 (best).\n"
        "Answer with a single digit."
    )
    return [{"role": "user", "content": text}]


@dataclass
class Verdict:
    """The judge on one pair (a, b)."""

    prob_a: float  # P(a ≻ b): debiased when both orders were judged
    principles: list[str]  # the principle(s) asked
    first_a: float  # P(first) with a shown first (mean over principles)
    first_b: float | None  # P(first) with b shown first; None when one order only
    per_principle: dict[str, float] = field(default_factory=dict)  # P(a ≻ b) per principle

    @property
    def consistent(self) -> bool | None:
        """Same response preferred in both orders (None when one order only)."""
        if self.first_b is None:
            return None
        return (self.first_a >= 0.5) == (self.first_b < 0.5)

    @property
    def principle(self) -> str:
        return "+".join(self.principles)[:64]


class Judge:
    """A backend plus the principles it judges under."""

    def __init__(
        self,
        backend: JudgeBackend,
        principles: Sequence[Principle],
        *,
        mode: str = "sample",
        both_orders: bool = True,
        seed: int = 0,
        name: str | None = None,
    ):
        if not principles:
            raise ConfigError("judge: no principles")
        self.backend = backend
        self.principles = list(principles)
        self.mode = mode
        self.both_orders = both_orders
        self.rng = random.Random(seed)
        self.name = name or f"ai:{backend.name}"

    def _probs(
        self, conversations: list[Conversation], options: Sequence[str], what: str
    ) -> list[list[float]]:
        out: list[list[float]] = []
        with progress_bar(what, total=len(conversations)) as bar:
            for start in range(0, len(conversations), CHUNK):
                chunk = conversations[start : start + CHUNK]
                out.extend(self.backend.choice_probs(chunk, options))
                bar.advance(len(chunk))
        return out

    def compare(
        self,
        pairs: Sequence[tuple[Prompt | list[dict[str, Any]], str, str]],
        principles: Sequence[Sequence[Principle]] | None = None,
    ) -> list[Verdict]:
        """Verdicts on (prompt, a, b) triples. ``principles`` gives each pair's principles;
        default: one drawn per pair (mode sample) or all of them (mode all)."""
        if principles is None:
            principles = [
                [self.rng.choice(self.principles)] if self.mode == "sample" else self.principles
                for _ in pairs
            ]
        convs: list[Conversation] = []
        index: list[tuple[int, str, bool]] = []  # (pair, principle, a shown first)
        for i, ((prompt, a, b), ps) in enumerate(zip(pairs, principles, strict=True)):
            for p in ps:
                convs.append(comparison_conversation(prompt, a, b, p))
                index.append((i, p.name, True))
                if self.both_orders:
                    convs.append(comparison_conversation(prompt, b, a, p))
                    index.append((i, p.name, False))
        probs = self._probs(convs, CHOICES, "judge")
        first: dict[tuple[int, str, bool], float] = {
            key: pr[0] for key, pr in zip(index, probs, strict=True)
        }
        verdicts = []
        for i, ps in enumerate(principles):
            names = [p.name for p in ps]
            fa = [first[(i, n, True)] for n in names]
            fb = [first[(i, n, False)] for n in names] if self.both_orders else None
            per = {
                n: (x + 1 - y) / 2 if fb is not None else x
                for n, x, y in zip(names, fa, fb or fa, strict=True)
            }
            verdicts.append(
                Verdict(
                    prob_a=sum(per.values()) / len(per),
                    principles=names,
                    first_a=sum(fa) / len(fa),
                    first_b=sum(fb) / len(fb) if fb is not None else None,
                    per_principle=per,
                )
            )
        return verdicts

    def rate(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Direct RLAIF: the mean over principles (those with a rating question) of the
        expected 1–9 rating, mapped to [−1, 1] by (E − 5) / 4."""
        rated = [p for p in self.principles if p.rating]
        if not rated:
            raise ConfigError("judge as a reward: no principle has a rating question")
        convs = [
            rating_conversation(q, r, p)
            for q, r in zip(prompts, responses, strict=True)
            for p in rated
        ]
        probs = torch.tensor(self._probs(convs, RATINGS, "judge ratings"))  # (N·P, 9)
        expected = probs @ torch.arange(1, 10, dtype=probs.dtype)  # (N·P,)
        per_response = expected.view(len(prompts), len(rated)).mean(dim=1)
        return ((per_response - 5) / 4).tolist()


class JudgeScorer:
    """The judge as PPO's reward: ``score(prompts, responses) -> (N,) tensor``."""

    def __init__(self, judge: Judge):
        self.judge = judge

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor(self.judge.rate(prompts, responses))


def load_backend(settings: JudgeSettings) -> JudgeBackend:
    """The backend the settings name (local models are loaded now; a server gets one tiny
    request first, so an unreachable server, a rejected key or an unknown model fails at once,
    not after a long run's first batch)."""
    if settings.backend == "openai":
        check_server(settings.remote, settings.model)
        return OpenAIBackend(settings.remote, settings.model)
    return LocalBackend.load(
        settings.model,
        precision=settings.precision,
        batch_size=settings.batch_size,
        max_tokens=settings.max_tokens,
    )


def load_judge(
    settings: JudgeSettings,
    criteria: Sequence[str] | None = None,
    backend: JudgeBackend | None = None,
    constitution: Constitution | None = None,
) -> Judge:
    """A judge from settings; ``criteria`` (e.g. a run's route) narrows the principles."""
    constitution = constitution or load_constitution(settings.constitution)
    crit = list(criteria) if criteria else settings.criteria
    principles = constitution.select(settings.principles, crit)
    return Judge(
        backend or load_backend(settings),
        principles,
        mode=settings.principle_mode,
        both_orders=settings.both_orders,
        seed=settings.seed,
        name=settings.rater_name,
    )
