"""The reports' data shaping, table by table (plain rows; the templates only lay them out)."""

from __future__ import annotations

import math

from palate.report import evaluation, sections
from palate.report.render import fmt


def test_fmt() -> None:
    assert fmt(0.12345) == "0.123" and fmt(3) == "3" and fmt(None) == "" and fmt("<a>") == "<a>"


def test_win_rates_rows() -> None:
    assert sections.win_rates({}) is None
    assert sections.win_rates({"kl": 1.0}) is None  # numbers beside no win rate: no table
    s = {
        "gold_win_rate": 0.8,
        "gold_win_rate_low": 0.7,
        "gold_win_rate_high": 0.9,
        "gold_new": 0.5,
        "proxy_lc_win_rate": 0.6,
        "length_new": 12,
        "length_old": 14.5,
        "kl": 2.0,
        "kl_target": 3,
        "prompts": 8,
    }
    w = sections.win_rates(s)
    assert w is not None
    gold, lc, length = w["rows"]
    assert gold == {
        "label": "gold preference",
        "win": 0.8,
        "bold": True,
        "ci": (0.7, 0.9),
        "new": 0.5,
        "old": None,
    }
    assert lc["label"] == "proxy, length-controlled" and not lc["bold"]
    assert lc["ci"] == (None, None) and lc["new"] is None  # interval shown, no means
    assert length["ci"] is None and (length["new"], length["old"]) == (12, 14.5)
    assert w["extra"] == [
        ("KL(final ‖ initial), nats per response", 2.0),
        ("KL target (adaptive controller)", 3.0),
        ("held-out prompts", 8),
    ]


def test_overopt_peaks_in_words() -> None:
    o = {
        "bon": [
            {"d": 0.0, "gold_gain": 0.0, "proxy_gain": 0.0},
            {"d": 1.0, "gold_gain": 0.3, "proxy_gain": 0.5},
        ],
        "rl": [{"d": 2.0, "gold_gain": 0.1, "proxy_gain": 0.4}],
        "fits": {
            "rl_gold": {
                "alpha": 0.5,
                "beta": 0.3,
                "r2": 0.9,
                "peak_d": 1.5,
                "peak_kl": 2.25,
                "peak_gain": 0.5,
            },
            "bon_proxy": {"alpha": 0.8, "beta": 0.0, "r2": 1.0, "peak_d": 50.0},
            "bon_gold": {"alpha": 0.6, "beta": 0.1, "r2": 0.95, "peak_d": None},
        },
    }
    assert sections.overopt(None) is None
    out = sections.overopt(o)
    assert out is not None and out["figure"]["id"] == "overopt" and out["figure"]["png"]
    assert [(f["name"], f["peak"]) for f in out["fits"]] == [
        ("bon_gold", "none (gain still rising)"),
        ("bon_proxy", "beyond the measured range (d > 2.0)"),
        ("rl_gold", "KL 2.25, gain 0.500"),
    ]
    assert out["fits"][0]["cells"] == [0.6, 0.1, 0.95]


def test_small_sections() -> None:
    assert sections.stages(
        {"sft": {"steps": 3, "eval_loss": 1.5}, "reward": {"criteria": {"harm": {}}}}
    ) == [
        ("sft", "eval_loss 1.500, steps 3"),
        ("reward", ""),  # the stage ran, none of its headline numbers
        ("reward · harm prompts", "train_pairs , eval_accuracy "),
    ]
    first, second = sections.rounds(
        [{"round": 0, "gold": 0.1}, {"round": 1, "stale_accuracy": 0.6}]
    )
    assert first["stale"] is None and second["stale"] == (0.6, None)
    assert first["after"] == [None, None, 0.1, None, None]
    rate = {"rate": 0.5, "low": 0.4, "high": 0.6, "n": 10}
    x = sections.xstest({"initial": {"unsafe_refusal": rate}, "final": {}})
    assert [r["sides"] for r in x] == [[rate, None], [None, None]]
    assert sections.sycophancy({"initial": {}, "final": {}}) == []  # section shown, no rows
    assert sections.alarms([{"name": "kl", "update": 3, "message": "m"}])[0]["stopped"] is False
    shown = sections.samples([{"prompt": "p", "old": "a", "gold_old": 0.123, "proxy_old": 1.0}])
    assert shown == [
        {
            "prompt": "p",
            "cells": [
                {"who": "initial gold 0.12 · proxy 1.00", "text": "a"},
                {"who": "final ", "text": ""},
            ],
        }
    ]


def test_eval_tables() -> None:
    judged = {"win_rate": 0.6, "low": 0.5, "high": 0.7, "mean": 0.2, "baseline_mean": math.pi}
    policies = {"p": {"judges": {"zeta": judged, "people": {**judged, "n": 4}, "gold": judged}}}
    judges = evaluation.judge_order(policies)
    assert judges == ["gold", "people", "zeta"]  # known judges first, in JUDGE_LABELS' order
    (row,) = evaluation.win_rates(policies | {"q": {"judges": {}}}, judges)[:1]
    assert [c["people"] for c in row["cells"]] == [False, True, False]
    pending = evaluation.win_rates({"q": {"judges": {}}}, judges)[0]["cells"]
    assert pending == [None, None, None]
    stats = evaluation.judge_free({"baseline": {"kl": 0.0}, "policies": policies}, judges)
    assert stats["names"] == ["baseline", "p"]
    assert stats["rows"] == [
        {"label": "KL to the reference (nats)", "cells": [0.0, None]},
        {"label": "mean gold score", "cells": [math.pi, 0.2]},
    ]
    assert [label for label, _ in evaluation.win_rate_points(policies)] == [
        "p · zeta",
        "p · people",
        "p · gold",
    ]
