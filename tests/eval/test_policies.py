"""Evaluation maths: win rate with ties and a bootstrap interval; KL of a policy to itself is 0."""

from __future__ import annotations

import copy

import pytest
import torch

from palate.eval.policies import head_to_head, sample_and_score, sequence_kl
from palate.sampling import SamplingConfig


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
    from palate.eval.policies import sample_policy

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
    new = sample_and_score(
        model, tok, prompts, sampling, reference=model, gold=length, proxy=length
    )
    old = sample_and_score(model, tok, prompts, sampling, gold=length, proxy=length)
    out = head_to_head(new, old)
    # the same policy with the same seed: identical samples, every comparison a tie
    assert out["gold_win_rate"] == 0.5 and out["proxy_win_rate"] == 0.5
    assert out["kl"] == pytest.approx(0.0, abs=1e-6) and len(out["samples"]) == 3
