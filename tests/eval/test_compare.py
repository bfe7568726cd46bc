"""``palate eval``: policies against a baseline on the tiny model — policy forms resolved,
win rates by a reward model (checked against its own scores), a gold rubric and people (a
campaign created on the first run and read back on the second, samples reused), judge-free
numbers hand-checked, the HTML report with its plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from palate.cli import app
from palate.errors import ConfigError
from palate.eval.compare import EvalConfig, compare_policies, resolve_policy, text_stats
from palate.eval.policies import PolicySamples
from palate.report import EVAL_PLOTS
from tests.browser import render_report


def test_resolve_policy_forms(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ppo" / "final").mkdir(parents=True)
    (run / "ppo" / "config.yaml").write_text("model: tiny\n")
    ckpt = run / "ppo" / "checkpoints" / "step-0000004"
    (ckpt / "policy").mkdir(parents=True)
    (ckpt / "policy" / "adapter_config.json").write_text("{}")
    assert resolve_policy(str(run)) == (str(run / "ppo" / "final"), None)  # a run directory
    assert resolve_policy(str(run / "ppo")) == (str(run / "ppo" / "final"), None)  # PPO output
    assert resolve_policy(str(ckpt)) == (str(ckpt), "tiny")  # a LoRA checkpoint + its base
    assert resolve_policy("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    lone = tmp_path / "lone" / "a" / "step-1"
    (lone / "policy").mkdir(parents=True)
    (lone / "policy" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no PPO config"):
        resolve_policy(str(lone))


def test_text_stats_hand_computed() -> None:
    s = PolicySamples(
        prompts=["p1", "p2", "p3", "p4"],  # type: ignore[list-item]
        responses=["a b c a b c a b c", "I'm sorry, I cannot help", "hello there", "hello there"],
        finished=[True, False, True, True],
        token_ids=[[1] * 9, [1] * 5, [1] * 2, [1] * 2],
    )
    st = text_stats(s)
    assert st["length"] == pytest.approx(4.5)
    assert st["eos_rate"] == pytest.approx(0.75)
    assert st["refusal_rate"] == pytest.approx(0.25)
    # 9 + 5 + 2 + 2 = 18 words; distinct: a b c i'm/sorry... counted by the monitors' tokeniser
    assert 0 < st["distinct_1"] < 1 and 0 < st["distinct_2"] < 1
    # "a b c a b c a b c": 7 trigrams, 3 distinct → 4/7 repeated; the others have none
    assert st["repetition"] == pytest.approx((4 / 7) / 4)


def test_config_needs_a_judge_and_good_names() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EvalConfig(output_dir="x", prompts="p.jsonl", policies={"a": "tiny"})
    with pytest.raises(ValueError, match="policy name"):
        EvalConfig(
            output_dir="x",
            prompts="p.jsonl",
            policies={"baseline": "tiny"},
            judges={"gold": {}},  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second tiny policy (other weights, same tokenizer) and a tiny reward model with a
    random head (so its scores differ between answers)."""
    from palate.models import tiny_causal_lm
    from palate.reward.model import RewardModel

    root = tmp_path_factory.mktemp("models")
    other, tok = tiny_causal_lm(seed=1)
    other.save_pretrained(root / "other")
    tok.save_pretrained(root / "other")
    torch.manual_seed(0)
    rm = RewardModel.from_backbone("tiny", max_length=64, head_init="normal")
    rm.save(root / "rm")
    return {"other": root / "other", "rm": root / "rm"}


