"""Evaluation maths: win rate with ties and a bootstrap interval; KL of a policy to itself is 0."""

from __future__ import annotations

import copy

import pytest
import torch

from palate.evaluate import compare, evaluate_policy, sequence_kl, win_rate
from palate.sampling import SamplingConfig


def test_win_rate_hand_computed_and_interval() -> None:
    r = win_rate([3, 1, 2, 5], [1, 1, 3, 4])  # win, tie, loss, win -> 2.5 / 4
    assert r["win_rate"] == pytest.approx(0.625) and r["n"] == 4
    assert 0 <= r["low"] <= 0.625 <= r["high"] <= 1
    big = win_rate([1.0] * 150 + [0.0] * 50, [0.5] * 200)
    assert big["win_rate"] == 0.75
    # binomial SE sqrt(.75*.25/200) = 0.031 -> the 95% interval is about ±0.06
    assert big["low"] == pytest.approx(0.69, abs=0.02) and big["high"] == pytest.approx(
        0.81, abs=0.02
    )
    assert win_rate([1, 1], [0, 0]) == {"win_rate": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_sequence_kl_zero_for_same_model_and_positive_after_change(tiny) -> None:
    model, tok = tiny
    prompts = ["hi there", "a longer prompt for the model"]
    responses = [tok("ok then").input_ids + [tok.eos_token_id], tok("yes").input_ids]
    kl = sequence_kl(model, model, tok, prompts, responses)
    assert kl == pytest.approx([0.0, 0.0], abs=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 0.5)
    # on the changed policy's own samples the k1 estimate is positive on average
    from palate.evaluate import sample_policy

    samples = sample_policy(
        other, tok, ["hi"] * 16, SamplingConfig(max_new_tokens=6, temperature=1.0)
    )
    assert sum(sequence_kl(other, model, tok, samples.prompts, samples.token_ids)) > 0


def test_compare_with_gold_and_proxy(tiny) -> None:
    model, tok = tiny

    def length(prompts: object, responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]

    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    prompts = ["a", "b", "c"]
    new = evaluate_policy(model, tok, prompts, sampling, reference=model, gold=length, proxy=length)
    old = evaluate_policy(model, tok, prompts, sampling, gold=length, proxy=length)
    out = compare(new, old)
    # the same policy with the same seed: identical samples, every comparison a tie
    assert out["gold_win_rate"] == 0.5 and out["proxy_win_rate"] == 0.5
    assert out["kl"] == pytest.approx(0.0, abs=1e-6) and len(out["samples"]) == 3


def test_scores_of_different_shapes_are_an_error_not_a_broadcast() -> None:
    """[1, 2] against [0] would broadcast to two wins; it is refused, wherever it comes in."""
    from palate.evaluate import pairwise_wins, win_rate

    with pytest.raises(ValueError, match="one shape"):
        pairwise_wins([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="one shape"):
        win_rate([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        win_rate([], [])
    assert pairwise_wins([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]).tolist() == [1.0, 0.5, 0.0]
