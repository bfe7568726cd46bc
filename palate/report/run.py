"""``palate run``'s report: one self-contained HTML page per run, plots inline (base64 PNG), no
external files or scripts, so it can be mailed or attached to an issue.

Sections: the win-rate table (and by criterion, by rater group), the optional evaluations
(XSTest, sycophancy, over-optimisation), rounds, raters, training curves and alarms, gold vs
proxy along PPO checkpoints, response-length histograms, side-by-side samples (initial vs
final, with gold and reward-model scores) and each stage's summary. Every input is optional;
missing ones are noted. The markup is ``templates/run.html``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import palate.report.plots as plots
import palate.report.sections as sections
from palate.report.render import write_page

__all__ = ["build_report"]


def build_report(
    path: str | Path,
    *,
    title: str = "palate run",
    summary: dict[str, Any] | None = None,
    stages: dict[str, dict[str, Any]] | None = None,
    ppo_metrics: Sequence[dict[str, Any]] = (),
    checkpoints: Sequence[dict[str, Any]] = (),
    rollouts: Sequence[dict[str, Any]] = (),
    lengths_initial: Sequence[int] = (),
    lengths_final: Sequence[int] = (),
    samples: Sequence[dict[str, Any]] = (),
    notes: str = "",
    alarms: Sequence[dict[str, Any]] = (),
    rounds: Sequence[dict[str, Any]] = (),
    raters: dict[str, Any] | None = None,
) -> Path:
    """Write the report to ``path`` (atomically) and return it.

    ``checkpoints``: held-out evaluations along PPO ({update, kl, gold, proxy});
    ``rollouts``: gold and proxy means of PPO's own rollouts per update ({update, gold, proxy});
    ``stages``: each stage's summary (labels agreement, reward accuracy, PPO speed);
    ``rounds``: one row per RLHF round when there are several (see ``sections.rounds``);
    ``raters``: the labels stage's ``quality.json`` (reliability, flags, populations).
    """
    summary = summary or {}
    return write_page(
        path,
        "run.html",
        title=title,
        notes=notes,
        wins=sections.win_rates(summary),
        by_criterion=sections.by_criterion(summary.get("by_criterion")),
        groups=sections.groups(summary.get("groups")),
        xstest=sections.xstest(summary.get("xstest")),
        sycophancy=sections.sycophancy(summary.get("sycophancy")),
        overopt=sections.overopt(summary.get("overopt")),
        rounds=sections.rounds(rounds),
        raters=sections.raters(raters),
        alarms=sections.alarms(alarms),
        curves=plots.training_curves(ppo_metrics),
        gold_vs_proxy=plots.gold_vs_proxy(checkpoints, rollouts),
        lengths=plots.lengths(lengths_initial, lengths_final),
        samples=sections.samples(samples),
        stages=sections.stages(stages or {}),
    )
