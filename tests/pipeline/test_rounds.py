"""Iterated online RLHF (``rounds``) on the tiny model: a later round samples the newest
policy, chooses pairs by the last reward model's uncertainty, labels them, retrains the reward
model on every label so far and continues PPO; a run killed mid-round continues it; a finished
run skips every round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from palate.config import load_config
from palate.pipeline import RunConfig, run_pipeline
from tests.pipeline.test_pipeline import QUICKSTART, tiny_overrides


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def round_labels(out: Path, suffix: str) -> int:
    from sqlalchemy import func, select

    from palate.label.db import Campaign, Label, Pair, open_db

    with open_db(str(out / "labels" / "labels.db"))() as db:
        return db.scalar(
            select(func.count(Label.id))
            .join(Pair, Pair.id == Label.pair_id)
            .join(Campaign, Campaign.id == Pair.campaign_id)
            .where(Campaign.name.endswith(suffix))
        )


@pytest.mark.timeout(600)
def test_two_rounds_killed_mid_round_then_continued(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    sets = tiny_overrides(out, hh_file) + [
        "rounds=2",
        "pairs.budget=20",  # of 6 prompts x C(4,2) = 36 candidates per round
        "pairs.select=uncertainty",
        "pairs.random_share=0.25",
    ]
    cmd = [sys.executable, "-m", "palate.cli", "run", str(QUICKSTART)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PALATE_PROGRESS": "0", "COLUMNS": "1000"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = out / "round-1" / "labels" / "summary.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not marker.is_file():
            assert proc.poll() is None, "the run ended before round 1 labelled its pairs"
            time.sleep(0.05)
        assert marker.is_file(), "round 1 never labelled its pairs"
        proc.send_signal(signal.SIGKILL)  # mid-round: after its labels, before its PPO ended
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "round-1" / "summary.json").exists()
    labelled = round_labels(out, "-round-1")
    assert labelled == 20 * 3  # overlap 3
    pairs_mtime = (out / "round-1" / "pairs" / "pairs.jsonl").stat().st_mtime

    cfg = load_config(RunConfig, QUICKSTART, sets)
    summary = run_pipeline(cfg)  # continues round 1
    assert summary["status"] == "complete" and summary["rounds"] == 2
    assert round_labels(out, "-round-1") == labelled  # nothing labelled twice
    assert (out / "round-1" / "pairs" / "pairs.jsonl").stat().st_mtime == pairs_mtime

    # round 0 has no reward model yet: its 20 pairs are a random draw
    p0 = rows(out / "pairs" / "pairs.jsonl")
    assert len(p0) == 20 and {p["metadata"]["selected_by"] for p in p0} == {"random"}
    # round 1: fresh prompts, the newest policy; 5 drawn at random, 15 by uncertainty
    p1 = rows(out / "round-1" / "pairs" / "pairs.jsonl")
    assert len(p1) == 20
    prompts0 = {json.dumps(p["prompt"]) for p in p0}
    assert not prompts0 & {json.dumps(p["prompt"]) for p in p1}
    assert p1[0]["source_a"] == str(out / "ppo" / "final")
    by = [p["metadata"]["selected_by"] for p in p1]
    assert by.count("random") == 5 and by.count("uncertainty") == 15
    # the uncertainty picks are the 15 candidates nearest ½ by round 0's reward model, among
    # those not drawn at random; P(a ≻ b) re-computed here from the model itself
    from palate.reward.model import load_reward_model

    cands = rows(out / "round-1" / "pairs" / "candidates.jsonl")
    assert len(cands) == 36
    rm = load_reward_model(out / "reward" / "final")
    prompts = [c["prompt"] for c in cands]
    sa = rm.score(prompts, [c["response_a"] for c in cands]).float().numpy()
    sb = rm.score(prompts, [c["response_b"] for c in cands]).float().numpy()
    p_a = 1 / (1 + np.exp(-(sa - sb)))
    np.testing.assert_allclose([c["metadata"]["p_a"] for c in cands], p_a, atol=1e-4)
    key = lambda c: (json.dumps(c["prompt"]), c["response_a"], c["response_b"])  # noqa: E731
    drawn = {key(p) for p in p1 if p["metadata"]["selected_by"] == "random"}
    rest = [(abs(p - 0.5), key(c)) for c, p in zip(cands, p_a, strict=True) if key(c) not in drawn]
    nearest = {k for _, k in sorted(rest)[:15]}
    assert {key(p) for p in p1 if p["metadata"]["selected_by"] == "uncertainty"} == nearest

    # the labels of every round reach round 1's reward model
    n0 = len(rows(out / "labels" / "comparisons.jsonl"))
    n1 = len(rows(out / "round-1" / "labels" / "comparisons.jsonl"))
    assert len(rows(out / "round-1" / "labels" / "all.jsonl")) == n0 + n1
    r1 = json.loads((out / "round-1" / "summary.json").read_text())
    assert r1["comparisons"] == n1 and r1["comparisons_total"] == n0 + n1
    assert 0 <= r1["stale_accuracy"] <= 1 and r1["stale_n_random"] >= 1
    reward1 = json.loads((out / "round-1" / "reward" / "summary.json").read_text())
    assert reward1["train_pairs"] + reward1["eval_pairs"] == n0 + n1
    # PPO continues round 0's adapter; the reference stays the initial policy
    ppo1 = (out / "round-1" / "ppo" / "config.yaml").read_text()
    assert f"init_adapter: {out / 'ppo' / 'checkpoints' / 'step-0000004' / 'policy'}" in ppo1
    assert "model: tiny" in ppo1
    assert summary["ppo_updates"] == 8 and summary["labels"] == n0 + n1

    # evaluation and report follow all rounds
    points = rows(out / "eval" / "checkpoints.jsonl")
    assert [p["update"] for p in points] == [0, 2, 4, 6, 8]
    assert [p["update"] for p in rows(out / "eval" / "rollouts.jsonl")] == list(range(1, 9))
    page = (out / "report" / "report.html").read_text()
    assert '<h2 id="rounds">Rounds</h2>' in page and page.count("<td>uncertainty</td>") == 1

    # a finished run skips every stage, rounds included
    stamp = (out / "round-1" / "summary.json").stat().st_mtime
    again = run_pipeline(cfg)
    assert again["status"] == "complete"
    assert (out / "round-1" / "summary.json").stat().st_mtime == stamp


def test_round_settings_are_checked() -> None:
    base = {"output_dir": "x", "prompts": {"file": "p.jsonl"}}
    with pytest.raises(ValueError, match="disagreement needs reward.ensemble"):
        RunConfig.model_validate({**base, "pairs": {"select": "disagreement"}})
    with pytest.raises(ValueError, match="lora"):
        RunConfig.model_validate({**base, "rounds": 2, "ppo": {"finetune": "full"}})
    with pytest.raises(ValueError, match="file"):
        RunConfig.model_validate(
            {**base, "rounds": 2, "raters": {"kind": "file", "file": "c.jsonl"}}
        )


def test_later_rounds_continue_at_the_last_beta_or_at_a_fixed_one(tmp_path: Path) -> None:
    """Round 1's PPO config: by default the adaptive controller goes on from round 0's last β;
    with ppo.later_rounds_kl_coef, round 1 runs at that β, fixed, and round 0 (its settings
    and fingerprint) is untouched. Round 0's PPO folder is hand-built: a finished checkpoint
    and the summary's last β are all round 1 reads of it."""
    from palate.pipeline.recipes import ppo_config
    from palate.pipeline.run import Run

    done = tmp_path / "ppo" / "checkpoints" / "step-0000016"
    done.mkdir(parents=True)
    (done / "state.json").write_text('{"step": 16, "stage": "ppo"}\n')
    (tmp_path / "ppo" / "summary.json").write_text('{"kl_coef_last": 0.021}\n')
    base = [f"output_dir={tmp_path}", "rounds=2"]

    def run(*sets: str) -> Run:
        return Run(load_config(RunConfig, QUICKSTART, [*base, *sets]))

    plain, fixed = run("ppo.later_rounds_kl_coef=null"), run("ppo.later_rounds_kl_coef=0.05")
    assert (plain.cfg.ppo.kl.coef, plain.cfg.ppo.kl.adaptive) == (0.03, True)
    for r in (plain, fixed):  # round 0 starts at kl.coef and adapts
        kl0 = ppo_config(r, 0).kl
        assert (kl0.coef, kl0.adaptive) == (0.03, True)
    kl1 = ppo_config(plain, 1).kl
    assert (kl1.coef, kl1.adaptive) == (0.021, True)
    assert ppo_config(plain, 1).init_adapter == str(done / "policy")
    kl1 = ppo_config(fixed, 1).kl
    assert (kl1.coef, kl1.adaptive) == (0.05, False)
    # only the later rounds' fingerprints change (and eval, report: downstream of them)
    a, b = plain.fingerprints, fixed.fingerprints
    assert [s for s in a if a[s] != b[s]] == ["round-1", "eval", "report"]
    # with one round it is unused: no stage's settings change
    one = [base[0], "rounds=1"]
    assert (
        Run(
            load_config(RunConfig, QUICKSTART, [*one, "ppo.later_rounds_kl_coef=0.05"])
        ).fingerprints
        == Run(
            load_config(RunConfig, QUICKSTART, [*one, "ppo.later_rounds_kl_coef=null"])
        ).fingerprints
    )
