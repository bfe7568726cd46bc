"""Stage ``sft``: fine-tune the initial policy on demonstrations (``palate sft``'s config)."""

from __future__ import annotations

from typing import Any

from palate.pipeline.launch import launched, run_here
from palate.pipeline.run import Run


def stage_sft(run: Run) -> dict[str, Any]:
    return launched(run, "sft") or run_here(run, "sft")
