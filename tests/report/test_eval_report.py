"""``palate eval``'s report from a hand-made summary: every plot inline, one column pair per
judge (known judges first), pending judges marked, people's n shown, judge-free numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from palate.report import EVAL_PLOTS, build_eval_report


def _judged(win: float, lc: bool = False, n: int | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"win_rate": win, "low": win - 0.1, "high": win + 0.1}
    r |= {"mean": win - 0.5, "baseline_mean": -0.25}
    if lc:
        r |= {"lc_win_rate": win - 0.05, "lc_low": win - 0.2, "lc_high": win + 0.05}
    if n is not None:
        r["n"] = n
    return r


def test_eval_report_tables_and_plots(tmp_path: Path) -> None:
    summary = {
        "prompts": 12,
        "prompts_file": "prompts.jsonl",
        "baseline": {"spec": "tiny", "length": 25.0, "kl": 0.0},
        "reference": "tiny",
        "policies": {
            "ppo": {
                "judges": {"people": _judged(0.55, n=12), "gold": _judged(0.75, lc=True)},
                "length": 20.0,
            },
            "sft": {"judges": {"gold": _judged(0.5), "people": {}}, "length": 30.0},
        },
        "people": {"campaign": "eval-1", "labelled": 12, "pairs": 24, "db": "labels.db"},
    }
    page = build_eval_report(
        tmp_path / "report.html",
        summary=summary,
        lengths={"baseline": [25, 26], "ppo": [20, 21], "sft": [30]},
        samples=[{"prompt": "Hello?", "baseline": "hi", "ppo": "hello", "sft": "hey"}],
    ).read_text()
    for plot_id in EVAL_PLOTS:
        assert re.search(
            rf'<figure id="{plot_id}"><img alt="[^"]+" src="data:image/png;base64,', page
        )
    assert "12 prompts from prompts.jsonl; baseline tiny; KL reference tiny." in page
    assert "campaign eval-1, 12 of 24 pairs labelled" in page
    # gold before people (JUDGE_LABELS' order), each with its length-controlled column
    heads = re.findall(r"<th>([^<]*): win rate \[95%\]</th><th>length-controlled</th>", page)
    assert heads == ["gold", "people"]
    assert re.search(
        r"<th>ppo</th>\s*<td><b>0.750</b> \[0.650, 0.850\]</td><td>0.700 \[0.550, 0.800\]</td>"
        r"\s*<td><b>0.550</b> \[0.450, 0.650\] \(n=12\)</td><td></td>",
        page,
    )
    assert re.search(r'<th>sft</th>.*<td class="muted">pending</td><td></td>\s*</tr>', page)
    # judge-free table: the baseline first, then the policies; mean gold with the baseline's
    assert re.search(r"<tr><th>length \(tokens\)</th><td>25.000</td><td>20.000</td>", page)
    assert "<tr><th>KL to the reference (nats)</th><td>0.000</td><td></td><td></td></tr>" in page
    assert re.search(r"<th>mean gold score</th><td>-0.250</td><td>0.250</td><td>0.000</td>", page)
    assert '<td colspan="3" class="prompt"><pre>Hello?</pre></td>' in page


def test_eval_report_without_judged_pairs(tmp_path: Path) -> None:
    page = build_eval_report(
        tmp_path / "r.html", summary={"policies": {"a": {"judges": {"gold": {}}}}}, lengths={}
    ).read_text()
    assert '<figure id="eval-win-rates"><p class="muted">no judged pairs yet</p>' in page
    assert "pending" in page and '<table class="samples">' not in page
