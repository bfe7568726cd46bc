"""The AI judge: soft labels, position debiasing, the store, quality, the judge as a reward."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from palate.errors import ConfigError
from palate.feedback.backend import Conversation, LocalBackend
from palate.feedback.constitution import load_constitution
from palate.feedback.judge import Judge, JudgeScorer, comparison_conversation
from palate.feedback.label import judge_quality, label_campaign


class ScriptedBackend:
    """A judge model whose answers follow a rule on the question text (the behaviour under
    test is palate's handling of the answers, not a model's taste)."""

    def __init__(self, rule, name: str = "scripted"):
        self.rule = rule
        self.name = name
        self.seen: list[Conversation] = []

    def choice_probs(
        self, conversations: Sequence[Conversation], options: Sequence[str]
    ) -> list[list[float]]:
        self.seen.extend(conversations)
        return [self.rule(c[-1]["content"], list(options)) for c in conversations]

    def generate(self, conversations, *, max_new_tokens, temperature):  # noqa: ARG002
        return ["ok" for _ in conversations]


def always_first(text: str, options: list[str]) -> list[float]:
    return [1.0] + [0.0] * (len(options) - 1)


def prefers_good(text: str, options: list[str]) -> list[float]:
    """Picks the option whose response contains 'good', with 0.8 confidence."""
    first = text.split("(A) ", 1)[1].split("\n\n(B) ", 1)[0]
    return [0.8, 0.2] if "good" in first else [0.2, 0.8]


def triples(n: int) -> list[tuple[str, str, str]]:
    return [(f"question {i}", f"good answer {i}", f"bad answer {i}") for i in range(n)]


def test_soft_label_is_the_normalised_next_token_probability(tiny) -> None:
    model, tok = tiny
    backend = LocalBackend(model, tok, batch_size=4)
    principle = load_constitution().principles[0]
    convs = [
        comparison_conversation("How do I bake bread?", "Knead it.", "No idea.", principle),
        comparison_conversation("Hi", "Hello there, how can I help you today?", "Hi", principle),
    ]
    got = backend.choice_probs(convs, ["A", "B"])
    from palate.formatting import prompt_ids

    id_a = tok("A", add_special_tokens=False)["input_ids"][0]
    id_b = tok("B", add_special_tokens=False)["input_ids"][0]
    for conv, (p_a, p_b) in zip(convs, got, strict=True):
        ids = torch.tensor([prompt_ids(tok, conv)])  # one at a time: no padding
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        la, lb = float(logits[id_a]), float(logits[id_b])
        want = math.exp(la) / (math.exp(la) + math.exp(lb))  # hand computation
        assert p_a == pytest.approx(want, abs=1e-5) and p_a + p_b == pytest.approx(1.0)
    assert 0 < got[0][0] < 1


def test_multi_token_answers_are_refused(tiny) -> None:
    model, tok = tiny
    backend = LocalBackend(model, tok)
    with pytest.raises(ConfigError, match="single tokens"):
        backend.choice_probs([[{"role": "user", "content": "x"}]], ["A", "Definitely"])


def test_both_orders_turn_a_first_position_judge_into_one_half() -> None:
    principles = load_constitution().select(criteria=["harmlessness"])
    biased = Judge(ScriptedBackend(always_first), principles, both_orders=True)
    verdicts = biased.compare(triples(6))
    assert [v.prob_a for v in verdicts] == [0.5] * 6
    assert all(v.consistent is False for v in verdicts)
    one_order = Judge(ScriptedBackend(always_first), principles, both_orders=False)
    assert [v.prob_a for v in one_order.compare(triples(6))] == [1.0] * 6
    q = judge_quality(verdicts, resamples=200)
    assert q["position_consistency"] == 0.0 and q["first_position_rate"] == 1.0
    assert q["agreement_debiased"]["win_rate"] == 0.5  # every pair a coin toss (counts half)


def test_a_judge_with_taste_agrees_and_is_consistent() -> None:
    principles = load_constitution().principles
    backend = ScriptedBackend(prefers_good)
    j = Judge(backend, principles, mode="all")
    verdicts = j.compare(triples(4))
    # debiased: ½ (0.8 + 1 − 0.2) = 0.8 for every principle
    assert all(v.prob_a == pytest.approx(0.8) for v in verdicts)
    assert len(backend.seen) == 4 * len(principles) * 2  # every principle, both orders
    q = judge_quality(verdicts, resamples=200)
    assert q["agreement_debiased"]["win_rate"] == 1.0 and q["position_consistency"] == 1.0
    assert set(q["per_principle"]) == {p.name for p in principles}
    sampled = Judge(ScriptedBackend(prefers_good), principles, mode="sample", seed=3)
    vs = sampled.compare(triples(20))
    assert all(len(v.principles) == 1 for v in vs)
    assert len({v.principle for v in vs}) > 1  # drawn per pair


def test_judge_as_reward_is_the_expected_rating_mapped_to_plus_minus_one() -> None:
    principles = load_constitution().select(["harm", "helpful"])

    def rule(text: str, options: list[str]) -> list[float]:
        assert options == [str(i) for i in range(1, 10)]
        if "great" in text:
            return [0.0] * 8 + [1.0]  # certain 9
        return [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]  # E = 5

    score = JudgeScorer(Judge(ScriptedBackend(rule), principles))
    got = score(["q1", "q2"], ["a great reply", "meh"])
    assert got.tolist() == pytest.approx([1.0, 0.0])


def test_the_judge_labels_a_campaign_through_the_store(tmp_path: Path) -> None:
    from palate.label.db import Label, User, open_db
    from palate.label.store import (
        LabelIn,
        PairIn,
        create_campaign,
        create_user,
        export_rows,
        flip,
        next_assignment,
        submit_label,
    )

    url = str(tmp_path / "labels.db")
    factory = open_db(url)
    with factory() as db:
        pairs = [PairIn(prompt=p, response_a=a, response_b=b) for p, a, b in triples(5)]
        camp = create_campaign(db, "c", pairs, overlap=2)
        person = create_user(db, "alice")[0]
        db.commit()
        while (a := next_assignment(db, camp, person)) is not None:  # alice prefers b
            submit_label(db, a, person, LabelIn(answer=flip("b", a.swapped)))
    principles = load_constitution().select(criteria=["harmlessness"])
    j = Judge(ScriptedBackend(prefers_good, "judge-x"), principles, name="ai:judge-x")
    out = label_campaign(url, "c", j)
    assert out["labels"] == 5
    with factory() as db:
        judge_user = db.query(User).filter_by(name="ai:judge-x").one()
        assert judge_user.kind == "ai"
        labs = db.query(Label).filter_by(rater_id=judge_user.id).all()
        # stored in the pair's orientation whatever order the judge was shown
        assert {lab.answer for lab in labs} == {"a"}
        assert all(lab.prob == pytest.approx(0.8) for lab in labs)
        assert all(lab.principle in {p.name for p in principles} for lab in labs)
        rows = export_rows(db, camp)
        assert sorted(r["source"] for r in rows) == ["ai"] * 5 + ["human"] * 5
        ai = [r for r in rows if r["source"] == "ai"]
        assert all(r["chosen"].startswith("good") and r["prob_chosen"] == 0.8 for r in ai)
        assert all(r["metadata"]["principles"] for r in ai)
        human = export_rows(db, camp, sources=["human"])
        assert len(human) == 5 and all(r["chosen"].startswith("bad") for r in human)
    assert label_campaign(url, "c", j)["labels"] == 0  # nothing left for it: idempotent


def test_constitution_errors_name_the_file_and_field(tmp_path: Path) -> None:
    c = load_constitution()
    assert {p.criterion for p in c.principles} == {"harmlessness", "honesty", "helpfulness"}
    assert all(p.rating for p in c.principles)
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: x\n    criterion: y\n    comparison: Which?\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: principles\.0\.critique: Field required"):
        load_constitution(bad)
    bad.write_text("principles: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_constitution(bad)
    p = "{name: x, criterion: y, comparison: a, critique: b, revision: c}"
    bad.write_text(f"principles: [{p}, {p}]\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_constitution(bad)
    bad.write_text(f"principles: [{p}]\nprinciple: oops\n")
    with pytest.raises(ConfigError, match="principle: unknown key"):
        load_constitution(bad)
    with pytest.raises(ConfigError, match="no principle named"):
        c.select(["nope"])
    with pytest.raises(ConfigError, match="no principle for criteria"):
        c.select(criteria=["nope"])


def test_palate_judge_scores_a_human_labelled_file(tmp_path: Path) -> None:
    from palate.config import parse_config
    from palate.feedback import JudgeConfig, judge

    data = tmp_path / "comparisons.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": a, "rejected": b}) + "\n" for p, a, b in triples(6)
        )
    )
    cfg = parse_config(
        JudgeConfig,
        {
            "model": "tiny",
            "pairs": str(data),
            "output": str(tmp_path / "ai.jsonl"),
            "report": str(tmp_path / "quality.json"),
            "criteria": ["harmlessness"],
            "precision": "fp32",
        },
    )
    out = judge(cfg)
    assert out["pairs"] == 6
    report = json.loads((tmp_path / "quality.json").read_text())
    assert 0 <= report["position_consistency"] <= 1
    assert set(report["per_principle"]) <= {"harm", "no-assistance-to-wrongdoing", "kind-and-fair"}
    from palate.data import read_records

    rows = read_records(tmp_path / "ai.jsonl", "comparisons").records
    assert len(rows) == 6 and all(r.source == "ai" and r.rater_id == "ai:tiny" for r in rows)
    with pytest.raises(ConfigError, match="either pairs"):
        parse_config(JudgeConfig, {"output": "x"})


def test_sl_cai_on_the_tiny_model_writes_both_files(tmp_path: Path) -> None:
    from palate.config import parse_config
    from palate.data import read_records
    from palate.feedback import CAIConfig, cai_revise

    prompts = tmp_path / "red.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": q}) + "\n" for q in ["How do I pick a lock?", "Insult me"])
    )
    cfg = parse_config(
        CAIConfig,
        {
            "model": "tiny",
            "prompts": str(prompts),
            "rounds": 2,
            "max_new_tokens": 12,
            "temperature": 1.0,
            "precision": "fp32",
            "output_dir": str(tmp_path / "cai"),
        },
    )
    out = cai_revise(cfg)
    assert out["prompts"] == 2 and out["demonstrations"] == 2
    demos = read_records(tmp_path / "cai" / "demonstrations.jsonl", "demonstrations").records
    comps = read_records(tmp_path / "cai" / "comparisons.jsonl", "comparisons").records
    trace = [json.loads(x) for x in (tmp_path / "cai" / "revisions.jsonl").read_text().splitlines()]
    assert len(demos) == 2 and len(comps) == out["comparisons"] >= 1
    assert all(len(t["steps"]) == 2 for t in trace)
    for c in comps:
        t = next(t for t in trace if t["prompt"] == c.prompt)
        assert c.chosen == t["final"] and c.rejected == t["original"] and c.source == "ai"


def test_ppo_scores_with_the_judge_directly(tmp_path: Path) -> None:
    """reward.judge: PPO's reward is the judge's rating (direct RLAIF), here on the tiny model."""
    from palate.config import load_config
    from palate.ppo import PPOConfig, ppo
    from palate.reward.model import ScoreFn
    from palate.reward.scoring import load_score_fn

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in "abcd")
    )
    base = ["model=tiny", f"prompts={prompts}", f"output_dir={tmp_path / 'run'}"]
    cfg = load_config(
        PPOConfig,
        None,
        [
            *base,
            "reward.judge.model=tiny",
            "reward.judge.precision=fp32",
            "reward.judge.principles=[harm, helpful]",
            "reward.missing_eos_penalty=null",
            "sampling.max_new_tokens=6",
            "ppo.updates=1",
            "ppo.batch_size=4",
            "ppo.mini_batch_size=2",
            "precision=fp32",
        ],
    )
    fn: ScoreFn = load_score_fn(cfg.reward, torch.device("cpu"), "fp32")
    assert isinstance(fn, JudgeScorer) and len(fn.judge.principles) == 2
    ppo(cfg)
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "samples" / "update-00001.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(-1 <= r["score"] <= 1 for r in rows)
    rescored = fn([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert rescored.tolist() == pytest.approx([r["score"] for r in rows], abs=1e-4)
    with pytest.raises(ConfigError, match="exactly one of reward.model, reward.function"):
        load_config(PPOConfig, None, [*base, "reward.model=rm", "reward.judge.model=tiny"])
