"""PPO monitors: each alarm fires on a synthetic trace built to trip it and stays silent on a
healthy one."""

from __future__ import annotations

import random

import pytest

from palate.ppo.monitors import Monitor, MonitorSettings
from palate.text import distinct_n, repeated_trigrams

WORDS = [
    "river",
    "apple",
    "stone",
    "cloud",
    "lamp",
    "paper",
    "garden",
    "music",
    "window",
    "orange",
    "table",
    "yellow",
]


def varied(rng: random.Random, n: int, length: int = 12) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(length))
        for _ in range(n)
    ]


def run(monitor: Monitor, trace: list[tuple[list[str], dict]]) -> list[str]:
    names = []
    for update, (responses, row) in enumerate(trace, 1):
        names += [a.name for a in monitor.observe(update, ["p"] * len(responses), responses, row)]
        assert set(row) >= {"alarm/reward_hacking", "monitor/distinct_2"}
    return names


def healthy(updates: int = 12) -> list[tuple[list[str], dict]]:
    rng = random.Random(0)
    return [
        (
            varied(rng, 8),
            {
                "response/length": 30.0 + rng.random(),
                "objective/kl": 2.0 + 0.3 * u,
                "objective/score": 0.1 * u,
            },
        )
        for u in range(updates)
    ]


def test_helpers_hand_computed() -> None:
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # ab, bc, ab, bd
    assert repeated_trigrams("x y z x y z") == pytest.approx(1 / 4)  # xyz yzx zxy xyz
    assert distinct_n([], 2) == 1.0 and repeated_trigrams("hi") == 0.0


def test_a_healthy_run_raises_nothing() -> None:
    golds = iter([1.0 + 0.05 * u for u in range(12)])  # gold rises with the proxy
    m = Monitor(MonitorSettings(kl_budget=20), gold=lambda ps, rs: [next(golds)] * len(rs))
    assert run(m, healthy()) == []
    assert m.fired == [] and m.history[-1]["gold"] == pytest.approx(1.55)


def test_reward_hacking_fires_when_gold_falls_while_proxy_rises() -> None:
    trace = healthy(12)
    golds = iter([1.0, 1.1, 1.2, 1.3, 1.3, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    m = Monitor(MonitorSettings(), gold=lambda ps, rs: [next(golds)] * len(rs))
    names = run(m, trace)
    assert "reward_hacking" in names and [a.name for a in m.fired] == ["reward_hacking"]
    # the leash-off quickstart's false alarm: gold noise while the proxy barely moved
    golds3 = iter([1.0, 1.1, 1.2, 1.3, 1.3, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    flat = [(r, {**row, "objective/score": 0.01 * u}) for u, (r, row) in enumerate(healthy(12))]
    m3 = Monitor(MonitorSettings(), gold=lambda ps, rs: [next(golds3)] * len(rs))
    assert "reward_hacking" not in run(m3, flat)
    # the same gold decline with the proxy falling too is not hacking
    golds2 = iter([1.0, 1.1, 1.2, 1.3, 1.3, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    falling = [(r, {**row, "objective/score": -0.1 * u}) for u, (r, row) in enumerate(healthy(12))]
    m2 = Monitor(MonitorSettings(), gold=lambda ps, rs: [next(golds2)] * len(rs))
    assert "reward_hacking" not in run(m2, falling)


def test_length_inflation_kl_budget_collapse_same_answer_repetition() -> None:
    trace = healthy(12)
    longer = [
        (r, {**row, "response/length": 30.0 * (1 + 0.15 * u)}) for u, (r, row) in enumerate(trace)
    ]
    assert "length_inflation" in run(Monitor(MonitorSettings()), longer)
    assert "kl_budget" in run(Monitor(MonitorSettings(kl_budget=4.0)), healthy())
    rng = random.Random(1)
    collapsing = [
        (varied(rng, 8) if u < 6 else ["the same reply here"] * 8, row)
        for u, (_, row) in enumerate(trace)
    ]
    names = run(Monitor(MonitorSettings()), collapsing)
    assert {"diversity_collapse", "same_answer"} <= set(names)
    loops = [(["go go go go go go go go go"] + r[1:], row) for r, row in trace]
    assert "repetition" not in run(Monitor(MonitorSettings()), loops)  # one of 8: mean 0.1
    looping = [(["go go go go go go go go go"] * 4 + r[4:], row) for r, row in trace]
    assert "repetition" in run(Monitor(MonitorSettings()), looping)


def _ppo_with_alarms(tmp_path, name: str, *extra: str, gold_fn=None) -> dict:
    """A 3-update PPO run on the tiny model whose same_answer alarm fires on every update (any
    batch has a most common answer) and, with action stop, ends training."""
    import json

    from palate.config import load_config
    from palate.ppo import PPOConfig, ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in "abcdefgh"))
    cfg = load_config(
        PPOConfig,
        None,
        [
            "model=tiny",
            f"prompts={prompts}",
            f"output_dir={tmp_path / name}",
            "reward.function=tests.ppo.test_trainer:bright",
            "sampling.max_new_tokens=6",
            "ppo.updates=3",
            "ppo.batch_size=4",
            "ppo.mini_batch_size=2",
            "precision=fp32",
            "monitors.action=stop",
            "monitors.same_answer=0.01",
            *extra,
        ],
    )
    return ppo(cfg, gold_fn=gold_fn)


def test_ppo_stops_at_the_first_alarm_and_keeps_that_policy(tmp_path) -> None:
    import json

    summary = _ppo_with_alarms(tmp_path, "run", gold_fn=lambda ps, rs: [0.0] * len(rs))
    assert summary["halted_by"] == ["same_answer"] and summary["updates"] == 1
    assert (tmp_path / "run" / "final" / "config.json").is_file()  # that policy is the final one
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["alarm/same_answer"] == 1.0 and rows[0]["monitor/gold"] == 0.0
    alarms = [json.loads(x) for x in (tmp_path / "run" / "alarms.jsonl").read_text().splitlines()]
    assert [a["name"] for a in alarms] == ["same_answer"] and alarms[0]["update"] == 1
    assert alarms[0]["stopped"] is True


def test_stop_on_names_the_alarms_that_end_training(tmp_path) -> None:
    import json

    warned = _ppo_with_alarms(
        tmp_path, "warned", "monitors.stop_on=[kl_budget]"
    )  # same_answer only warns
    assert warned["updates"] == 3 and "halted_by" not in warned
    assert warned["alarms"] == ["same_answer"]
    record = json.loads((tmp_path / "warned" / "alarms.jsonl").read_text())
    assert record["name"] == "same_answer" and record["stopped"] is False
    halted = _ppo_with_alarms(tmp_path, "halted", "monitors.stop_on=[kl_budget, same_answer]")
    assert halted["halted_by"] == ["same_answer"] and halted["updates"] == 1


def test_halts_keeps_only_the_stopping_alarms() -> None:
    from palate.ppo.monitors import Alarm

    both = [Alarm("same_answer", 7, ""), Alarm("kl_budget", 7, "")]
    stop_kl = MonitorSettings(action="stop", stop_on=["kl_budget"])
    assert [a.name for a in Monitor(stop_kl).halts(both)] == ["kl_budget"]
    assert Monitor(stop_kl).halts(both[:1]) == []
    assert Monitor(MonitorSettings(action="stop")).halts(both) == both  # null: every alarm
    warn = MonitorSettings(action="warn", stop_on=["kl_budget"])
    assert Monitor(warn).halts(both) == []


def test_stop_on_rejects_an_unknown_alarm() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kl_budgt"):
        MonitorSettings(stop_on=["kl_budgt"])