def test_eval_rm_gold_and_people(tmp_path: Path, hh_file: Path, models: dict[str, Path]) -> None:
    from sqlalchemy import select

    from palate.label.db import Label, Pair, open_db
    from palate.raters.simulated import PanelConfig, label_with_panel
    from palate.reward.model import load_reward_model

    out, db = tmp_path / "eval", f"sqlite:///{tmp_path / 'labels.db'}"
    sets = [
        f"output_dir={out}",
        f"prompts={hh_file}",
        "max_prompts=8",
        "baseline=tiny",
        f"policies={{same: tiny, other: {models['other']}}}",
        f"judges.reward_model={models['rm']}",
        "judges.gold={}",
        f"judges.people.db={db}",
        "sampling.max_new_tokens=8",
        "batch_size=4",
    ]
    args = ["eval", "--json"] + [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert first["prompts"] == 8 and first["reused_samples"] == []
    same, other = first["policies"]["same"], first["policies"]["other"]

    # the same model as the baseline, same seed: identical answers → KL 0, every judge a tie
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    for judge in ("reward_model", "gold"):
        assert same["judges"][judge]["win_rate"] == 0.5
        assert same["judges"][judge]["low"] == same["judges"][judge]["high"] == 0.5
    assert other["kl"] > 0.1
    for k in ("length", "eos_rate", "distinct_1", "distinct_2", "repetition", "refusal_rate"):
        assert same[k] == first["baseline"][k], k

    # the reward model's win rate, recomputed from its own scores of the saved samples
    rows = {
        n: [json.loads(x) for x in (out / "samples" / f"{n}.jsonl").read_text().splitlines()]
        for n in ("baseline", "other")
    }
    rm = load_reward_model(models["rm"])
    prompts = [r["prompt"] for r in rows["baseline"]]
    s_base = rm.score(prompts, [r["response"] for r in rows["baseline"]]).float().numpy()
    s_new = rm.score(prompts, [r["response"] for r in rows["other"]]).float().numpy()
    wins = np.where(s_new > s_base, 1.0, np.where(s_new == s_base, 0.5, 0.0))
    r = other["judges"]["reward_model"]
    assert r["win_rate"] == pytest.approx(wins.mean(), abs=1e-9)
    assert r["low"] <= r["win_rate"] <= r["high"] and 0 <= r["lc_win_rate"] <= 1
    assert r["mean"] == pytest.approx(s_new.mean(), abs=1e-3)

    # people: a campaign of 2 policies x 8 prompts, nothing labelled yet
    assert first["people"]["pairs"] == 16 and first["people"]["labelled"] == 0
    assert other["judges"]["people"]["labelled"] == 0
    assert "win_rate" not in other["judges"]["people"]
    # raters label it (a simulated panel through the same store path as people) ...
    label_with_panel(db, first["people"]["campaign"], PanelConfig(raters=2, seed=0))
    # ... and the next run reads the labels back, reusing every policy's samples
    cfg = EvalConfig.model_validate(
        {
            "output_dir": str(out),
            "prompts": str(hh_file),
            "max_prompts": 8,
            "baseline": "tiny",
            "policies": {"same": "tiny", "other": str(models["other"])},
            "judges": {"reward_model": str(models["rm"]), "gold": {}, "people": {"db": db}},
            "sampling": {"max_new_tokens": 8},
            "batch_size": 4,
        }
    )
    second = compare_policies(cfg)
    assert sorted(second["reused_samples"]) == ["other", "same"]
    assert second["policies"]["other"]["judges"]["reward_model"] == r
    ppl = second["policies"]["other"]["judges"]["people"]
    assert ppl["labelled"] == 8 and ppl["complete"]
    # expected: each pair's label (stored in the pair's orientation; a = the policy)
    factory = open_db(db)
    with factory() as s:
        expected = []
        for pair in s.scalars(select(Pair).order_by(Pair.id)):
            if pair.meta["policy"] != "other":
                continue
            answers = [
                lab.answer for lab in s.scalars(select(Label).where(Label.pair_id == pair.id))
            ]
            assert len(answers) == 1  # overlap 1
            expected.append({"a": 1.0, "b": 0.0, "tie": 0.5}[answers[0]])
    assert ppl["win_rate"] == pytest.approx(np.mean(expected))

    # the report: win-rate and length plots inline, every policy's answers side by side
    page = (out / "report.html").read_text()
    for plot_id in EVAL_PLOTS:
        assert re.search(
            rf'<figure id="{plot_id}"><img alt="[^"]+" src="data:image/png;base64,', page
        )
    assert "people" in page and "length-controlled" in page
    shown = render_report(out / "report.html", EVAL_PLOTS)  # real headless Chromium
    assert "Win rates against the baseline" in shown["headings"]
    assert "pending" not in shown["text"]  # every judge has its labels now

    # a changed policy set cannot reuse the campaign: one clear error naming it
    cfg2 = cfg.model_copy(update={"policies": {"other": "tiny", "same": "tiny"}})
    with pytest.raises(ConfigError, match="holds other pairs"):
        compare_policies(cfg2)


def test_eval_with_the_ai_judge(tmp_path: Path, hh_file: Path, models: dict[str, Path]) -> None:
    """The AI judge's win rate is the share of prompts where its debiased P(policy better)
    exceeds ½ — recomputed here from the judge itself on the saved answers."""
    from palate.feedback.config import JudgeSettings
    from palate.feedback.judge import load_judge

    judge_cfg = {"model": "tiny", "principle_mode": "all"}
    cfg = EvalConfig.model_validate(
        {
            "output_dir": str(tmp_path / "eval"),
            "prompts": str(hh_file),
            "max_prompts": 4,
            "baseline": "tiny",
            "policies": {"other": str(models["other"])},
            "judges": {"ai": judge_cfg},
            "sampling": {"max_new_tokens": 8},
        }
    )
    res = compare_policies(cfg)["policies"]["other"]["judges"]["ai"]
    rows = {
        n: [
            json.loads(x)
            for x in (tmp_path / "eval" / "samples" / f"{n}.jsonl").read_text().splitlines()
        ]
        for n in ("baseline", "other")
    }
    judge = load_judge(JudgeSettings.model_validate(judge_cfg))
    verdicts = judge.compare(
        [
            (a["prompt"], b["response"], a["response"])
            for a, b in zip(rows["baseline"], rows["other"], strict=True)
        ]
    )
    probs = np.array([v.prob_a for v in verdicts])
    assert res["mean_prob"] == pytest.approx(probs.mean(), abs=1e-5)
    wins = np.where(probs > 0.5, 1.0, np.where(probs == 0.5, 0.5, 0.0))
    assert res["win_rate"] == pytest.approx(wins.mean())
    assert res["n"] == 4


def test_eval_overopt_study(tmp_path: Path, hh_file: Path, models: dict[str, Path]) -> None:
    """Best-of-n on the baseline and each policy as a point at its own KL, in the summary and
    the report; overopt without a proxy and a gold is a config error."""
    from palate.eval.overopt import bon_kl

    base = {
        "output_dir": str(tmp_path / "eval"),
        "prompts": str(hh_file),
        "max_prompts": 4,
        "baseline": "tiny",
        "policies": {"other": str(models["other"])},
        "sampling": {"max_new_tokens": 8},
        "overopt": {"prompts": 2, "samples": 4, "ns": [1, 2, 4]},
    }
    with pytest.raises(ValueError, match="overopt needs"):
        EvalConfig.model_validate({**base, "judges": {"gold": {}}})
    cfg = EvalConfig.model_validate(
        {**base, "judges": {"gold": {}, "reward_model": str(models["rm"])}}
    )
    s = compare_policies(cfg)
    o = s["overopt"]
    assert [r["n"] for r in o["bon"]] == [1, 2, 4]
    assert [r["kl"] for r in o["bon"]] == [pytest.approx(bon_kl(n)) for n in (1, 2, 4)]
    assert o["bon"][0]["gold_gain"] == 0 and o["bon"][0]["proxy_gain"] == 0
    assert [p["name"] for p in o["rl"]] == ["baseline", "other"]
    assert o["rl"][1]["kl"] == pytest.approx(s["policies"]["other"]["kl"])
    gold = s["policies"]["other"]["judges"]["gold"]
    assert o["rl"][1]["gold_gain"] == pytest.approx(gold["mean"] - gold["baseline_mean"])
    assert "bon_gold" in o["fits"] and o["prompts"] == 2 and o["samples"] == 4
    page = (tmp_path / "eval" / "report.html").read_text()
    assert '<figure id="overopt"><img' in page and o["rl_title"].startswith("the policies")
