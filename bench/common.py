"""What the side-by-side benchmarks share: each side runs as its own process (so its peak RSS
is its own) and reports one JSON line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's maximum resident set so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(python: str, script: str, argv: list[str], side: str, setting: str) -> dict:
    """Run ``script --child SIDE --setting SETTING ARGV`` with ``python``; its last stdout line
    is the result. Offline, no progress bars, no PYTHONPATH leaking palate into the other venv."""
    cmd = [python, script, "--child", side, "--setting", setting, *argv]
    env = dict(
        os.environ,
        PALATE_PROGRESS="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH="",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{side}/{setting} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_sides(
    settings: list[str],
    sides: list[str],
    run: Callable[[str, str], dict],
    metric: str,
    label: str,
    *,
    width: int = 10,
    digits: int = 3,
    echo: bool = False,
) -> list[dict]:
    """Run every side for every setting (``run(side, setting)`` → its result dict), add the
    palate/trl ratios of ``metric`` and peak RSS when both sides ran, print the table."""
    results = []
    for setting in settings:
        r: dict = {"setting": setting}
        for side in sides:
            r[side] = run(side, setting)
            if echo:
                print(json.dumps(r[side]), file=sys.stderr)
        if len(sides) == 2:
            r[f"{metric}_ratio"] = r["palate"][metric] / r["trl"][metric]
            r["peak_rss_ratio"] = r["palate"]["peak_rss_mb"] / r["trl"]["peak_rss_mb"]
        results.append(r)
    print(f"{'setting':<14} {'side':<7} {'precision':<9} {label:>{width}} {'peak RSS MB':>12}")
    for r in results:
        for side in sides:
            x = r[side]
            print(
                f"{r['setting']:<14} {side:<7} {x['precision']:<9} "
                f"{x[metric]:{width}.{digits}f} {x['peak_rss_mb']:12.0f}"
            )
        if len(sides) == 2:
            print(
                f"{r['setting']:<14} ratio palate/trl: {label} {r[f'{metric}_ratio']:.2f}x, "
                f"peak RSS {r['peak_rss_ratio']:.2f}x"
            )
    return results
