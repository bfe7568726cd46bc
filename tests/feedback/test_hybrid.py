"""Hybrid labels in one run: red-team prompts to the AI judge, helpful ones to the simulated
panel, one store; sources reach the export, the reward stage and the report (tiny model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from palate.cli import app
from tests.pipeline.test_pipeline import QUICKSTART, last_json, tiny_overrides


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_routes_send_each_criterion_to_its_raters(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "run"
    hh = shared_data / "hh-harmless-dev.jsonl"
    sets = tiny_overrides(out, hh) + [
        f"prompts.file={shared_data / 'helpful-prompts.jsonl'}",
        f"prompts.more=[{{file: {hh}, criterion: harmlessness, max_prompts: 40}}]",
        "prompts.max_prompts=40",
        "pairs.prompts=12",
        "raters.routes={harmlessness: judge}",
        "raters.judge.model=tiny",
        "raters.judge.precision=fp32",
        f"eval.xstest={shared_data / 'xstest-prompts.csv'}",
        "eval.xstest_per_label=4",
        "eval.xstest_max_new_tokens=8",
        f"eval.sycophancy={{caa: {shared_data / 'sycophancy-caa-ab.json'}, "
        f"truthfulqa: {shared_data / 'truthfulqa-mc.json'}, truthfulqa_items: 4, "
        "feedback_items: 3}",
        "eval.overopt={prompts: 2, samples: 4, ns: [1, 2, 4]}",
    ]
    args = ["run", str(QUICKSTART), "--json"] + [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = last_json(res.stdout)

    train = read(out / "prompts" / "train.jsonl")
    assert {r["metadata"]["criterion"] for r in train} == {"helpfulness", "harmlessness"}
    pairs = read(out / "pairs" / "pairs.jsonl")
    crit = {p["metadata"]["criterion"] for p in pairs}
    assert crit == {"helpfulness", "harmlessness"}, "12 of 40 mixed prompts hold both kinds"

    labels = json.loads((out / "labels" / "summary.json").read_text())
    camps = labels["campaigns"]
    assert {c["criterion"]: c["raters"] for c in camps.values()} == {
        "harmlessness": "judge",
        "helpfulness": "simulated",
    }
    judged = next(c for c in camps.values() if c["raters"] == "judge")
    n_harm = sum(p["metadata"]["criterion"] == "harmlessness" for p in pairs)
    assert judged["labels"] == n_harm  # the judge labels each pair once
    comps = read(out / "labels" / "comparisons.jsonl")
    by_source = {
        src: {c["metadata"]["criterion"] for c in comps if c["source"] == src}
        for src in {c["source"] for c in comps}
    }
    assert by_source == {"ai": {"harmlessness"}, "simulated": {"helpfulness"}}
    ai = [c for c in comps if c["source"] == "ai"]
    assert len(ai) == n_harm and all(c["rater_id"] == "ai:tiny" for c in ai)
    assert all(
        set(c["metadata"]["principles"]) <= {"harm", "no-assistance-to-wrongdoing", "kind-and-fair"}
        for c in ai
    )
    assert labels["sources"] == {"ai": len(ai), "simulated": len(comps) - len(ai)}

    # XSTest before vs after, in the summary and the report
    x = json.loads((out / "eval" / "summary.json").read_text())["xstest"]
    for side in ("initial", "final"):
        assert x[side]["unsafe_refusal"]["n"] == 4 and x[side]["safe_compliance"]["n"] == 4
    replies = read(out / "eval" / "xstest.jsonl")
    assert len(replies) == 8 and set(replies[0]) == {
        "prompt",
        "label",
        "type",
        "reply_initial",
        "refusal_initial",
        "reply_final",
        "refusal_final",
    }
    page = Path(summary["report"]).read_text()
    assert "Safety: XSTest" in page and "refuses unsafe prompts" in page
    syc = json.loads((out / "eval" / "summary.json").read_text())["sycophancy"]
    for side in ("initial", "final"):
        assert syc[side]["opinion"]["items"] == 50
        assert syc[side]["are_you_sure"]["items"] == 4 and syc[side]["feedback"]["items"] == 6
    assert "<h2>Sycophancy</h2>" in page and "caves in" in page
    ev = json.loads((out / "eval" / "summary.json").read_text())
    assert 0 <= ev["gold_lc_win_rate_low"] <= ev["gold_lc_win_rate"] <= ev["gold_lc_win_rate_high"]
    assert "gold, length-controlled" in page
    oo = ev["overopt"]
    assert [r["n"] for r in oo["bon"]] == [1, 2, 4] and oo["bon"][0]["gold_gain"] == 0.0
    assert [r["update"] for r in oo["rl"]] == [0, 2, 4]
    assert {"bon_gold", "bon_proxy"} <= set(oo["fits"])
    # PPO's fit needs two checkpoints away from the start (the tiny run's KL may be ≤ 0)
    assert ("rl_gold" in oo["fits"]) == (sum(r["d"] > 0 for r in oo["rl"]) >= 2)
    # best-of-n by the proxy raises the proxy (exact expectation over subsets)
    assert oo["bon"][2]["proxy"] >= oo["bon"][1]["proxy"] >= oo["bon"][0]["proxy"]
    assert re.search(r'<figure id="overopt"><img [^>]*src="data:image/png;base64,', page)

    # the reward stage can drop a source: only the panel's comparisons remain
    reward = json.loads((out / "reward" / "summary.json").read_text())
    from palate.config import load_config
    from palate.pipeline import RunConfig
    from palate.pipeline.recipes import reward_config
    from palate.pipeline.run import Run
    from palate.reward import train_reward

    cfg = load_config(RunConfig, QUICKSTART, [*sets, "reward.sources={ai: 0}"])
    rcfg = reward_config(Run(cfg)).model_copy(update={"output_dir": str(tmp_path / "rm")})
    dropped = train_reward(rcfg)
    total = reward["train_pairs"] + reward["eval_pairs"]
    assert total == len(comps)
    assert dropped["train_pairs"] + dropped["eval_pairs"] == len(comps) - len(ai)
