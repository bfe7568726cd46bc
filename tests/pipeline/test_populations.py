"""Rater populations in ``palate run`` (#19): two simulated groups with opposite gold tastes
label the same pairs; the labels stage, the report and the evaluation show the split, and
each group's own reward model agrees with its group's gold better than the pooled one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palate.config import load_config
from palate.pipeline import RunConfig, run_pipeline
from tests.pipeline.test_pipeline import QUICKSTART, tiny_overrides

# opposite tastes in length and nothing else: the terse group wants 1 word, the wordy one 12
# (the tiny model's replies have 1-8), every other part of the rubric off
_ONLY_LENGTH = (
    "length_weight: 4.0, sentiment_weight: 0, relevance_weight: 0, echo_weight: 0, "
    "refusal_weight: 0, repetition_weight: 0, truncation_penalty: 0"
)
GROUPS = (
    "raters.groups=["
    f"{{name: terse, gold: {{rubric: {{length_target: 1, {_ONLY_LENGTH}}}}}}},"
    f"{{name: wordy, gold: {{rubric: {{length_target: 12, {_ONLY_LENGTH}}}}}}}]"
)


@pytest.mark.timeout(900)
def test_two_populations_split_and_per_group_reward_models(tmp_path: Path, hh_file: Path) -> None:
    out = tmp_path / "run"
    sets = tiny_overrides(out, hh_file, samples_per_prompt=6) + [
        "pairs.prompts=16",  # 16 prompts x C(6,2) = 240 pairs, each labelled by both groups
        "prompts.eval_prompts=16",
        "reward.train.epochs=2",
        "reward.eval_fraction=0.25",
        GROUPS,
        "raters.per_group_reward=true",
        "raters.panel.raters=2",
        "raters.panel.temperature=0.2",
    ]
    cfg = load_config(RunConfig, QUICKSTART, sets)
    summary = run_pipeline(cfg)
    assert summary["status"] == "complete"

    # every pair labelled by both groups (2 raters each): one exported row per pair and group
    rows = [json.loads(x) for x in (out / "labels" / "comparisons.jsonl").read_text().splitlines()]
    by_group: dict[str, int] = {}
    for r in rows:
        by_group[r["metadata"]["group"]] = by_group.get(r["metadata"]["group"], 0) + 1
        assert {v["attributes"]["group"] for v in r["metadata"]["labels"]} == {
            r["metadata"]["group"]
        }
    assert by_group["terse"] == by_group["wordy"] > 200

    # the labels stage sees the split: high agreement within each group, low between
    quality = json.loads((out / "labels" / "quality.json").read_text())
    (camp,) = quality.values()
    pop = camp["populations"]["group"]
    assert set(pop["groups"]) == {"terse", "wordy"}
    assert pop["groups"]["terse"]["agreement_within"] > 0.7
    assert pop["groups"]["wordy"]["agreement_within"] > 0.7
    # reliability is fitted within each group: a taste is not mistaken for carelessness
    assert camp["flagged"] == []
    (between,) = pop["between"]
    assert between["agreement"] < 0.5 and between["shared_pairs"] > 200

    # a reward model per group and the run's pooled one, each scored against each group's gold
    # on the held-out labelled pairs (whether the tiny model learns the length tastes is left
    # to chance here: test_per_group_reward_models_learn_their_own_taste checks that property)
    reward = json.loads((out / "reward" / "summary.json").read_text())
    for table in (
        reward["gold_agreement"],
        *(v["gold_agreement"] for v in reward["groups"].values()),
    ):
        assert set(table) == {"terse", "wordy"} and all(0 <= x <= 1 for x in table.values())
    # the evaluation reports the trained policy's win rate under each group's gold
    ev = json.loads((out / "eval" / "summary.json").read_text())
    wins = ev["groups"]["win_rates"]
    assert set(wins) == {"terse", "wordy"}
    assert all(0 <= w["low"] <= w["win_rate"] <= w["high"] <= 1 for w in wins.values())
    assert set(ev["groups"]["reward_agreement"]) == {"run", "terse", "wordy"}
    report = (out / "report" / "report.html").read_text()
    assert 'id="group-win-rates"' in report and "Raters by group" in report
    assert 'id="group-held-out-agreement"' in report


def test_group_settings_are_checked() -> None:
    from palate.errors import ConfigError

    with pytest.raises(ConfigError, match="no groups named"):
        load_config(RunConfig, QUICKSTART, [GROUPS, "raters.train_groups=[nobody]"])
    with pytest.raises(ConfigError, match="names must differ"):
        load_config(RunConfig, QUICKSTART, ["raters.groups=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="needs raters.groups"):
        load_config(RunConfig, QUICKSTART, ["raters.per_group_reward=true"])
    with pytest.raises(ConfigError, match="simulated populations"):
        load_config(RunConfig, QUICKSTART, [GROUPS, "raters.kind=judge"])
    cfg = load_config(RunConfig, QUICKSTART, [GROUPS, "raters.train_groups=[wordy]"])
    assert cfg.raters.train_groups == ["wordy"]


def test_per_group_reward_models_learn_their_own_taste(tmp_path: Path) -> None:
    """Two simulated groups label the same 240 pairs through the store: every pair sets a reply
    with 'banana' against one with 'cherry'; one group's gold likes banana, the other's cherry.
    A reward model trained on one group's labels agrees with that group's gold on held-out
    pairs; one trained on both (pooled) cannot agree with either (its labels contradict)."""
    import random

    from sqlalchemy import select

    from palate.data import Comparison, write_jsonl
    from palate.eval.gold import GoldRubric, gold_scorer
    from palate.label.db import Campaign, User, open_db
    from palate.label.store import PairIn, create_campaign, export_rows
    from palate.raters.simulated import PanelConfig, label_with_panel
    from palate.reward import RewardConfig, load_reward_model, train_reward
    from tests.test_reward import WORDS

    rng = random.Random(0)
    off = dict(
        length_weight=0,
        sentiment_weight=0,
        relevance_weight=0,
        echo_weight=0,
        refusal_weight=0,
        repetition_weight=0,
        truncation_penalty=0,
        keyword_weight=2.0,
    )
    golds = {g: gold_scorer(GoldRubric(keywords=[g], **off)) for g in ("banana", "cherry")}

    def reply(word: str) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), word)
        return " ".join(words)

    pairs = []
    for i in range(240):
        a, b = reply("banana"), reply("cherry")
        pairs.append(
            PairIn(prompt=f"Say something {i}", response_a=a, response_b=b)
            if rng.random() < 0.5
            else PairIn(prompt=f"Say something {i}", response_a=b, response_b=a)
        )
    db = str(tmp_path / "groups.db")
    with open_db(db)() as s:
        create_campaign(s, "groups", pairs, overlap=4)
    for i, g in enumerate(golds):
        panel = PanelConfig(raters=2, temperature=0.3, seed=i, attributes={"group": g})
        label_with_panel(db, "groups", panel, golds[g], prefix=f"sim-{g}")
    data = {}
    with open_db(db)() as s:
        camp = s.scalar(select(Campaign))
        names = {u.name: (u.attributes or {}).get("group") for u in s.scalars(select(User))}
        for g in golds:
            others = [n for n, grp in names.items() if grp != g]
            data[g] = export_rows(s, camp, drop_raters=others)
    data["pooled"] = data["banana"] + data["cherry"]
    agreement = {}
    for name, rows in data.items():
        path = tmp_path / f"{name}.jsonl"
        write_jsonl(path, [Comparison.model_validate(r) for r in rows])
        cfg = RewardConfig.model_validate(
            dict(
                model="tiny",
                data=str(path),
                output_dir=str(tmp_path / name),
                max_length=48,
                eval_fraction=0.25,
                split_by="prompt",
                precision="fp32",
                optim={"lr": 3e-3},
                train={"epochs": 6, "batch_size": 16},
            )
        )
        summary = train_reward(cfg)
        rm = load_reward_model(summary["final"])
        held = [json.loads(x) for x in (tmp_path / name / "heldout.jsonl").read_text().splitlines()]
        prompts = [h["prompt"] for h in held]
        first, second = [h["chosen"] for h in held], [h["rejected"] for h in held]
        delta = (rm.score(prompts, first) - rm.score(prompts, second)).detach().numpy()
        agreement[name] = {}
        for g, score in golds.items():
            dg = [x - y for x, y in zip(score(prompts, first), score(prompts, second), strict=True)]
            agreement[name][g] = sum(
                (d > 0) == (e > 0) for d, e in zip(dg, delta, strict=True)
            ) / len(dg)
    print("\nheld-out agreement with each group's gold:", json.dumps(agreement))
    for g in ("banana", "cherry"):
        assert agreement[g][g] >= 0.9 and agreement[g][g] > agreement["pooled"][g]
    # the tastes are exact opposites: whatever the pooled model learnt, it averages ½
    assert sum(agreement["pooled"].values()) / 2 == pytest.approx(0.5)
