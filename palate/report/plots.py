"""The reports' plots: matplotlib figures drawn to inline base64 PNG, never written to a file.

Each function returns a figure for the templates (``macros.html``'s ``figure``): ``{"id",
"title", "png"}`` when there is something to draw, ``{"id", "note"}`` (a muted line in place of
the plot) when its input is missing. ``PLOTS``, ``OPTIONAL_PLOTS`` and ``EVAL_PLOTS`` name every
plot by its ``<figure id>``; the tests check each one is present.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "EVAL_PLOTS",
    "OPTIONAL_PLOTS",
    "PLOTS",
    "TITLES",
    "Figure",
    "eval_lengths",
    "eval_win_rates",
    "gold_vs_proxy",
    "lengths",
    "overopt",
    "training_curves",
]

# plot id -> title (the test checks every one is present)
PLOTS = {
    "training-curves": "Training curves",
    "gold-vs-proxy": "Gold vs proxy score along PPO (held-out checkpoints; rollouts)",
    "length-histogram": "Response lengths",
}
# plots of optional evaluations (present when configured)
OPTIONAL_PLOTS = {
    "overopt": "Over-optimisation: gain over the initial policy against √KL, with Gao et al.'s fits",
}
# plots of `palate eval`'s report
EVAL_PLOTS = {
    "eval-win-rates": "Win rate against the baseline per judge (95% intervals; hollow: "
    "length-controlled)",
    "eval-lengths": "Response lengths per policy",
}
TITLES = {**PLOTS, **OPTIONAL_PLOTS, **EVAL_PLOTS}

Figure = dict[str, str]
"""``{"id", "title", "png"}`` (base64) or ``{"id", "note"}`` (why there is no plot)."""

GOLD, PROXY, INK = "#2a9d8f", "#e76f51", "#1d3557"


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    # lazy: matplotlib is heavy and picks a backend on import; only drawing a report needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(plot_id: str, fig: Any) -> Figure:
    """Render ``fig`` to PNG (and close it) as the plot ``plot_id``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    return {"id": plot_id, "title": TITLES[plot_id], "png": png}


def _missing(plot_id: str, why: str) -> Figure:
    return {"id": plot_id, "note": f"{PLOTS[plot_id]}: {why}"}


def training_curves(metrics: Sequence[dict[str, Any]]) -> Figure:
    """PPO's score, KL, β, entropy and response length per update."""
    keys = [
        ("objective/score", "score (RM)"),
        ("objective/kl", "KL to reference (nats)"),
        ("objective/kl_coef", "β"),
        ("objective/entropy", "entropy"),
        ("response/length", "response length (tokens)"),
    ]
    if not metrics:
        return _missing("training-curves", "no PPO metrics")
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(4 * len(keys), 3))
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    for ax, (k, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [m.get(k, float("nan")) for m in metrics], marker=".", color=INK)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    return _figure("training-curves", fig)


def gold_vs_proxy(points: Sequence[dict[str, Any]], rollouts: Sequence[dict[str, Any]]) -> Figure:
    """Gold and proxy means along PPO: held-out checkpoints (by KL) and PPO's own rollouts."""
    if not points and not rollouts:
        return _missing("gold-vs-proxy", "no checkpoint evaluations")
    panels = [(points, "held-out prompts, PPO checkpoints"), (rollouts, "PPO's own rollouts")]
    panels = [(pts, t) for pts, t in panels if pts]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (pts, title) in zip(axes[0], panels, strict=True):
        by_kl = all("kl" in p for p in pts)
        x = [p["kl"] if by_kl else p["update"] for p in pts]
        ax.plot(
            x, [p["gold"] for p in pts], marker="o", color=GOLD, label="gold (never seen by the RM)"
        )
        ax.set_xlabel("KL to the initial policy (nats)" if by_kl else "PPO update")
        ax.set_ylabel("mean gold score", color=GOLD)
        right = ax.twinx()
        right.plot(
            x, [p["proxy"] for p in pts], marker="s", color=PROXY, label="proxy (reward model)"
        )
        right.set_ylabel("mean reward-model score", color=PROXY)
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure("gold-vs-proxy", fig)


