"""What the side-by-side benchmarks share: each side runs as its own process (so its peak RSS
is its own) and reports one JSON line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's maximum resident set so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(python: str, script: str, argv: list[str], side: str, setting: str) -> dict:
    """Run ``script --child SIDE --setting SETTING ARGV`` with ``python``; its last stdout line
    is the result. Offline, no progress bars, no PYTHONPATH leaking palate into the other venv."""
    cmd = [python, script, "--child", side, "--setting", setting, *argv]
    env = dict(os.environ, PALATE_PROGRESS="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH="")  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{side}/{setting} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])
