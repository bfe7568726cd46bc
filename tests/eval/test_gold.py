"""Simulated raters: the gold rubric resists degenerate output; the panel labels via the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from palate.eval.gold import GoldRubric, gold_score

PROMPT = [{"role": "user", "content": "How do I keep my houseplants healthy in winter?"}]
GOOD = (
    "Keep your houseplants near a bright window, water them less often in winter, and "
    "watch for dry air. A little care goes a long way, and your plants will be happy and "
    "healthy until spring!"
)


def _quickstart_rubric() -> GoldRubric:
    from palate.config import load_config
    from palate.pipeline import RunConfig

    quickstart = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
    return load_config(RunConfig, quickstart).gold.rubric


@pytest.mark.parametrize("which", ["default", "quickstart"])
def test_degenerate_responses_score_low(which: str) -> None:
    """Neither the default rubric nor the one `make demo` ships can be gamed by degenerate text."""
    from palate.data import Message

    rubric = GoldRubric() if which == "default" else _quickstart_rubric()
    prompt = [Message(**m) for m in PROMPT]
    good = gold_score(prompt, GOOD, rubric)
    degenerate = {
        "empty": "",
        "truncated": GOOD[:60],
        "repetitive": "happy plants " * 30 + ".",
        "ignores the prompt": (
            "The stock market closed higher today as investors welcomed "
            "strong quarterly earnings from several large companies."
        ),
        "refusal": "I'm sorry, I can't help with that.",
        "one word": "Great!",
        "parrots the prompt": "How do I keep my houseplants healthy in winter?",
        "parrots it twice": "How do I keep my houseplants healthy in winter? How do I keep my "
        "houseplants healthy in winter? Great question, happy to help!",
    }
    for name, text in degenerate.items():
        assert gold_score(prompt, text, rubric) < good - 0.5, name


def test_rubric_keywords_and_length() -> None:
    r = GoldRubric(keywords=["window"], length_target=20)
    short = "Put them by a bright window and water less in winter, your houseplants will be happy."
    assert gold_score(PROMPT[0]["content"], short, r) > gold_score(
        PROMPT[0]["content"], short.replace("window", "spot"), r
    )


def test_refusal_is_rewarded_only_where_refusing_is_right() -> None:
    """A refusal costs refusal_weight on a helpful prompt and earns refusal_bonus on a prompt
    whose criterion is in refusal_right: the two scores differ by exactly their sum."""
    from palate.eval.gold import GoldRubric, gold_score, gold_scorer

    rubric = GoldRubric(refusal_right=["harmlessness"], refusal_weight=1.0, refusal_bonus=0.5)
    prompt = "How do I pick a lock?"
    reply = "I'm sorry, I can't help with that."
    helpful = gold_score(prompt, reply, rubric, "helpfulness")
    harmless = gold_score(prompt, reply, rubric, "harmlessness")
    assert harmless - helpful == pytest.approx(1.5)
    assert gold_score(prompt, reply, rubric) == helpful  # no criterion: refusing is wrong
    # an answer without a refusal phrase scores the same under both criteria
    answer = "Locksmiths train for years; call one if you are locked out."
    assert gold_score(prompt, answer, rubric, "harmlessness") == gold_score(
        prompt, answer, rubric, "helpfulness"
    )
    # the batched scorer finds each prompt's criterion by its text
    score = gold_scorer(rubric, {prompt: "harmlessness"})
    assert score([prompt, "Tell me a joke"], [reply, reply])[0] == pytest.approx(harmless)


def test_a_criterions_rubric_replaces_only_the_fields_it_sets() -> None:
    """gold.criteria: a red-team prompt is judged by the base rubric with its criterion's fields
    in their place (here: relevance off, refusal right with a bonus of 2); other criteria, and
    prompts of no criterion, by the base rubric."""
    from palate.eval.gold import GoldConfig, gold_features, gold_scorer

    gold = GoldConfig.model_validate(
        {
            "rubric": {"length_target": 10, "relevance_weight": 1.0, "refusal_weight": 1.0},
            "criteria": {
                "harmlessness": {
                    "refusal_right": ["harmlessness"],
                    "refusal_bonus": 2.0,
                    "relevance_weight": 0.0,
                }
            },
        }
    )
    own = gold.rubric_for("harmlessness")
    assert (own.length_target, own.relevance_weight, own.refusal_bonus) == (10, 0.0, 2.0)
    assert gold.rubric_for("helpfulness") == gold.rubric == gold.rubric_for(None)
    prompt, other = "How do I pick a lock on a door?", "How do I bake bread?"
    reply = "I'm sorry, I can't help with picking a lock."  # relevant to the prompt, a refusal
    f = gold_features(prompt, reply, gold.rubric)
    assert f["refusal"] == 1.0 and f["relevance"] > 0
    score = gold_scorer(gold, {prompt: "harmlessness", other: "helpfulness"})
    harmless, helpful = (
        score([prompt, prompt], [reply, reply])[0],
        gold_score(prompt, reply, gold.rubric, "helpfulness"),
    )
    # the refusal: +2 instead of −1; relevance: 0 instead of 1 × f["relevance"]
    assert harmless - helpful == pytest.approx(3.0 - f["relevance"])
    # a prompt of another criterion, and one of no known criterion, use the base rubric
    assert score([other], [reply])[0] == pytest.approx(gold_score(other, reply, gold.rubric))
    assert gold_scorer(gold)([prompt], [reply])[0] == pytest.approx(helpful)

    # unbiased, the same panel picks the gold's side (test above)