def lengths(initial: Sequence[int], final: Sequence[int]) -> Figure:
    """Histograms of the initial and the final policy's response lengths."""
    if not initial and not final:
        return _missing("length-histogram", "no samples")
    fig, ax = _pyplot().subplots(figsize=(6, 3.5))
    bins = 20
    if initial:
        ax.hist(initial, bins=bins, alpha=0.6, label="initial policy")
    if final:
        ax.hist(final, bins=bins, alpha=0.6, label="final policy")
    ax.set_xlabel("response length (tokens)")
    ax.legend()
    return _figure("length-histogram", fig)


def overopt(o: Mapping[str, Any]) -> Figure:
    """Best-of-n and PPO: gold and proxy gains against d = √KL, with the fitted curves."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 3.8))
    fits = o.get("fits", {})
    panels = (
        ("bon", o.get("bon", []), "best-of-n (initial policy, chosen by the proxy)"),
        ("rl", o.get("rl", []), o.get("rl_title", "PPO checkpoints")),
    )
    for ax, (form, pts, title) in zip(axes, panels, strict=True):
        for key, color in (("gold", GOLD), ("proxy", PROXY)):
            if pts:
                _overopt_series(ax, form, key, color, pts, fits.get(f"{form}_{key}"))
        ax.set_xlabel("d = √KL (nats^½)")
        ax.set_ylabel("gain over the initial policy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure("overopt", fig)


def _overopt_series(
    ax: Any,
    form: str,
    key: str,
    color: str,
    pts: Sequence[Mapping[str, Any]],
    fit: Mapping[str, Any] | None,
) -> None:
    """One measured series of gains and, when fitted, its curve (and the gold peak, dotted)."""
    ax.plot([p["d"] for p in pts], [p[f"{key}_gain"] for p in pts], "o", color=color, label=key)
    if not fit:
        return
    top = max(p["d"] for p in pts) * 1.1 or 1.0
    xs = [top * i / 100 for i in range(1, 101)]
    g = (lambda x: x) if form == "bon" else math.log
    ax.plot(
        xs,
        [x * (fit["alpha"] - fit["beta"] * g(x)) for x in xs],
        "-",
        color=color,
        alpha=0.6,
        label=f"{key} fit α={fit['alpha']:.2f} β={fit['beta']:.2f}",
    )
    if key == "gold" and fit.get("peak_d") and fit["peak_d"] <= top:
        ax.axvline(fit["peak_d"], color=color, ls=":", alpha=0.7)


def eval_win_rates(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> Figure:
    """``palate eval``: each (label, judge result) row's win rate with its interval, and the
    length-controlled one (hollow)."""
    if not rows:
        return {"id": "eval-win-rates", "note": "no judged pairs yet"}
    fig, ax = _pyplot().subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for y, (_, r) in enumerate(rows):
        ax.errorbar(
            r["win_rate"],
            y,
            xerr=[[r["win_rate"] - r["low"]], [r["high"] - r["win_rate"]]],
            fmt="o",
            color="#264653",
            capsize=3,
        )
        if "lc_win_rate" in r:
            ax.plot(r["lc_win_rate"], y - 0.18, "o", mfc="none", color=PROXY)
    ax.axvline(0.5, color="#999", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("win rate against the baseline")
    ax.grid(axis="x", alpha=0.3)
    return _figure("eval-win-rates", fig)


def eval_lengths(lengths: Mapping[str, Sequence[int]]) -> Figure:
    """``palate eval``: one response-length histogram per policy, on shared bins."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.5))
    top = max((max(v) for v in lengths.values() if v), default=1)
    for name, v in lengths.items():
        ax.hist(v, bins=20, range=(0, top), alpha=0.5, label=name)
    ax.set_xlabel("response length (tokens)")
    ax.legend(fontsize=8)
    return _figure("eval-lengths", fig)
