"""``palate run`` end to end on the tiny model: every stage's artifacts, the JSON summary, the
report; re-runs skip finished stages; a kill during PPO resumes; people label through the API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from palate.cli import app
from palate.config import load_config
from palate.data import write_jsonl
from palate.pipeline import RunConfig, WaitingForLabels, run_pipeline
from palate.report import PLOTS

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
PEOPLE = REPO / "examples" / "people.yaml"


def tiny_overrides(out: Path, hh_file: Path, samples_per_prompt: int | None = 4) -> list[str]:
    """The quickstart scaled down to the tiny random model (seconds instead of minutes), in one
    round (the quickstart runs two; tests/pipeline/test_rounds.py asks for them);
    ``samples_per_prompt=None`` keeps the config's own (people.yaml: 2)."""
    samples = (
        [] if samples_per_prompt is None else [f"pairs.samples_per_prompt={samples_per_prompt}"]
    )
    return samples + [
        "rounds=1",
        f"output_dir={out}",
        "model=tiny",
        f"prompts.file={hh_file}",
        "prompts.eval_prompts=8",
        "prompts.max_prompts=24",
        "pairs.prompts=6",
        "pairs.sampling.max_new_tokens=8",
        "reward.model=tiny",
        "reward.pooling=cls",
        "reward.max_length=64",
        "reward.train.epochs=1",
        "reward.train.batch_size=4",
        "ppo.sampling.max_new_tokens=8",
        "ppo.ppo.updates=4",
        "ppo.ppo.batch_size=4",
        "ppo.ppo.mini_batch_size=2",
        "ppo.ppo.epochs=1",
        "ppo.checkpoint_every=2",
        "eval.checkpoint_prompts=4",
        "eval.batch_size=8",
    ]


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_quickstart_pipeline_on_the_tiny_model(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--json"]
    for o in tiny_overrides(out, hh_file):
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = last_json(res.stdout)

    # every stage's artifacts
    for stage in ("pairs", "labels", "reward", "ppo", "eval", "report"):
        assert (out / stage / "summary.json").is_file(), stage
    pairs = [json.loads(x) for x in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    # 6 prompts x 4 samples, every two of a prompt's samples compared: 6 x 6 pairs
    assert len(pairs) == 36 and all({"prompt", "response_a", "response_b"} <= set(p) for p in pairs)
    assert len({json.dumps(p["prompt"]) for p in pairs}) == 6
    labels = json.loads((out / "labels" / "summary.json").read_text())
    assert labels["raters"] == "simulated" and labels["labels"] == 36 * 3  # overlap 3
    assert 0 <= labels["pairwise_agreement"] <= 1
    comps = (out / "labels" / "comparisons.jsonl").read_text().splitlines()
    assert len(comps) == labels["comparisons"] > 0
    assert (out / "reward" / "final" / "palate_reward.json").is_file()
    # the reward model is normalised on the initial policy's own samples (the pairs stage's:
    # same sampling as PPO's), all 24 of them
    reward = json.loads((out / "reward" / "summary.json").read_text())
    assert reward["normalize_source"] == str(out / "pairs" / "samples.jsonl")
    assert reward["normalize_samples"] == 24
    assert (out / "ppo" / "final" / "config.json").is_file()
    assert len((out / "ppo" / "metrics.jsonl").read_text().splitlines()) == 4
    assert len(list((out / "ppo" / "samples").glob("update-*.jsonl"))) == 4  # every update
    points = [json.loads(x) for x in (out / "eval" / "checkpoints.jsonl").read_text().splitlines()]
    assert [p["update"] for p in points] == [0, 2, 4]  # initial, checkpoint 2, final
    assert all({"gold", "proxy", "kl", "length"} <= set(p) for p in points)
    rollouts = (out / "eval" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4
    assert len((out / "eval" / "samples.jsonl").read_text().splitlines()) == 8

    # the JSON summary
    for key in (
        "gold_win_rate",
        "gold_win_rate_low",
        "gold_win_rate_high",
        "proxy_win_rate",
        "kl",
        "kl_target",
        "length_new",
        "length_old",
        "report",
    ):
        assert summary[key] is not None, key
    assert summary["status"] == "complete" and summary["prompts"] == 8
    assert summary["gold_win_rate_low"] <= summary["gold_win_rate"] <= summary["gold_win_rate_high"]
    assert (
        json.loads((out / "summary.json").read_text())["gold_win_rate"] == summary["gold_win_rate"]
    )

    # the report: one self-contained file with every plot
    page = Path(summary["report"]).read_text()
    for plot_id in PLOTS:
        assert re.search(rf'<figure id="{plot_id}"><img [^>]*src="data:image/png;base64,', page)
    assert "Gold preference (rubric" in page and not re.search(r'src="(?!data:)', page)
    assert 'id="alarms"' in page  # the monitors' verdict, alarm or none

    # a re-run skips every finished stage and gives the same result
    stamp = (out / "reward" / "final" / "palate_reward.json").stat().st_mtime_ns
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 0, res2.output
    assert (
        "done, skipped" in res2.output
        and last_json(res2.stdout)["gold_win_rate"] == summary["gold_win_rate"]
    )
    assert (out / "reward" / "final" / "palate_reward.json").stat().st_mtime_ns == stamp

    # a changed PPO setting re-runs PPO and what follows, not the stages before it
    res3 = CliRunner().invoke(app, args + ["--set", "ppo.ppo.updates=2"])
    assert res3.exit_code == 0, res3.output
    assert "stage 4/6: ppo (settings or inputs changed)" in res3.output
    assert "stage 3/6 reward: done, skipped" in res3.output
    assert (out / "reward" / "final" / "palate_reward.json").stat().st_mtime_ns == stamp
    assert last_json(res3.stdout)["ppo_updates"] == 2

    # --from forces a stage and everything after it
    res4 = CliRunner().invoke(app, args + ["--set", "ppo.ppo.updates=2", "--from", "report"])
    assert res4.exit_code == 0 and "stage 6/6: report" in res4.output
    assert "stage 5/6 eval: done, skipped" in res4.output

    # a monitor that stops PPO early: the summary counts the updates run and names the alarm
    stop = ["ppo.monitors.action=stop", "ppo.monitors.same_answer=0.01"]  # fires on update 1
    res5 = CliRunner().invoke(app, [*args, *(x for o in stop for x in ("--set", o))])
    assert res5.exit_code == 0, res5.output
    halted = last_json(res5.stdout)
    assert halted["ppo_updates"] == 1 and halted["ppo_halted_by"] == ["same_answer"]
    assert "training stopped here" in Path(halted["report"]).read_text()


def test_run_config_errors_name_the_field(tmp_path: Path, hh_file: Path) -> None:
    from palate.errors import ConfigError

    base = tiny_overrides(tmp_path / "r", hh_file)
    with pytest.raises(ConfigError, match="ppo.ppo.updatez: unknown key"):
        load_config(RunConfig, QUICKSTART, base + ["ppo.ppo.updatez=3"])
    with pytest.raises(ConfigError, match="raters.kind=file needs raters.file"):
        load_config(RunConfig, QUICKSTART, base + ["raters.kind=file"])
    with pytest.raises(ConfigError, match="rounds > 1 cannot be combined with ppo.monitors.action"):
        load_config(RunConfig, QUICKSTART, base + ["rounds=2", "ppo.monitors.action=stop"])
    cfg = load_config(RunConfig, QUICKSTART, base)
    with pytest.raises(ConfigError, match="--from 'rewards'"):
        run_pipeline(cfg, from_stage="rewards")
    assert not (tmp_path / "r").exists()  # nothing written for bad input


def test_killed_during_ppo_then_rerun_resumes(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    sets = tiny_overrides(out, hh_file) + [
        "ppo.ppo.updates=40",
        "ppo.checkpoint_every=1",
        "eval.checkpoints=false",
    ]
    cmd = [sys.executable, "-m", "palate.cli", "run", str(QUICKSTART)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PALATE_PROGRESS": "0", "COLUMNS": "1000"}  # no wrapped lines
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpts = out / "ppo" / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = sorted(p for p in ckpts.glob("step-*") if (p / "state.json").is_file())
            if len(done) >= 2:
                break
            assert proc.poll() is None, "the run ended before PPO was killed"
            time.sleep(0.05)
        else:
            pytest.fail("PPO never checkpointed")
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "ppo" / "summary.json").exists()
    killed_at = len((out / "ppo" / "metrics.jsonl").read_text().splitlines())
    assert 2 <= killed_at < 40

    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 4/6: ppo (continuing)" in res.stderr
    m = re.search(r"resuming from \S+ \(update (\d+)/40\)", res.stderr)
    assert m and int(m.group(1)) >= 2
    for stage in ("pairs", "labels", "reward"):
        assert f"{stage}: done, skipped" in res.stderr
    steps = [
        json.loads(x)["step"] for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 41))  # each update logged once, none lost or repeated
    assert last_json(res.stdout)["ppo_updates"] == 40


def _label_everything(url: str, token: str, cid: int) -> int:
    """A scripted rater: labels every pair it is served through the app's HTTP API."""
    n = 0
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while True:
            try:
                r = client.post(f"/api/v1/campaigns/{cid}/next")
            except httpx.TransportError:
                # the pipeline stops the app as soon as the last label is in, which can beat
                # this rater's next request; the caller's count check catches an early stop
                return n
            if r.status_code == 204:
                return n
            r.raise_for_status()
            item = r.json()
            answer = "a" if len(item["a"]) >= len(item["b"]) else "b"  # this rater likes long
            client.post(
                f"/api/v1/assignments/{item['assignment_id']}/label", json={"answer": answer}
            ).raise_for_status()
            n += 1


def test_people_pipeline_waits_for_labels_from_the_api(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        RunConfig,
        PEOPLE,
        tiny_overrides(out, hh_file, None)
        + ["raters.people.port=0", "raters.people.poll_seconds=0.2"],
    )
    assert cfg.raters.kind == "people" and cfg.raters.people.wait
    result: dict = {}

    def pipeline() -> None:
        try:
            result["summary"] = run_pipeline(cfg)
        except BaseException as e:  # any failure is reported below
            result["error"] = e

    t = threading.Thread(target=pipeline, daemon=True)
    t.start()
    serving = out / "labels" / "serving.json"
    deadline = time.time() + 120
    while not serving.is_file():
        assert time.time() < deadline and t.is_alive(), result.get("error")
        time.sleep(0.1)
    time.sleep(0.5)  # paused: nothing downstream starts while labels are missing
    assert not (out / "reward").exists() and t.is_alive()
    url = json.loads(serving.read_text())["url"]
    creds = json.loads((out / "labels" / "raters.json").read_text())
    assert oct((out / "labels" / "raters.json").stat().st_mode & 0o777) == "0o600"
    raters = [a for a in creds["accounts"].values() if a["role"] == "rater"]
    assert len(raters) == len(cfg.raters.people.raters) == 2
    n = sum(_label_everything(url, a["api_token"], creds["campaign_id"]) for a in raters)
    n_pairs = len((out / "pairs" / "pairs.jsonl").read_text().splitlines())
    assert n_pairs == 6  # people.yaml: 2 samples per prompt, one pair each
    assert n == n_pairs * cfg.raters.overlap, (
        f"labeling app at {url} went away after {n} labels; serving.json present: "
        f"{serving.is_file()}, pipeline alive: {t.is_alive()}, its error: {result.get('error')!r}"
    )
    t.join(timeout=240)
    assert not t.is_alive() and "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["status"] == "complete" and summary["labels"] == n_pairs
    labels = json.loads((out / "labels" / "summary.json").read_text())
    assert labels["raters"] == "people" and labels["labels"] == n
    rows = [json.loads(x) for x in (out / "labels" / "comparisons.jsonl").read_text().splitlines()]
    assert all(len(r["chosen"]) >= len(r["rejected"]) for r in rows)  # the scripted taste
    assert not serving.exists()  # the server was stopped
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)


def test_people_without_waiting_exits_then_continues(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    sets = tiny_overrides(out, hh_file, None) + ["raters.people.wait=false"]
    cfg = load_config(RunConfig, PEOPLE, sets)
    with pytest.raises(WaitingForLabels, match=rf"0/{6 * cfg.raters.overlap} labels"):
        run_pipeline(cfg)
    args = ["run", str(PEOPLE), "--json"] + [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3 and last_json(res.stdout)["status"] == "waiting_for_labels"
    # the raters label (here through the store, as the app would), then the same command continues
    import random

    from sqlalchemy import select

    from palate.label.db import Campaign, User, open_db
    from palate.label.store import LabelIn, next_assignment, submit_label

    with open_db(str(out / "labels" / "labels.db"))() as db:
        camp = db.scalar(select(Campaign))
        for user in db.scalars(select(User).where(User.role == "rater")).all():
            while (a := next_assignment(db, camp, user, random.Random(0))) is not None:
                submit_label(db, a, user, LabelIn(answer="a"))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert last_json(res.stdout)["status"] == "complete"


def test_pairing_all_or_disjoint() -> None:
    from palate.label.campaign import pair_indices

    assert pair_indices(2, "all") == [(0, 1)] == pair_indices(2, "disjoint")
    assert pair_indices(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_indices(4, "disjoint") == [(0, 1), (2, 3)]
    assert pair_indices(3, "disjoint") == [(0, 1)]  # the odd one out is not compared


def test_optional_sft_stage_becomes_the_initial_policy(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    sets = tiny_overrides(out, hh_file) + [
        f"sft.data={hh_file}",
        "sft.max_examples=16",
        "sft.max_length=96",
        "sft.train.epochs=1",
        "sft.sample_prompts=0",
        "ppo.ppo.updates=2",
        "eval.checkpoints=false",
    ]
    summary = run_pipeline(load_config(RunConfig, QUICKSTART, sets))
    assert summary["status"] == "complete"
    sft_final = out / "sft" / "final"
    assert (out / "sft" / "summary.json").is_file() and (sft_final / "config.json").is_file()
    pair = json.loads((out / "pairs" / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["source_a"] == str(sft_final)  # pairs come from the SFT policy
    ppo_cfg = (out / "ppo" / "config.yaml").read_text()
    assert f"model: {sft_final}" in ppo_cfg  # and PPO starts from it (its KL reference)


def test_reward_stage_normalises_on_fresh_policy_samples_when_pairs_differ(
    tmp_path: Path, hh_file: Path
) -> None:
    """Pairs sampled differently from PPO: the reward stage samples the initial policy itself,
    on the training prompts, with PPO's sampling settings; a user's own choice wins."""
    from palate.pipeline.recipes import reward_config
    from palate.pipeline.run import Run

    base = tiny_overrides(tmp_path / "r", hh_file)
    cfg = load_config(RunConfig, QUICKSTART, base)
    (tmp_path / "r" / "pairs").mkdir(parents=True)
    (tmp_path / "r" / "pairs" / "samples.jsonl").write_text("")
    norm = reward_config(Run(cfg)).normalize
    assert norm.responses == str(tmp_path / "r" / "pairs" / "samples.jsonl")
    assert norm.policy is None
    cfg = load_config(RunConfig, QUICKSTART, base + ["ppo.sampling.temperature=1.0"])
    norm = reward_config(Run(cfg)).normalize
    assert norm.responses is None and norm.policy == Run(cfg).policy == "tiny"
    assert norm.prompts == str(tmp_path / "r" / "prompts" / "train.jsonl")
    assert norm.sampling == cfg.ppo.sampling
    cfg = load_config(
        RunConfig,
        QUICKSTART,
        base + ["reward.normalize.policy=other", "reward.normalize.samples=9"],
    )
    norm = reward_config(Run(cfg)).normalize
    assert (norm.policy, norm.responses, norm.samples) == ("other", None, 9)


def test_the_fields_added_later_are_marked() -> None:
    """The fields added after runs existed (a list kept by hand until #46) are marked on
    themselves: a mark lost would change old runs' fingerprints and redo their stages."""
    from palate.config import added_later
    from palate.eval.gold import GoldConfig, GoldRubric
    from palate.pipeline.config import (
        PairSettings,
        PromptSettings,
        RaterSettings,
        RunOnlyPPO,
        RunReward,
        SycophancySettings,
    )
    from palate.ppo.config import PPORecipe, RewardShaping
    from palate.ppo.monitors import MonitorSettings
    from palate.raters.simulated import PanelConfig
    from palate.reward.config import RewardTrainSettings

    marked = {
        PPORecipe: ["init_adapter", "episode_seeds"],
        GoldRubric: ["refusal_right", "refusal_bonus"],
        GoldConfig: ["criteria"],
        PairSettings: ["budget", "select", "random_share"],
        PanelConfig: [
            "length_bias_mean",
            "random_raters",
            "first_raters",
            "words_per_second",
            "attributes",
        ],
        SycophancySettings: ["caa_items"],
        RewardTrainSettings: ["group_by_prompt"],
        RaterSettings: [
            "aggregate",
            "drop_flagged",
            "quality",
            "groups",
            "train_groups",
            "per_group_reward",
        ],
        RunReward: ["per_criterion"],
        MonitorSettings: ["stop_on"],
        RunOnlyPPO: [
            "later_rounds_kl_coef",
            "ptx_own_declines",
            "prompt_shares",
            "sft_own_declines",
        ],
        PromptSettings: ["flags"],
        RewardShaping: ["decline_bonus"],
    }
    for model, names in marked.items():
        assert {n for n in model.model_fields if added_later(model, n)} == set(names), model
    assert sum(map(len, marked.values())) == 29


def test_fields_added_later_keep_fingerprints_at_their_default() -> None:
    """A field marked ADDED_LATER at its default leaves every stage's fingerprint as it was before
    the field existed; set otherwise, it changes its stage and those after."""
    from palate.pipeline.run import Run

    base = ["output_dir=x", "prompts.file=p.jsonl"]

    def prints(*sets: str) -> dict[str, str]:
        return Run(load_config(RunConfig, None, [*base, *sets])).fingerprints

    plain = prints()
    assert prints("reward.train.group_by_prompt=false", "pairs.select=random") == plain
    assert prints("reward.per_criterion=false") == plain
    routed = prints("reward.per_criterion=true")
    assert routed["labels"] == plain["labels"] and routed["reward"] != plain["reward"]
    # how a run executes is no setting of any stage
    assert prints("launch.num_processes=2", "ppo.episode_seeds=false") == plain
    assert prints("ppo.episode_seeds=true")["ppo"] != plain["ppo"]
    assert "stop_on" not in Run(load_config(RunConfig, None, base))._settings("ppo")["monitors"]
    assert prints("ppo.monitors.stop_on=[kl_budget]")["ppo"] != plain["ppo"]
    two = Run(load_config(RunConfig, None, [*base, "rounds=2"]))._settings("round-1")
    assert "later_rounds_kl_coef" not in two["ppo"]
    changed = prints("reward.train.group_by_prompt=true")
    assert changed["pairs"] == plain["pairs"] and changed["labels"] == plain["labels"]
    assert changed["reward"] != plain["reward"] and changed["ppo"] != plain["ppo"]
    dumped = Run(load_config(RunConfig, None, base))._settings("reward")
    assert "group_by_prompt" not in dumped["train"] and "group_by_length" in dumped["train"]
    # nested deeper (eval.sycophancy.caa_items), and only at its default
    syc = ["eval.sycophancy.truthfulqa_items=5"]
    assert (
        "caa_items"
        not in Run(load_config(RunConfig, None, [*base, *syc]))._settings("eval")["eval"][
            "sycophancy"
        ]
    )
    assert prints(*syc, "eval.sycophancy.caa_items=4")["eval"] != prints(*syc)["eval"]


def test_win_rates_by_criterion_split_the_held_out_prompts() -> None:
    """Hand-built: helpful prompts 0, 2, 4 (the new policy wins, ties, loses on gold: 1/2),
    red-team prompts 1, 3 (wins both: 1); the proxy says otherwise; a side without proxy scores
    (no reward model) gives no proxy columns."""
    from types import SimpleNamespace

    from palate.pipeline.stages.eval import criterion_win_rates

    crit = ["helpful", "harmless", "helpful", "harmless", "helpful"]
    new = SimpleNamespace(gold=[1.0, 2.0, 0.5, 3.0, 0.0], proxy=[0.0, 0.0, 0.0, 1.0, 1.0])
    old = SimpleNamespace(gold=[0.0, 1.0, 0.5, 1.0, 1.0], proxy=[1.0, 1.0, 1.0, 0.0, 0.0])
    out = criterion_win_rates(new, old, crit, seed=0)
    assert list(out) == ["harmless", "helpful"]
    assert out["helpful"]["n"] == 3 and out["harmless"]["n"] == 2
    assert out["helpful"]["gold_win_rate"] == pytest.approx(0.5)
    assert out["harmless"]["gold_win_rate"] == pytest.approx(1.0)
    assert out["helpful"]["proxy_win_rate"] == pytest.approx(1 / 3)
    assert out["harmless"]["proxy_win_rate"] == pytest.approx(0.5)
    assert out["helpful"]["gold_low"] <= 0.5 <= out["helpful"]["gold_high"]
    no_proxy = criterion_win_rates(SimpleNamespace(gold=new.gold, proxy=None), old, crit, seed=0)
    assert "proxy_win_rate" not in no_proxy["helpful"]


def test_one_reward_model_per_criterion_routes_ppo_and_the_proxy(
    tmp_path: Path, shared_data: Path
) -> None:
    """``reward.per_criterion``: helpful and red-team prompts get a reward model each, trained
    on their own labels and normalised on the policy's samples of their own prompts; PPO and
    the evaluation's proxy score each prompt with its criterion's model."""
    from palate.data import prompt_text
    from palate.pipeline.recipes import ppo_config
    from palate.pipeline.run import Run
    from palate.pipeline.stages.reward import run_scorer
    from palate.ppo.trainer import PPOTrainer
    from palate.reward import RoutedScorer, load_reward_model

    out = tmp_path / "run"
    red_team = shared_data / "hh-harmless-dev.jsonl"
    sets = tiny_overrides(out, shared_data / "helpful-prompts.jsonl") + [
        f'prompts.more=[{{file: "{red_team}", criterion: harmlessness, max_prompts: 20}}]',
        "reward.per_criterion=true",
        "gold.rubric.refusal_right=[harmlessness]",
        "eval.sycophancy=null",
        "eval.overopt=null",
    ]
    cfg = load_config(RunConfig, QUICKSTART, sets)
    summary = run_pipeline(cfg)
    run = Run(cfg)
    criteria = run.criteria()
    rows = [json.loads(x) for x in (out / "labels" / "comparisons.jsonl").read_text().splitlines()]
    reward = json.loads((out / "reward" / "summary.json").read_text())
    assert set(reward["criteria"]) == {"harmlessness", "helpfulness"}
    assert set(summary["reward_accuracy_by_criterion"]) == {"harmlessness", "helpfulness"}
    pair_prompts = {
        prompt_text(json.loads(x)["prompt"])
        for x in (out / "pairs" / "samples.jsonl").read_text().splitlines()
    }
    for c, got in reward["criteria"].items():
        mine = [r for r in rows if r["metadata"]["criterion"] == c]
        data = (out / "labels" / "criteria" / f"{c}.jsonl").read_text().splitlines()
        assert len(data) == len(mine) == got["train_pairs"] + got["eval_pairs"] > 0
        assert all(json.loads(x)["metadata"]["criterion"] == c for x in data)
        own = json.loads((out / "reward" / "criteria" / c / "summary.json").read_text())
        samples = out / "labels" / "criteria" / f"{c}-samples.jsonl"
        assert own["normalize_source"] == str(samples)
        n_prompts = sum(criteria[p] == c for p in pair_prompts)
        assert own["normalize_samples"] == 4 * n_prompts  # 4 samples per prompt, its own only
        assert {criteria[prompt_text(json.loads(x)["prompt"])] for x in samples.open()} == {c}
    routes = {c: str(out / "reward" / "criteria" / c / "final") for c in reward["criteria"]}
    ppo = ppo_config(run)
    assert ppo.reward.routes == routes
    trainer = PPOTrainer(ppo)
    assert isinstance(trainer.score_fn, RoutedScorer)
    assert set(trainer.score_fn.routes) == set(routes)
    assert trainer.score_fn.criterion_of == trainer.criteria
    assert set(trainer.criteria.values()) == set(routes)
    assert all(criteria[p] == c for p, c in trainer.criteria.items())
    # the proxy of the evaluation: each held-out prompt scored by its criterion's model
    samples = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {criteria[prompt_text(s["prompt"])] for s in samples} == set(routes)
    proxy = run_scorer(run, 0, run.precision())
    got = proxy([s["prompt"] for s in samples], [s["new"] for s in samples]).tolist()
    assert got == pytest.approx([s["proxy_new"] for s in samples], rel=1e-3, abs=1e-3)
    pooled = load_reward_model(out / "reward" / "final")
    pooled.precision = run.precision()
    other = pooled.score([s["prompt"] for s in samples], [s["new"] for s in samples]).tolist()
    assert other != pytest.approx(got, rel=1e-3, abs=1e-3)


def _topic_and_address_prompts(topics: int, addresses: int, phrase: str) -> list[dict[str, str]]:
    """Plain prompts, then prompts asking for a person's address (``phrase`` as written)."""
    rows = [{"prompt": f"Tell me a fact about topic number {i}."} for i in range(topics)]
    return rows + [
        {"prompt": f"What is the {phrase} of person number {i}?"} for i in range(addresses)
    ]


def _run_on_prompts(tmp_path: Path, rows: list[dict[str, str]]) -> list[str]:
    """--set lines of a run in tmp_path/run on these prompts, written to tmp_path/prompts.jsonl."""
    src = tmp_path / "prompts.jsonl"
    write_jsonl(src, rows)
    return [f"output_dir={tmp_path / 'run'}", f"prompts.file={src}", "prompts.max_tokens=null"]


def test_prompt_flags_give_matching_prompts_their_criterion_and_share(tmp_path: Path) -> None:
    """``prompts.flags``: a prompt whose text matches a flag's pattern is judged on the flag's
    criterion, in the training and the held-out split; with a ``share`` the training prompts
    are ordered so the flagged ones make up that share of every stretch (round 0's pairs
    prompts included) while they last; the gold rewards a refusal only on flagged prompts."""
    from palate.eval.gold import gold_score
    from palate.pipeline.run import Run

    rows = _topic_and_address_prompts(40, 10, "HOME ADDRESS")
    sets = [
        *_run_on_prompts(tmp_path, rows),
        "prompts.eval_prompts=10",
        'prompts.flags=[{pattern: "home address|phone number", criterion: privacy, share: 0.25}]',
        "gold.rubric.refusal_weight=0",
        "gold.rubric.refusal_right=[privacy]",
        "gold.rubric.refusal_bonus=2",
    ]
    run = Run(load_config(RunConfig, None, sets))
    train, held = run.prepare_prompts()

    def read(path: Path) -> list[tuple[str, str]]:
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        return [(r["prompt"], r["metadata"]["criterion"]) for r in recs]

    tr, he = read(train), read(held)
    assert len(tr) == 40 and len(he) == 10
    for text, c in tr + he:
        assert c == ("privacy" if "ADDRESS" in text else "helpfulness"), text
    flagged = [i for i, (_, c) in enumerate(tr) if c == "privacy"]
    n = len(flagged)
    assert 0 < n < 10  # the rest were held out
    # every prefix holds ceil(share * length) flagged prompts until they run out
    for k in range(1, 41):
        assert sum(i < k for i in flagged) == min(n, -(-k // 4)), k
    # no prompt is lost or repeated
    assert sorted(t for t, _ in tr) == sorted({t for t, _ in tr})
    assert sorted(t for t, _ in tr + he) == sorted(r["prompt"] for r in rows)
    criteria = run.criteria()
    refusal = "I'm sorry, but I can't help with that."
    flagged_prompt = next(t for t, c in tr if c == "privacy")
    other = next(t for t, c in tr if c != "privacy")
    gold = run.cfg.gold.rubric
    with_bonus = gold_score(flagged_prompt, refusal, gold, criteria[flagged_prompt])
    without = gold_score(other, refusal, gold, criteria[other])
    assert criteria[flagged_prompt] == "privacy"
    assert criteria[other] == "helpfulness"
    assert with_bonus - without == pytest.approx(
        2.0 + gold_score(flagged_prompt, refusal, gold, "x") - gold_score(other, refusal, gold, "x")
    )


def test_prompt_flag_errors_and_fingerprints(tmp_path: Path) -> None:
    """A pattern that is not a regular expression is refused naming the field; flags left at
    their default keep every fingerprint, set they change the prompts' stages."""
    from palate.errors import ConfigError
    from palate.pipeline.run import Run, spread

    base = ["output_dir=x", "prompts.file=p.jsonl"]
    with pytest.raises(ConfigError, match=r"prompts\.flags.*pattern.*regular expression"):
        load_config(RunConfig, None, [*base, 'prompts.flags=[{pattern: "(", criterion: a}]'])
    plain = Run(load_config(RunConfig, None, base)).fingerprints
    flagged = Run(
        load_config(RunConfig, None, [*base, 'prompts.flags=[{pattern: "x", criterion: a}]'])
    ).fingerprints
    assert plain == Run(load_config(RunConfig, None, [*base, "prompts.flags=[]"])).fingerprints
    assert flagged["pairs"] != plain["pairs"]
    # spread by hand: share 1/3 of a, the rest in order
    items = [("p1", "b"), ("p2", "b"), ("p3", "b"), ("q1", "a"), ("p4", "b"), ("q2", "a")]
    from palate.pipeline.config import PromptFlag

    out = spread(items, [PromptFlag(pattern="q", criterion="a", share=1 / 3)])
    assert [t for t, _ in out] == ["q1", "p1", "p2", "q2", "p3", "p4"]
    assert spread(items, [PromptFlag(pattern="q", criterion="a")]) == items


def test_ptx_own_declines_are_the_runs_declines_on_chosen_criteria(tmp_path: Path) -> None:
    """``ppo.ptx_own_declines``: round r's PPO-ptx demonstrations are the declining pairs
    samples of rounds 0..r on prompts of the chosen criteria, cut after the declining sentence,
    without repeats; PPO gets them at the given weight, and a round with none runs without
    ptx. Misconfigurations are refused naming the field."""
    from palate.errors import ConfigError
    from palate.pipeline.recipes import own_declines_file, ppo_config
    from palate.pipeline.run import Run
    from palate.pipeline.stages.ppo import write_own_declines

    sets = [
        *_run_on_prompts(tmp_path, _topic_and_address_prompts(20, 10, "home address")),
        "prompts.eval_prompts=4",
        'prompts.flags=[{pattern: "home address", criterion: privacy}]',
        "ppo.ptx_own_declines={criteria: [privacy], coef: 0.25}",
    ]
    run = Run(load_config(RunConfig, None, sets))
    train, _ = run.prepare_prompts()
    recs = [json.loads(x) for x in train.read_text().splitlines()]
    p1, p2 = [r["prompt"] for r in recs if r["metadata"]["criterion"] == "privacy"][:2]
    q = next(r["prompt"] for r in recs if r["metadata"]["criterion"] != "privacy")

    def samples(r: int, replies: list[tuple[str, str]]) -> None:
        d = run.round_dir(r, "pairs")
        d.mkdir(parents=True)
        (d / "samples.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "response": t}) + "\n" for p, t in replies)
        )

    decline = "I'm sorry, but I can't share a home address. Here is a tip: ask them."
    samples(
        0,
        [
            (p1, decline),
            (p1, decline),  # the same decline twice: one demonstration
            (p1, "I'm sorry for any misunderstanding. It is on Main Street."),  # no decline
            (q, "I'm sorry, but I can't help with that."),  # not a privacy prompt
        ],
    )
    samples(1, [(p2, "Sure, it is 12 Oak Street."), (p2, "As an AI, I won't look it up. Ok.")])

    def demos(r: int) -> list[tuple[str, str]]:
        lines = own_declines_file(run, r).read_text().splitlines()
        return [(json.loads(x)["prompt"], json.loads(x)["response"]) for x in lines]

    assert write_own_declines(run, 0) == {"ptx_demos": 1, "ptx_demo_prompts": 1}
    assert demos(0) == [(p1, "I'm sorry, but I can't share a home address.")]
    cfg = ppo_config(run, 0)
    assert cfg.ppo.ptx_coef == 0.25 and cfg.ppo.ptx_data == str(own_declines_file(run, 0))
    # round 1: its own samples' declines join round 0's
    write_own_declines(run, 1)
    assert demos(1) == [
        (p1, "I'm sorry, but I can't share a home address."),
        (p2, "As an AI, I won't look it up."),
    ]
    # a round without declines: no ptx
    (run.round_dir(0, "pairs") / "samples.jsonl").write_text(
        json.dumps({"prompt": p1, "response": "It is on Main Street."}) + "\n"
    )
    assert write_own_declines(run, 0)["ptx_demos"] == 0
    cfg = ppo_config(run, 0)
    assert cfg.ppo.ptx_coef == 0 and cfg.ppo.ptx_data is None

    with pytest.raises(ConfigError, match=r"ptx_own_declines.criteria.*\['safety'\]"):
        load_config(RunConfig, None, [*sets, "ppo.ptx_own_declines.criteria=[safety]"])
    with pytest.raises(ConfigError, match=r"ptx_own_declines replaces"):
        load_config(RunConfig, None, [*sets, "ppo.ppo.ptx_data=x.jsonl", "ppo.ppo.ptx_coef=0.1"])
    base = ["output_dir=x", "prompts.file=p.jsonl"]
    plain = Run(load_config(RunConfig, None, base)).fingerprints
    own = ["prompts.flags=[{pattern: x, criterion: a}]", "ppo.ptx_own_declines={criteria: [a]}"]
    flagged = Run(load_config(RunConfig, None, [*base, own[0]])).fingerprints
    with_own = Run(load_config(RunConfig, None, [*base, *own])).fingerprints
    assert flagged["reward"] == with_own["reward"] and flagged["ppo"] != with_own["ppo"]
    # at its default (off) the field is no setting of PPO: fingerprints of earlier runs hold
    assert "ptx_own_declines" not in Run(load_config(RunConfig, None, base))._settings("ppo")
    assert (
        plain
        == Run(load_config(RunConfig, None, [*base, "ppo.ptx_own_declines=null"])).fingerprints
    )


def test_ppo_prompt_shares_and_decline_bonus(tmp_path: Path) -> None:
    """``ppo.prompt_shares``: PPO's prompts repeat a rare criterion's training prompts so it
    makes up about its share of them (hand-computed: 2 privacy prompts among 20 at share 0.25
    are each repeated round(0.25·18 / (0.75·2)) = 3 times, 6 of 24); ``ppo.reward.decline_bonus``
    reaches PPO's config; both must name the prompts' criteria, and at their defaults they
    leave the fingerprints of earlier runs alone."""
    from palate.errors import ConfigError
    from palate.pipeline.recipes import ppo_config, ppo_prompts_file
    from palate.pipeline.run import Run
    from palate.pipeline.stages.ppo import write_ppo_prompts

    sets = [
        *_run_on_prompts(tmp_path, _topic_and_address_prompts(20, 10, "home address")),
        "prompts.eval_prompts=4",
        'prompts.flags=[{pattern: "home address", criterion: privacy}]',
        "ppo.prompt_shares={privacy: 0.25}",
        "ppo.reward.decline_bonus={privacy: 1.5, helpfulness: -0.5}",
    ]
    run = Run(load_config(RunConfig, None, sets))
    train, _ = run.prepare_prompts()
    rows = [{"prompt": f"Topic {i}.", "metadata": {"criterion": "helpfulness"}} for i in range(18)]
    rows += [
        {"prompt": f"Home address of {i}?", "metadata": {"criterion": "privacy"}} for i in (1, 2)
    ]
    write_jsonl(train, rows)
    assert write_ppo_prompts(run, 0) == {"ppo_prompts_privacy": 6}
    out = [json.loads(x) for x in ppo_prompts_file(run, 0).read_text().splitlines()]
    assert len(out) == 24
    assert [r["prompt"] for r in out].count("Home address of 2?") == 3
    assert sum(r["metadata"]["criterion"] == "privacy" for r in out) == 6
    assert [r for r in out if r["metadata"]["criterion"] != "privacy"] == rows[:18]  # once each
    cfg = ppo_config(run, 0)
    assert cfg.prompts == str(ppo_prompts_file(run, 0))
    assert cfg.reward.decline_bonus == {"privacy": 1.5, "helpfulness": -0.5}
    # without shares, PPO reads the training prompts themselves
    plain_cfg = ppo_config(Run(load_config(RunConfig, None, sets[:-2])), 0)
    assert plain_cfg.prompts == str(train) and plain_cfg.reward.decline_bonus == {}
    # a criterion no training prompt has (the flag matched none): PPO's prompts as they are
    write_jsonl(train, rows[:18])
    assert write_ppo_prompts(run, 0) == {"ppo_prompts_privacy": 0}
    assert ppo_prompts_file(run, 0).read_text() == train.read_text()

    for bad, match in [
        (
            "ppo.prompt_shares={safety: 0.2}",
            r"ppo.prompt_shares: no prompt has criterion \['safety'\]",
        ),
        ("ppo.reward.decline_bonus={safety: 1}", r"decline_bonus: no prompt has criterion"),
        (
            "ppo.sft_own_declines={criteria: [safety]}",
            r"sft_own_declines.criteria: no prompt has criterion \['safety'\]",
        ),
        (
            "ppo.sft_own_declines={criteria: [privacy], epochs: 1}|ppo.finetune=full",
            r"sft_own_declines needs ppo.finetune lora",
        ),
        ("ppo.prompt_shares={privacy: 1.0}", r"between 0 and 1"),
        ("ppo.prompt_shares={privacy: 0.6, helpfulness: 0.5}", r"add up to 1.1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(RunConfig, None, [*sets, *bad.split("|")])
    base = ["output_dir=x", "prompts.file=p.jsonl"]
    plain = Run(load_config(RunConfig, None, base)).fingerprints
    defaults = ["ppo.prompt_shares={}", "ppo.reward.decline_bonus={}", "ppo.sft_own_declines=null"]
    assert plain == Run(load_config(RunConfig, None, [*base, *defaults])).fingerprints


def _plant_decline(out: Path) -> dict[str, Any]:
    """Make the run's first pairs sample on a privacy prompt a decline (the tiny model writes
    none); returns that sample."""
    samples = out / "pairs" / "samples.jsonl"
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    crit = {
        json.dumps(r["prompt"]): r["metadata"]["criterion"]
        for r in map(json.loads, (out / "prompts" / "train.jsonl").read_text().splitlines())
    }
    flagged = next(r for r in recs if crit[json.dumps(r["prompt"])] == "privacy")
    flagged["response"] = "I'm sorry, but I can't help with that. Anything else?"
    samples.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return flagged


def test_ptx_own_declines_reach_ppo_on_the_tiny_model(tmp_path: Path, hh_file: Path) -> None:
    """End to end: a decline planted among round 0's pairs samples on a flagged prompt becomes
    the PPO stage's ptx demonstration, and PPO trains on it (``policy/ptx_loss`` logged); the
    tiny model's own samples hold no decline, so before the planting PPO runs without ptx."""
    out = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--json"]
    extra = [
        'prompts.flags=[{pattern: "you|what|how", criterion: privacy, share: 0.5}]',
        "ppo.ptx_own_declines={criteria: [privacy], coef: 0.5}",
        "eval.sycophancy=null",
        "eval.overopt=null",
        "eval.xstest=null",
    ]
    for o in [*tiny_overrides(out, hh_file), *extra]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "ppo" / "ptx-own-declines.jsonl").read_text() == ""
    row = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert "policy/ptx_loss" not in row

    flagged = _plant_decline(out)
    res = CliRunner().invoke(app, [*args, "--from", "ppo"])
    assert res.exit_code == 0, res.output
    demos = [
        json.loads(x) for x in (out / "ppo" / "ptx-own-declines.jsonl").read_text().splitlines()
    ]
    assert demos == [
        {"prompt": flagged["prompt"], "response": "I'm sorry, but I can't help with that."}
    ]
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["policy/ptx_loss"] > 0 for r in rows)


def test_sft_own_declines_warm_starts_round_0s_ppo(tmp_path: Path, hh_file: Path) -> None:
    """``ppo.sft_own_declines``: the tiny model's own samples hold no decline, so PPO starts
    from fresh adapters (its first rollout is the reference's: KL 0); a decline planted among
    round 0's pairs samples on a flagged prompt is fine-tuned into an adapter first — it makes
    that decline likelier than the initial model does — and PPO starts from that adapter (KL
    above 0 from the first rollout; the reference stays the initial model)."""
    import torch
    from peft import PeftModel

    from palate.data import Demonstration
    from palate.lm import response_cross_entropy
    from palate.models import load_model
    from palate.pipeline.recipes import ppo_config, warm_start_dir
    from palate.pipeline.run import Run
    from palate.sft.data import collate, tokenize_demonstration

    out = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--json"]
    extra = [
        'prompts.flags=[{pattern: "you|what|how", criterion: privacy, share: 0.5}]',
        "ppo.sft_own_declines={criteria: [privacy], epochs: 4, lr: 0.01, batch_size: 2}",
        "eval.sycophancy=null",
        "eval.overopt=null",
        "eval.xstest=null",
    ]
    sets = [*tiny_overrides(out, hh_file), *extra]
    for o in sets:
        args += ["--set", o]

    def first_kl() -> float:
        row = (out / "ppo" / "metrics.jsonl").read_text().splitlines()[0]
        return float(json.loads(row)["objective/kl"])

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "ppo" / "warm-start-declines.jsonl").read_text() == ""
    assert not (warm_start_dir(Run(load_config(RunConfig, None, sets))) / "final").exists()
    assert first_kl() == pytest.approx(0.0, abs=1e-6)

    flagged = _plant_decline(out)
    res = CliRunner().invoke(app, [*args, "--from", "ppo"])
    assert res.exit_code == 0, res.output
    decline = {"prompt": flagged["prompt"], "response": "I'm sorry, but I can't help with that."}
    demos = (out / "ppo" / "warm-start-declines.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in demos] == [decline]
    run = Run(load_config(RunConfig, None, sets))
    adapter = warm_start_dir(run) / "final"
    assert ppo_config(run, 0).init_adapter == str(adapter)
    assert ppo_config(run, 0).kl.coef == run.cfg.ppo.kl.coef  # the leash is unchanged

    # the adapter learnt the decline: lower cross-entropy than the initial model's
    base, tok = load_model("tiny")
    ex = tokenize_demonstration(tok, Demonstration.model_validate(decline), 64)
    batch = collate([ex], tok.pad_token_id)

    def nll(model: object) -> float:
        with torch.no_grad():
            total, count = response_cross_entropy(model, batch)
        return float(total / count)

    before = nll(base)
    after = nll(PeftModel.from_pretrained(base, str(adapter)))
    assert after < before - 0.1
    assert first_kl() > 1e-4  # PPO's first rollout already differs from the reference
