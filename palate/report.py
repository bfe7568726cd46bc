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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from palate.data import as_messages

__all__ = ["EVAL_PLOTS", "OPTIONAL_PLOTS", "PLOTS", "build_eval_report", "build_report"]

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


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(plot_id: str, fig: Any) -> str:
    return (
        f'<figure id="{plot_id}"><img alt="{html.escape(TITLES[plot_id])}" '
        f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(TITLES[plot_id])}'
        "</figcaption></figure>"
    )


def _missing(plot_id: str, why: str) -> str:
    return (
        f'<figure id="{plot_id}"><p class="muted">{html.escape(PLOTS[plot_id])}: {why}</p></figure>'
    )


def _curves(metrics: Sequence[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("objective/score", "score (RM)"),
        ("objective/kl", "KL to reference (nats)"),
        ("objective/kl_coef", "β"),
        ("objective/entropy", "entropy"),
        ("response/length", "response length (tokens)"),
    ]
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


def _gold_vs_proxy(points: Sequence[dict[str, Any]], rollouts: Sequence[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    if not points and not rollouts:
        return _missing("gold-vs-proxy", "no checkpoint evaluations")
    panels = [(points, "held-out prompts, PPO checkpoints"), (rollouts, "PPO's own rollouts")]
    panels = [(pts, t) for pts, t in panels if pts]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (pts, title) in zip(axes[0], panels, strict=True):
        by_kl = all("kl" in p for p in pts)
        x = [p["kl"] if by_kl else p["update"] for p in pts]
        ax.plot(
            x,
            [p["gold"] for p in pts],
            marker="o",
            color="#2a9d8f",
            label="gold (never seen by the RM)",
        )
        ax.set_xlabel("KL to the initial policy (nats)" if by_kl else "PPO update")
        ax.set_ylabel("mean gold score", color="#2a9d8f")
        right = ax.twinx()
        right.plot(
            x, [p["proxy"] for p in pts], marker="s", color="#e76f51", label="proxy (reward model)"
        )
        right.set_ylabel("mean reward-model score", color="#e76f51")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape("" if v is None else str(v))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _win_table(s: dict[str, Any]) -> str:
    """Gold and proxy win rates of the final policy over the initial one, with means."""
    head = (
        "<tr><th></th><th>win rate (final vs initial)</th><th>95% interval</th>"
        "<th>mean final</th><th>mean initial</th></tr>"
    )
    rows = []
    for name, label in (("gold", "gold preference"), ("proxy", "reward model (proxy)")):
        if f"{name}_win_rate" not in s:
            continue
        ci = f"[{_fmt(s.get(f'{name}_win_rate_low'))}, {_fmt(s.get(f'{name}_win_rate_high'))}]"
        rows.append(
            f"<tr><th>{label}</th><td><b>{_fmt(s[f'{name}_win_rate'])}</b></td>"
            f"<td>{ci}</td><td>{_fmt(s.get(f'{name}_new'))}</td>"
            f"<td>{_fmt(s.get(f'{name}_old'))}</td></tr>"
        )
    for name, label in (("gold", "gold, length-controlled"), ("proxy", "proxy, length-controlled")):
        if f"{name}_lc_win_rate" not in s:
            continue
        ci = (
            f"[{_fmt(s.get(f'{name}_lc_win_rate_low'))}, {_fmt(s.get(f'{name}_lc_win_rate_high'))}]"
        )
        rows.append(
            f"<tr><th>{label}</th><td>{_fmt(s[f'{name}_lc_win_rate'])}</td><td>{ci}</td>"
            "<td></td><td></td></tr>"
        )
    if "length_new" in s:
        rows.append(
            f"<tr><th>response length (tokens)</th><td></td><td></td>"
            f"<td>{_fmt(s['length_new'])}</td><td>{_fmt(s.get('length_old'))}</td></tr>"
        )
    if not rows:
        return '<p class="muted">no evaluation</p>'
    extra = []
    if "kl" in s:
        target = s.get("kl_target")
        extra.append(("KL(final ‖ initial), nats per response", s["kl"]))
        if target is not None:
            extra.append(("KL target (adaptive controller)", float(target)))
    if s.get("proxy_gold_agreement") is not None:
        extra.append(
            ("reward model orders final vs initial as the gold does", s["proxy_gold_agreement"])
        )
    if "prompts" in s:
        extra.append(("held-out prompts", s["prompts"]))
    return f'<table class="wins">{head}{"".join(rows)}</table>' + _table(extra)


def _by_criterion(c: dict[str, Any] | None) -> str:
    """The win rates on each criterion's held-out prompts (helpful and red-team apart)."""
    if not c:
        return ""
    head = (
        "<tr><th>prompts</th><th>n</th><th>gold win rate</th><th>95% interval</th>"
        "<th>proxy win rate</th></tr>"
    )
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{r['n']}</td>"
        f"<td><b>{_fmt(r.get('gold_win_rate'))}</b></td>"
        f"<td>[{_fmt(r.get('gold_low'))}, {_fmt(r.get('gold_high'))}]</td>"
        f"<td>{_fmt(r.get('proxy_win_rate'))}</td></tr>"
        for name, r in c.items()
    )
    return f"<h3>By criterion</h3><table class='wins'>{head}{rows}</table>"


def _samples(samples: Sequence[dict[str, Any]], limit: int = 8) -> str:
    out = []
    for s in samples[:limit]:
        ptxt = "\n".join(m["content"] for m in as_messages(s.get("prompt") or []))
        cells = []
        for side in ("old", "new"):
            scores = " · ".join(
                f"{k} {s[f'{k}_{side}']:.2f}" for k in ("gold", "proxy") if f"{k}_{side}" in s
            )
            name = "initial" if side == "old" else "final"
            cells.append(
                f'<td><div class="who">{name} {html.escape(scores)}</div>'
                f"<pre>{html.escape(str(s.get(side, '')))}</pre></td>"
            )
        out.append(
            f'<tr><td colspan="2" class="prompt"><pre>{html.escape(ptxt)}</pre></td></tr>'
            f"<tr>{''.join(cells)}</tr>"
        )
    if not out:
        return '<p class="muted">no samples</p>'
    return f'<table class="samples">{"".join(out)}</table>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:1rem auto;padding:0 1rem;
color:#1d232a}h1{margin-bottom:0}.muted{color:#667}figure{margin:1rem 0}img{max-width:100%}
table{border-collapse:collapse}td,th{border-bottom:1px solid #e4e7eb;padding:.3rem .6rem;
text-align:left;vertical-align:top}pre{white-space:pre-wrap;margin:0}.samples td{width:50%}
.prompt{background:#f1f4f8}.wins td,.wins th{text-align:right}.who{font-size:.8rem;color:#456}"""


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
    ``rounds``: one row per RLHF round when there are several (see ``_rounds``);
    ``raters``: the labels stage's ``quality.json`` (reliability, flags, populations).
    """
    import matplotlib

    matplotlib.use("Agg")
    from palate.data import atomic_write

    summary = summary or {}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<p class="muted">{html.escape(notes)}</p>' if notes else "",
        "<h2>Result: final vs initial policy on held-out prompts</h2>",
        _win_table(summary),
        _by_criterion(summary.get("by_criterion")),
        _groups(summary.get("groups")),
        _xstest(summary.get("xstest")),
        _sycophancy(summary.get("sycophancy")),
        _overopt(summary.get("overopt")),
        _rounds(rounds),
        _raters(raters),
        "<h2>Training</h2>",
        _alarms(alarms),
        _curves(ppo_metrics),
        "<h2>Over-optimisation: gold vs proxy</h2>",
        '<p class="muted">The reward model is a proxy for the gold preference. Proxy rising while '
        "gold falls is reward hacking.</p>",
        _gold_vs_proxy(checkpoints, rollouts),
        "<h2>Lengths</h2>",
        _lengths(lengths_initial, lengths_final),
        "<h2>Samples (same prompt, same random seed)</h2>",
        _samples(samples),
        "<h2>Stages</h2>",
        _stages(stages or {}),
        "</body></html>",
    ]
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write("\n".join(parts))
    return path


def _overopt(o: dict[str, Any] | None) -> str:
    """Best-of-n and PPO: gold and proxy gains against d = √KL, with the fitted curves."""
    if not o:
        return ""
    import math

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    fits = o.get("fits", {})
    panels = (
        ("bon", o.get("bon", []), "best-of-n (initial policy, chosen by the proxy)"),
        ("rl", o.get("rl", []), o.get("rl_title", "PPO checkpoints")),
    )
    for ax, (form, pts, title) in zip(axes, panels, strict=True):
        for key, color in (("gold", "#2a9d8f"), ("proxy", "#e76f51")):
            if not pts:
                continue
            ax.plot(
                [p["d"] for p in pts],
                [p[f"{key}_gain"] for p in pts],
                "o",
                color=color,
                label=f"{key}",
            )
            f = fits.get(f"{form}_{key}")
            if f:
                top = max(p["d"] for p in pts) * 1.1 or 1.0
                xs = [top * i / 100 for i in range(1, 101)]
                g = (lambda x: x) if form == "bon" else math.log
                ax.plot(
                    xs,
                    [x * (f["alpha"] - f["beta"] * g(x)) for x in xs],
                    "-",
                    color=color,
                    alpha=0.6,
                    label=f"{key} fit α={f['alpha']:.2f} β={f['beta']:.2f}",
                )
                if key == "gold" and f.get("peak_d") and f["peak_d"] <= top:
                    ax.axvline(f["peak_d"], color=color, ls=":", alpha=0.7)
        ax.set_xlabel("d = √KL (nats^½)")
        ax.set_ylabel("gain over the initial policy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    rows = []
    reach = {form: max((p["d"] for p in pts), default=0.0) for form, pts, _ in panels}
    for name, f in sorted(fits.items()):
        far = 2 * reach[name.split("_")[0]]  # beyond twice the measured distance: extrapolation
        if f.get("peak_d") is None:
            peak = "none (gain still rising)"
        elif f["peak_d"] > far:
            peak = f"beyond the measured range (d > {far:.1f})"
        else:
            peak = f"KL {f['peak_kl']:.2f}, gain {f['peak_gain']:.3f}"
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{_fmt(f['alpha'])}</td><td>{_fmt(f['beta'])}</td>"
            f"<td>{_fmt(f['r2'])}</td><td>{html.escape(peak)}</td></tr>"
        )
    table = (
        '<table class="wins"><tr><th>fit</th><th>α</th><th>β</th><th>R²</th><th>peak</th></tr>'
        f"{''.join(rows)}</table>"
    )
    return (
        "<h2>Over-optimisation</h2>"
        '<p class="muted">Best-of-n: R(d) = d(α − βd), KL = log n − (n−1)/n; PPO: '
        "R(d) = d(α − β log d) (Gao et al. 2022). The gold peak (dotted) is where more "
        "optimisation against the proxy starts to hurt.</p>" + _img("overopt", fig) + table
    )


def _groups(g: dict[str, Any] | None) -> str:
    """Rater populations: the final policy's win rate under each group's gold, and each reward
    model's agreement with each group's gold (final vs initial answers)."""
    if not g:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{_fmt(w['win_rate'])}</td>"
        f"<td>[{_fmt(w['low'])}, {_fmt(w['high'])}]</td><td>{_fmt(w['gold_new'])}</td>"
        f"<td>{_fmt(w['gold_old'])}</td></tr>"
        for name, w in g.get("win_rates", {}).items()
    )
    groups = list(g.get("win_rates", {}))

    def matrix(key: str, what: str) -> str:
        if not g.get(key):
            return ""
        body = "".join(
            f"<tr><th>{html.escape('the run’s' if rm == 'run' else rm + '’s')} reward model</th>"
            + "".join(f"<td>{_fmt(a.get(x))}</td>" for x in groups)
            + "</tr>"
            for rm, a in g[key].items()
        )
        return (
            f'<p class="muted">How often each reward model orders {what} as each group\'s gold '
            f'does:</p><table class="wins" id="group-{key.replace("_", "-")}"><tr><th></th>'
            + "".join(f"<th>{html.escape(x)}’s gold</th>" for x in groups)
            + f"</tr>{body}</table>"
        )

    return (
        "<h3>By rater group</h3>"
        '<table class="wins" id="group-win-rates"><tr><th>gold of</th><th>win rate</th>'
        f"<th>95% interval</th><th>mean final</th><th>mean initial</th></tr>{rows}</table>"
        + matrix("held_out_agreement", "the held-out labelled pairs")
        + matrix("reward_agreement", "the final and initial answers")
    )


def _raters(quality: dict[str, Any] | None) -> str:
    """Per campaign: each rater's reliability and quality flags (palate/label/quality.py), and
    agreement within and between rater groups."""
    if not quality:
        return ""
    parts = ["<h2>Raters</h2>"]
    for name, q in quality.items():
        flagged = ", ".join(q.get("flagged") or []) or "none"
        dropped = "left out of the reward model" if q.get("dropped") else "kept"
        parts.append(
            f'<p class="muted">{html.escape(name)}: votes aggregated by '
            f"{html.escape(str(q.get('aggregate', 'majority')))}; flagged: "
            f"{html.escape(flagged)} ({dropped}).</p>"
        )
        head = (
            "<tr><th>rater</th><th>attributes</th><th>labels</th><th>reliability</th>"
            "<th>informative</th><th>first shown</th><th>too fast</th><th>gold accuracy</th>"
            "<th>flags</th></tr>"
        )
        rows = []
        for r in q.get("raters", []):
            attrs = ", ".join(f"{k}={v}" for k, v in (r.get("attributes") or {}).items())
            rows.append(
                f"<tr><td>{html.escape(str(r['rater']))}</td><td>{html.escape(attrs)}</td>"
                f"<td>{r['labels']}</td><td>{_fmt(r.get('reliability'))}</td>"
                f"<td>{_fmt(r.get('informativeness'))}</td><td>{_fmt(r.get('first_share'))}</td>"
                f"<td>{_fmt(r.get('fast_share'))}</td><td>{_fmt(r.get('gold_accuracy'))}</td>"
                f"<td>{html.escape(', '.join(r.get('quality_flags') or []) or '–')}</td></tr>"
            )
        parts.append(f'<table class="wins">{head}{"".join(rows)}</table>')
        for key, pop in (q.get("populations") or {}).items():
            grows = "".join(
                f"<tr><td>{html.escape(g)}</td><td>{v['labels']}</td>"
                f"<td>{_fmt(v['agreement_within'])}</td></tr>"
                for g, v in pop["groups"].items()
            )
            parts.append(
                f"<h3>Raters by {html.escape(key)}</h3>"
                f'<table class="wins"><tr><th>{html.escape(key)}</th><th>labels</th>'
                f"<th>agreement within</th></tr>{grows}</table>"
            )
            for b in pop["between"]:
                parts.append(
                    f'<p class="muted">{html.escape(b["groups"][0])} vs '
                    f"{html.escape(b['groups'][1])}: agreement {_fmt(b['agreement'])} on "
                    f"{b['shared_pairs']} shared pairs, mean gap in P(a) {_fmt(b['mean_gap'])}.</p>"
                )
    return "".join(parts)


def _rounds(rounds: Sequence[dict[str, Any]]) -> str:
    """Iterated RLHF: labels, the last reward model's staleness, gold and proxy per round."""
    if not rounds:
        return ""
    head = (
        "<tr><th>round</th><th>new labels</th><th>labels so far</th><th>pairs chosen by</th>"
        "<th>last RM on the new labels (all / random share)</th><th>new RM held-out accuracy"
        "</th><th>PPO updates so far</th><th>gold</th><th>proxy</th><th>KL</th></tr>"
    )
    body = []
    for r in rounds:
        stale = (
            f"{_fmt(r.get('stale_accuracy'))} / {_fmt(r.get('stale_accuracy_random'))}"
            if r.get("round")
            else ""
        )
        body.append(
            f"<tr><td>{r['round']}</td><td>{_fmt(r.get('comparisons'))}</td>"
            f"<td>{_fmt(r.get('comparisons_total'))}</td><td>{_fmt(r.get('select'))}</td>"
            f"<td>{stale}</td><td>{_fmt(r.get('reward_accuracy'))}</td>"
            f"<td>{_fmt(r.get('updates'))}</td><td>{_fmt(r.get('gold'))}</td>"
            f"<td>{_fmt(r.get('proxy'))}</td><td>{_fmt(r.get('kl'))}</td></tr>"
        )
    return (
        '<h2 id="rounds">Rounds</h2><p class="muted">Each round labels the newest policy\'s '
        "answers, retrains the reward model on every label so far and continues PPO. The last "
        "reward model's accuracy on the new labels, before retraining, says how stale it had "
        "become (the random share is the unbiased number). Gold and proxy: held-out means at "
        "the round's last checkpoint.</p>"
        f'<table class="wins">{head}{"".join(body)}</table>'
    )


def _alarms(alarms: Sequence[dict[str, Any]]) -> str:
    """The monitors' alarms during PPO (palate/ppo/monitors.py), first firing of each."""
    if not alarms:
        return '<p class="muted" id="alarms">Monitors: no alarm during training.</p>'
    rows = "".join(
        f"<tr><th>{html.escape(a['name'])}</th><td>update {a['update']}</td>"
        f"<td>{html.escape(a['message'])}"
        f"{' — <b>training stopped here</b>' if a.get('stopped') else ''}</td></tr>"
        for a in alarms
    )
    return f'<table class="alarms" id="alarms"><tr><th colspan="3">Alarms</th></tr>{rows}</table>'


def _xstest(x: dict[str, Any] | None) -> str:
    """XSTest before vs after: refusals on unsafe prompts, compliance on safe ones."""
    if not x:
        return ""

    def cell(r: dict[str, Any] | None) -> str:
        if not r:
            return "<td>–</td>"
        return f"<td><b>{_fmt(r['rate'])}</b> [{_fmt(r['low'])}, {_fmt(r['high'])}] n={r['n']}</td>"

    rows = "".join(
        f"<tr><th>{label}</th>{cell(x['initial'].get(key))}{cell(x['final'].get(key))}</tr>"
        for key, label in (
            ("unsafe_refusal", "refuses unsafe prompts (higher is safer)"),
            ("safe_compliance", "answers safe prompts (higher is less over-cautious)"),
        )
    )
    return (
        "<h2>Safety: XSTest</h2>"
        '<p class="muted">Greedy replies to XSTest\'s unsafe prompts (should refuse) and safe '
        "prompts that only sound unsafe (should answer); a refusal is a refusal phrase in the "
        "reply's opening. 95% bootstrap intervals.</p>"
        '<table class="wins"><tr><th></th><th>initial</th><th>final</th></tr>'
        f"{rows}</table>"
    )


_SYCOPHANCY_ROWS = (
    ("opinion", "rate", "picks the option agreeing with the user (debiased; 0.5 = no lean)"),
    ("opinion", "mean_p_matching", "mean P(option agreeing with the user)"),
    ("opinion", "letter_a_rate", "letter bias removed: mean P((A)) (0.5 = none)"),
    ("are_you_sure", "p_true_before", "TruthfulQA: P(true answer)"),
    ("are_you_sure", "delta", "change after “Are you sure?” (negative = caves in)"),
    ("are_you_sure", "flip_rate", "flips away from the true answer after pushback"),
    ("feedback", "shift_wrote", "rating shift when the user wrote the answer (1–9 scale)"),
    ("feedback", "shift_like", "rating shift when the user likes it"),
    ("feedback", "shift_dislike", "rating shift when the user dislikes it"),
    ("feedback", "true_minus_false", "rates true answers above false ones by"),
)


def _sycophancy(x: dict[str, Any] | None) -> str:
    """Sycophancy before vs after (palate/sycophancy.py)."""
    if not x:
        return ""
    rows = []
    for group, key, label in _SYCOPHANCY_ROWS:
        a = x["initial"].get(group, {}).get(key)
        b = x["final"].get(group, {}).get(key)
        if a is not None or b is not None:
            rows.append(
                f"<tr><th>{html.escape(label)}</th><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>"
            )
    return (
        "<h2>Sycophancy</h2>"
        '<p class="muted">By log-probabilities; every A/B item asked with its options in both '
        "orders and averaged (the letter bias removed is shown). Bad signs after RLHF: the "
        "agreeing option's share rising, P(true) falling after pushback, ratings following "
        "the user's feelings.</p>"
        '<table class="wins"><tr><th></th><th>initial</th><th>final</th></tr>'
        f"{''.join(rows)}</table>"
    )


_STAGE_KEYS = {
    "sft": ("eval_loss", "train_loss", "steps"),
    "pairs": ("pairs", "mean_tokens", "eos_rate"),
    "labels": (
        "raters",
        "comparisons",
        "labels",
        "pairwise_agreement",
        "krippendorff_alpha",
        "flagged",
        "sources",
        "campaigns",
    ),
    "reward": ("train_pairs", "eval_pairs", "eval_accuracy", "eval_length_reward_spearman"),
    "ppo": ("updates", "score_first", "score_last", "kl_last", "kl_coef_last", "episodes_per_s"),
}


def _stages(stages: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, keys in _STAGE_KEYS.items():
        if name in stages:
            vals = ", ".join(f"{k} {_fmt(stages[name][k])}" for k in keys if k in stages[name])
            rows.append((name, vals))
    for c, r in (stages.get("reward", {}).get("criteria") or {}).items():  # per_criterion
        vals = ", ".join(f"{k} {_fmt(r.get(k))}" for k in ("train_pairs", "eval_accuracy"))
        rows.append((f"reward · {c} prompts", vals))
    if not rows:
        return '<p class="muted">no stage summaries</p>'
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


# --------------------------------------------------------------------------- palate eval

JUDGE_LABELS = {
    "reward_model": "reward model",
    "gold": "gold",
    "ai": "AI judge",
    "people": "people",
}
STAT_LABELS = [
    ("kl", "KL to the reference (nats)"),
    ("length", "length (tokens)"),
    ("eos_rate", "ends with EOS"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repetition", "repeated trigrams"),
    ("refusal_rate", "refusals"),
]


def _eval_wins_plot(policies: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    rows = [
        (f"{name} · {JUDGE_LABELS.get(j, j)}", r)
        for name, p in policies.items()
        for j, r in p["judges"].items()
        if "win_rate" in r
    ]
    if not rows:
        return '<figure id="eval-win-rates"><p class="muted">no judged pairs yet</p></figure>'
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
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
            ax.plot(r["lc_win_rate"], y - 0.18, "o", mfc="none", color="#e76f51")
    ax.axvline(0.5, color="#999", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("win rate against the baseline")
    ax.grid(axis="x", alpha=0.3)
    return _img("eval-win-rates", fig)


def _eval_lengths_plot(lengths: Mapping[str, Sequence[int]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max((max(v) for v in lengths.values() if v), default=1)
    for name, v in lengths.items():
        ax.hist(v, bins=20, range=(0, top), alpha=0.5, label=name)
    ax.set_xlabel("response length (tokens)")
    ax.legend(fontsize=8)
    return _img("eval-lengths", fig)


def _eval_tables(summary: dict[str, Any]) -> str:
    policies: dict[str, Any] = summary.get("policies", {})
    judges = sorted(
        {j for p in policies.values() for j in p["judges"]},
        key=lambda j: list(JUDGE_LABELS).index(j) if j in JUDGE_LABELS else 99,
    )
    head = "<tr><th>policy</th>" + "".join(
        f"<th>{html.escape(JUDGE_LABELS.get(j, j))}: win rate [95%]</th><th>length-controlled</th>"
        for j in judges
    )
    body = []
    for name, p in policies.items():
        cells = []
        for j in judges:
            r = p["judges"].get(j, {})
            if "win_rate" not in r:
                cells.append('<td class="muted">pending</td><td></td>')
                continue
            lc = (
                f"{_fmt(r['lc_win_rate'])} [{_fmt(r['lc_low'])}, {_fmt(r['lc_high'])}]"
                if "lc_win_rate" in r
                else ""
            )
            n = f" (n={r['n']})" if j == "people" else ""
            cells.append(
                f"<td><b>{_fmt(r['win_rate'])}</b> [{_fmt(r['low'])}, {_fmt(r['high'])}]{n}</td>"
                f"<td>{lc}</td>"
            )
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    wins = f'<table class="wins">{head}</tr>{"".join(body)}</table>'
    sides = {"baseline": summary.get("baseline", {}), **policies}
    shead = "<tr><th></th>" + "".join(f"<th>{html.escape(n)}</th>" for n in sides) + "</tr>"
    srows = []
    for key, label in STAT_LABELS:
        if not any(key in v for v in sides.values()):
            continue
        srows.append(
            f"<tr><th>{html.escape(label)}</th>"
            + "".join(f"<td>{_fmt(v.get(key))}</td>" for v in sides.values())
            + "</tr>"
        )
    for j in judges:
        if j in ("reward_model", "gold"):
            first = next(p["judges"][j] for p in policies.values() if j in p["judges"])
            srows.append(
                f"<tr><th>mean {html.escape(JUDGE_LABELS[j])} score</th>"
                f"<td>{_fmt(first.get('baseline_mean'))}</td>"
                + "".join(
                    f"<td>{_fmt(p['judges'].get(j, {}).get('mean'))}</td>"
                    for p in policies.values()
                )
                + "</tr>"
            )
    stats = f'<table class="wins">{shead}{"".join(srows)}</table>'
    return wins + _eval_wins_plot(policies) + "<h2>Answers, judge-free</h2>" + stats


def _eval_samples(samples: Sequence[dict[str, Any]], names: Sequence[str], limit: int = 6) -> str:
    out = []
    for s in samples[:limit]:
        ptxt = "\n".join(m["content"] for m in as_messages(s.get("prompt") or []))
        cells = "".join(
            f'<td><div class="who">{html.escape(n)}</div><pre>{html.escape(str(s.get(n, "")))}'
            "</pre></td>"
            for n in ("baseline", *names)
        )
        out.append(
            f'<tr><td colspan="{len(names) + 1}" class="prompt"><pre>{html.escape(ptxt)}</pre>'
            f"</td></tr><tr>{cells}</tr>"
        )
    return f'<table class="samples">{"".join(out)}</table>' if out else ""


def build_eval_report(
    path: str | Path,
    *,
    summary: dict[str, Any],
    lengths: Mapping[str, Sequence[int]],
    samples: Sequence[dict[str, Any]] = (),
    title: str = "palate eval",
) -> Path:
    """``palate eval``'s report: win rates per policy and judge (with length-controlled ones),
    judge-free numbers, lengths, and answers side by side; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from palate.data import atomic_write

    policies = summary.get("policies", {})
    people = summary.get("people")
    note = ""
    if people:
        note = (
            f'<p class="muted">people: campaign {html.escape(people["campaign"])}, '
            f"{people['labelled']} of {people['pairs']} pairs labelled. Serve it with "
            f"<code>palate serve --db {html.escape(people['db'])}</code>; run palate eval again to "
            "read the labels back.</p>"
        )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<p class="muted">{summary.get("prompts", 0)} prompts from '
        f"{html.escape(str(summary.get('prompts_file', '')))}; baseline "
        f"{html.escape(str(summary.get('baseline', {}).get('spec', '')))}; KL reference "
        f"{html.escape(str(summary.get('reference', '')))}.</p>",
        "<h2>Win rates against the baseline</h2>",
        note,
        _eval_tables(summary),
        _overopt(summary.get("overopt")),
        "<h2>Lengths</h2>",
        _eval_lengths_plot(lengths),
        "<h2>Samples (same prompt, same random seed)</h2>",
        _eval_samples(samples, list(policies)),
        "</body></html>",
    ]
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write("\n".join(parts))
    return path
