"""The run directory: where every stage writes its outputs.

Layout (every stage follows it)::

    OUTPUT_DIR/
      config.yaml         resolved config (defaults and --set overrides applied)
      metrics.jsonl       one JSON object per step: {"step": n, "time": s, "ns/key": value, ...}
      summary.json        the stage's final summary (also printed by --json); written last,
                          so its presence means the stage completed
      checkpoints/step-N/ resumable training state (HF-format weights + optimizer/RNG state)
      final/              the HF-format model the next stage loads
      ...                 stage-specific files (samples, responses, reports)

Metric keys are namespaced ``group/name`` (``train/loss``, ``objective/kl``, ``timing/step``);
see docs/metrics.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from palate.config import config_to_yaml
from palate.data import atomic_write, read_jsonl

__all__ = ["MetricsLogger", "RunDir", "fingerprint"]


def fingerprint(value: Any) -> str:
    """16 hex digits of SHA-256 over ``value`` as sorted-key JSON: what decides whether a
    stage's (or a cached sample file's) settings changed."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_KEY = re.compile(r"^[a-z0-9_]+(/[A-Za-z0-9_.@-]+)+$")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy / torch scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLogger:
    """Appends one JSON row per step to ``metrics.jsonl`` (flushed each row).

    On resume from step ``k`` the rows after ``k`` (written by the interrupted run after its last
    checkpoint) are dropped, so a resumed run's file matches an uninterrupted one.
    ``trackers`` is an optional ``accelerate.Accelerator`` whose ``log`` is also called.
    With ``enabled`` false (every process but the main one) it writes nothing.
    """

    def __init__(
        self,
        path: Path,
        resume_step: int | None = None,
        accelerator: Any = None,
        *,
        enabled: bool = True,
    ):
        self.path = path
        self.accelerator = accelerator
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in kept if json.loads(ln).get("step", 0) <= resume_step]
            with atomic_write(path) as fh:
                fh.write("".join(ln + "\n" for ln in kept))
        self._fh = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in metrics if not _KEY.match(k)]
        if bad:
            raise ValueError(f"metric keys must be namespaced like 'train/loss': {bad}")
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "time"}, step=step)
        return row

    def close(self) -> None:
        if self.enabled:
            self._fh.close()


class RunDir:
    """A stage's output directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def create(self, cfg: BaseModel) -> RunDir:
        """Make the directory and write the resolved config."""
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.config_path) as fh:
            fh.write(config_to_yaml(cfg))
        return self

    def is_complete(self) -> bool:
        return self.summary_path.is_file()

    def write_summary(self, summary: dict[str, Any]) -> None:
        with atomic_write(self.summary_path) as fh:
            json.dump({k: _jsonable(v) for k, v in summary.items()}, fh, indent=2)
            fh.write("\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def complete_checkpoints(self) -> list[Path]:
        """The *complete* checkpoints (those with the ``state.json`` marker, written last),
        oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / "state.json").is_file())

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        done = self.complete_checkpoints()
        return done[-1] if done else None
