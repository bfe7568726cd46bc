"""``palate generate``: sample responses from a model for a file of prompts.

Writes ``responses.jsonl`` (demonstration-format rows: prompt, response, and metadata with the
sample index, token count and whether EOS was emitted) to the run directory.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from pydantic import Field

from palate.config import Config
from palate.data import Demonstration, read_records, write_jsonl
from palate.models import load_model
from palate.progress import progress_bar
from palate.rundir import RunDir
from palate.sampling import SamplingConfig, generate_responses

__all__ = ["GenerateConfig", "generate"]


class GenerateConfig(Config):
    """Config for ``palate generate``."""

    model: str = Field(
        "smollm2-135m-instruct",
        description="Model spec: built-in name, local HF dir, .gguf file or hub id.",
    )
    prompts: str = Field(
        description="JSONL of prompts (prompts, demonstrations, comparisons or HH transcripts)."
    )
    output_dir: str = Field(description="Run directory to write responses.jsonl into.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    num_samples: int = Field(1, ge=1, description="Responses sampled per prompt.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
    seed: int = Field(0, description="Random seed for sampling.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling.")


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the stage; returns the summary (also written to ``summary.json``)."""
    run = RunDir(cfg.output_dir).create(cfg)
    report = read_records(cfg.prompts, "prompts")
    prompts = [r.prompt for r in report.records][: cfg.max_prompts]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    t0 = time.time()
    rows: list[Demonstration] = []
    n_tokens = 0
    expanded = [p for p in prompts for _ in range(cfg.num_samples)]
    with progress_bar("generate", total=len(expanded)) as bar:
        gens = generate_responses(
            model, tok, expanded, cfg.sampling, batch_size=cfg.batch_size, on_batch=bar.advance
        )
    for i, (p, g) in enumerate(zip(expanded, gens, strict=True)):
        n_tokens += len(g.token_ids)
        rows.append(
            Demonstration(
                prompt=p,
                response=g.text or " ",
                metadata={
                    "sample": i % cfg.num_samples,
                    "tokens": len(g.token_ids),
                    "finished": g.finished,
                },
            )
        )
    elapsed = time.time() - t0
    write_jsonl(run.path / "responses.jsonl", rows)
    summary = {
        "stage": "generate",
        "output_dir": str(run.path),
        "responses": len(rows),
        "eos_rate": sum(g.finished for g in gens) / max(len(gens), 1),
        "mean_tokens": n_tokens / max(len(gens), 1),
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
        "seconds": elapsed,
    }
    run.write_summary(summary)
    return summary
