"""One self-contained HTML report per run: plots inline (matplotlib → base64 PNG), no external
files or scripts, so it can be mailed or attached to an issue.

Sections: training curves (score, KL, β, entropy, length), gold vs proxy along PPO checkpoints,
the win-rate table, response-length histograms, and side-by-side samples (initial vs final,
with gold and reward-model scores). Every piece of input is optional; missing ones are noted.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from palate.data import as_messages

__all__ = ["PLOTS", "build_report"]

# plot id -> title (the test checks every one is present)
PLOTS = {
    "training-curves": "Training curves",
    "gold-vs-proxy": "Gold vs proxy score along PPO",
    "length-histogram": "Response lengths",
}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(plot_id: str, fig: Any) -> str:
    return (f'<figure id="{plot_id}"><img alt="{html.escape(PLOTS[plot_id])}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(PLOTS[plot_id])}'
            "</figcaption></figure>")  # fmt: skip


def _missing(plot_id: str, why: str) -> str:
    return (
        f'<figure id="{plot_id}"><p class="muted">{html.escape(PLOTS[plot_id])}: {why}</p></figure>'
    )


def _curves(metrics: Sequence[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("objective/score", "score (RM)"), ("objective/kl", "KL to reference (nats)"),
            ("objective/kl_coef", "β"), ("objective/entropy", "entropy"),
            ("response/length", "response length (tokens)")]  # fmt: skip
    if not metrics:
        return _missing("training-curves", "no PPO metrics")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    for ax, (k, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [m.get(k, float("nan")) for m in metrics], marker=".", color="#1d3557")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    return _img("training-curves", fig)


def _gold_vs_proxy(points: Sequence[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    if not points:
        return _missing("gold-vs-proxy", "no checkpoint evaluations")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [p.get("kl", p.get("update", i)) for i, p in enumerate(points)]
    xlabel = "KL to reference (nats)" if all("kl" in p for p in points) else "update"
    ax.plot(x, [p["gold"] for p in points], marker="o", label="gold (never seen by the RM)")
    ax.plot(x, [p["proxy"] for p in points], marker="s", label="proxy (reward model)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean score")
    ax.legend()
    ax.grid(alpha=0.3)
    return _img("gold-vs-proxy", fig)


def _lengths(initial: Sequence[int], final: Sequence[int]) -> str:
    import matplotlib.pyplot as plt

    if not initial and not final:
        return _missing("length-histogram", "no samples")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 20
    if initial:
        ax.hist(initial, bins=bins, alpha=0.6, label="initial policy")
    if final:
        ax.hist(final, bins=bins, alpha=0.6, label="final policy")
    ax.set_xlabel("response length (tokens)")
    ax.legend()
    return _img("length-histogram", fig)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _samples(samples: Sequence[dict[str, Any]], limit: int = 8) -> str:
    out = []
    for s in samples[:limit]:
        ptxt = "\n".join(m["content"] for m in as_messages(s.get("prompt") or []))
        cells = []
        for side in ("old", "new"):
            scores = " · ".join(f"{k} {s[f'{k}_{side}']:.2f}" for k in ("gold", "proxy")
                                if f"{k}_{side}" in s)  # fmt: skip
            name = "initial" if side == "old" else "final"
            cells.append(f'<td><div class="who">{name} {html.escape(scores)}</div>'
                         f'<pre>{html.escape(str(s.get(side, "")))}</pre></td>')  # fmt: skip
        out.append(f'<tr><td colspan="2" class="prompt"><pre>{html.escape(ptxt)}</pre></td></tr>'
                   f"<tr>{''.join(cells)}</tr>")  # fmt: skip
    if not out:
        return '<p class="muted">no samples</p>'
    return f'<table class="samples">{"".join(out)}</table>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:1rem auto;padding:0 1rem;
color:#1d232a}h1{margin-bottom:0}.muted{color:#667}figure{margin:1rem 0}img{max-width:100%}
table{border-collapse:collapse}td,th{border-bottom:1px solid #e4e7eb;padding:.3rem .6rem;
text-align:left;vertical-align:top}pre{white-space:pre-wrap;margin:0}.samples td{width:50%}
.prompt{background:#f1f4f8}.who{font-size:.8rem;color:#456}"""


def build_report(
    path: str | Path,
    *,
    title: str = "palate run",
    summary: dict[str, Any] | None = None,
    ppo_metrics: Sequence[dict[str, Any]] = (),
    checkpoints: Sequence[dict[str, Any]] = (),
    lengths_initial: Sequence[int] = (),
    lengths_final: Sequence[int] = (),
    samples: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write the report to ``path`` (atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    from palate.data import atomic_write

    summary = summary or {}
    keys = ["gold_win_rate", "gold_win_rate_low", "gold_win_rate_high", "proxy_win_rate",
            "gold_new", "gold_old", "proxy_new", "proxy_old", "kl", "length_new", "length_old"]  # fmt: skip
    rows = [(k, summary[k]) for k in keys if k in summary]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Result: final vs initial policy on held-out prompts</h2>",
        _table(rows) if rows else '<p class="muted">no evaluation</p>',
        "<h2>Training</h2>", _curves(ppo_metrics),
        "<h2>Over-optimisation</h2>", _gold_vs_proxy(checkpoints),
        "<h2>Lengths</h2>", _lengths(lengths_initial, lengths_final),
        "<h2>Samples</h2>", _samples(samples),
        "</body></html>",
    ]  # fmt: skip
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write("\n".join(parts))
    return path
