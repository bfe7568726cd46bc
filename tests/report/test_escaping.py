"""Both reports show untrusted text (prompts, replies, names of raters, policies, criteria,
campaigns) as text: nothing in it becomes markup."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from palate.report import build_eval_report, build_report

EVIL = '<script>alert("x&y")</script><img src=x onerror=alert(1)>\''


class _Page(HTMLParser):
    """The tags and the text a browser would build from the page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def _assert_inert(path: Path, shown: int) -> None:
    """No script and no injected image in ``path``; ``EVIL`` appears as text ``shown`` times."""
    page = _parse(path)
    assert not [t for t, _ in page.tags if t == "script"]
    for tag, attrs in page.tags:
        assert "onerror" not in attrs, tag
        if tag == "img":
            assert (attrs["src"] or "").startswith("data:image/png;base64,")
    assert "".join(page.text).count(EVIL) == shown


def test_run_report_escapes_untrusted_text(tmp_path: Path) -> None:
    quality: dict[str, Any] = {
        EVIL: {
            "flagged": [EVIL],
            "aggregate": EVIL,
            "raters": [
                {"rater": EVIL, "attributes": {"age": EVIL}, "labels": 3, "quality_flags": [EVIL]}
            ],
            "populations": {
                EVIL: {
                    "groups": {EVIL: {"labels": 3, "agreement_within": 0.5}},
                    "between": [
                        {
                            "groups": [EVIL, EVIL],
                            "agreement": 1.0,
                            "shared_pairs": 2,
                            "mean_gap": 0.1,
                        }
                    ],
                }
            },
        }
    }
    out = build_report(
        tmp_path / "report.html",
        title=EVIL,
        notes=EVIL,
        summary={
            "gold_win_rate": 0.5,
            "prompts": EVIL,
            "by_criterion": {EVIL: {"n": 1}},
            "groups": {
                "win_rates": {
                    EVIL: {
                        "win_rate": 0.5,
                        "low": 0.0,
                        "high": 1.0,
                        "gold_new": 0.0,
                        "gold_old": 0.0,
                    }
                },
                "held_out_agreement": {EVIL: {EVIL: 0.5}},
            },
        },
        samples=[{"prompt": [{"role": "user", "content": EVIL}], "old": EVIL, "new": EVIL}],
        alarms=[{"name": EVIL, "update": 1, "message": EVIL}],
        rounds=[{"round": 1, "select": EVIL}],
        raters=quality,
        stages={"labels": {"raters": EVIL}},
    )
    # every place it is shown (the same 26 as the hand-built HTML before the templates):
    # title (<title>, <h1>), notes, held-out prompts, criterion, group (row, column, reward
    # model), sample (prompt, two replies), alarm (name, message), round's selection, campaign
    # line (name, aggregate, flagged), rater row (name, attributes, flags), population (heading,
    # column, group, both sides of "between"), the labels stage's line
    _assert_inert(out, 26)
    text = "".join(_parse(out).text)
    assert f"{EVIL}’s reward model" in text and f"age={EVIL}" in text
    assert f"raters {EVIL}" in text


def test_eval_report_escapes_untrusted_text(tmp_path: Path) -> None:
    judged = {"win_rate": 0.6, "low": 0.5, "high": 0.7, "mean": 0.1, "baseline_mean": 0.0}
    out = build_eval_report(
        tmp_path / "report.html",
        title=EVIL,
        summary={
            "prompts": 1,
            "prompts_file": EVIL,
            "baseline": {"spec": EVIL},
            "reference": EVIL,
            "policies": {EVIL: {"judges": {"gold": judged}}},
            "people": {"campaign": EVIL, "labelled": 0, "pairs": 1, "db": EVIL},
        },
        lengths={"baseline": [3], EVIL: [4]},
        samples=[{"prompt": EVIL, "baseline": EVIL, EVIL: EVIL}],
    )
    # title (<title>, <h1>), prompts file, baseline spec, reference, campaign, db, policy (win
    # rates row, judge-free column), sample (prompt, two answers, the policy's name over its own)
    _assert_inert(out, 13)
