"""SL-CAI (``palate cai revise``): critique-and-revise under a constitution.

Constitutional AI's supervised stage (Bai et al. 2022b, §3): for red-team prompts the model
answers, then — for each of ``rounds`` rounds — critiques its last answer under a principle drawn
at random and rewrites it according to that principle's revision request. Writes

- ``demonstrations.jsonl``: (prompt, final revision), for ``palate sft``;
- ``comparisons.jsonl``: (prompt, final revision ≻ original answer), ``source: ai``, for
  ``palate reward train``;
- ``revisions.jsonl``: every step (answer, critiques, revisions, principles), to read.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from palate.data import as_messages, prompt_json, read_records, write_jsonl
from palate.errors import DataError
from palate.feedback.backend import Conversation
from palate.feedback.config import JudgeSettings
from palate.feedback.constitution import load_constitution
from palate.feedback.judge import load_backend
from palate.progress import progress_bar

__all__ = ["CAIConfig", "cai_revise", "read_red_team_prompts"]


class CAIConfig(JudgeSettings):
    """Config for ``palate cai revise``: the model that answers, critiques and revises (the
    judge settings: backend, model, constitution, principles/criteria), and the prompts."""

    prompts: str = Field(
        description="Red-team prompts: a prompts JSONL, or comparisons / HH-RLHF transcripts "
        "(their first human turn is the prompt)."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    rounds: int = Field(1, ge=1, le=8, description="Critique → revision rounds per prompt.")
    max_new_tokens: int = Field(96, ge=1, description="Tokens per answer, critique, revision.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    output_dir: str = Field(description="Where the three JSONL files go.")


def read_red_team_prompts(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """Prompts as one-user-turn conversations (deduplicated, in file order)."""
    report = read_records(path)
    out: list[Conversation] = []
    seen: set[str] = set()
    for r in report.records:
        first = next(m for m in as_messages(prompt_json(r.prompt)) if m["role"] == "user")
        if first["content"] not in seen:
            seen.add(first["content"])
            out.append([{"role": "user", "content": first["content"]}])
    if not out:
        raise DataError(f"{path}: no prompts")
    return out[:limit]


def cai_revise(cfg: CAIConfig) -> dict[str, Any]:
    """Answer, critique and revise each prompt; write demonstrations and comparisons."""
    prompts = read_red_team_prompts(cfg.prompts, cfg.limit)
    principles = load_constitution(cfg.constitution).select(cfg.principles, cfg.criteria)
    backend = load_backend(cfg)
    rng = random.Random(cfg.seed)
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
    start = time.monotonic()
    with progress_bar("cai", total=len(prompts) * (1 + 2 * cfg.rounds)) as bar:
        original = backend.generate(prompts, **kw)
        bar.advance(len(prompts))
        current = list(original)
        steps: list[list[dict[str, str]]] = [[] for _ in prompts]
        for _ in range(cfg.rounds):
            drawn = [rng.choice(principles) for _ in prompts]
            asked = [
                [
                    *p,
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": pr.critique},
                ]
                for p, answer, pr in zip(prompts, current, drawn, strict=True)
            ]
            critiques = backend.generate(asked, **kw)
            bar.advance(len(prompts))
            revise = [
                [
                    *conv,
                    {"role": "assistant", "content": critique},
                    {"role": "user", "content": pr.revision},
                ]
                for conv, critique, pr in zip(asked, critiques, drawn, strict=True)
            ]
            revisions = backend.generate(revise, **kw)
            bar.advance(len(prompts))
            for i, (pr, c, r) in enumerate(zip(drawn, critiques, revisions, strict=True)):
                steps[i].append({"principle": pr.name, "critique": c, "revision": r})
                if r.strip():  # an empty rewrite keeps the previous answer
                    current[i] = r
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    demos, comps, trace = [], [], []
    for p, orig, final, st in zip(prompts, original, current, steps, strict=True):
        prompt = p[0]["content"]
        trace.append({"prompt": prompt, "original": orig, "final": final, "steps": st})
        if not final.strip():
            continue
        principles_used = [s["principle"] for s in st]
        demos.append({"prompt": prompt, "response": final, "metadata": {"cai": principles_used}})
        if orig.strip() and orig.strip() != final.strip():
            comps.append(
                {
                    "prompt": prompt,
                    "chosen": final,
                    "rejected": orig,
                    "rater_id": f"ai:{backend.name}",
                    "source": "ai",
                    "metadata": {"cai": principles_used},
                }
            )
    write_jsonl(out / "revisions.jsonl", trace)
    write_jsonl(out / "demonstrations.jsonl", demos)
    write_jsonl(out / "comparisons.jsonl", comps)
    return {
        "stage": "cai",
        "prompts": len(prompts),
        "demonstrations": len(demos),
        "comparisons": len(comps),
        "rounds": cfg.rounds,
        "minutes": (time.monotonic() - start) / 60,
        "output_dir": str(out),
    }
