"""The HTML report is self-contained, has every plot, and escapes model output."""

from __future__ import annotations

import re
from pathlib import Path

from palate.report import PLOTS, build_report


def test_report_has_every_plot_inline_and_escapes_text(tmp_path: Path) -> None:
    metrics = [
        {
            "step": i,
            "objective/score": 0.1 * i,
            "objective/kl": 0.2 * i,
            "objective/kl_coef": 0.1,
            "objective/entropy": 2.0,
            "response/length": 40 - i,
        }
        for i in range(1, 6)
    ]
    checkpoints = [{"update": u, "kl": 0.5 * u, "gold": 0.1 * u, "proxy": 0.2 * u} for u in (0, 5)]
    samples = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "old": "<script>x()</script>",
            "new": "hello friend",
            "gold_old": 0.1,
            "gold_new": 0.9,
            "proxy_old": -1.0,
            "proxy_new": 1.0,
        }
    ]
    out = build_report(
        tmp_path / "report.html",
        title="t",
        ppo_metrics=metrics,
        checkpoints=checkpoints,
        lengths_initial=[40, 42],
        lengths_final=[20, 22],
        samples=samples,
        summary={
            "gold_win_rate": 0.8,
            "kl": 3.2,
            "by_criterion": {
                "<harm>": {"n": 3, "gold_win_rate": 0.25, "gold_low": 0.0, "gold_high": 0.5}
            },
        },
    )
    page = out.read_text()
    for plot_id in PLOTS:
        assert re.search(
            rf'<figure id="{plot_id}"><img alt="[^"]+" src="data:image/png;base64,', page
        )
    assert "&lt;script&gt;x()&lt;/script&gt;" in page and "<script>" not in page
    assert re.search(r"<th>gold preference</th><td><b>0.800</b>", page)
    # per-criterion rows, criterion names escaped
    assert re.search(
        r"<th>&lt;harm&gt;</th><td>3</td><td><b>0.250</b></td><td>\[0.000, 0.500\]", page
    )
    # self-contained: nothing loaded from elsewhere
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page


def test_report_notes_missing_parts(tmp_path: Path) -> None:
    page = build_report(tmp_path / "r.html").read_text()
    assert "no PPO metrics" in page and "no checkpoint evaluations" in page
