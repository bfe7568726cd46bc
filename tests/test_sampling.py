"""Rollout engines: the merged inference copy samples what the policy would."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from palate.sampling import MergedCopyEngine, PolicyEngine, SamplingConfig
from palate.training import LoraSettings, apply_lora


def _queries(tok):
    q = torch.randint(3, 200, (3, 7))
    qm = torch.ones_like(q)
    qm[0, :3] = 0  # left padding
    q[0, :3] = tok.pad_token_id
    return q, qm


@pytest.mark.parametrize("lora", [True, False])
def test_merged_copy_follows_the_policy_after_sync(tiny, lora: bool) -> None:
    model, tok = tiny
    policy = copy.deepcopy(model)
    if lora:
        policy = apply_lora(policy, LoraSettings(r=4))
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    engine = MergedCopyEngine(policy, "fp32", contextlib.nullcontext)
    reference = PolicyEngine(contextlib.nullcontext)
    q, qm = _queries(tok)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    with torch.no_grad():  # train: change the weights the copy must pick up
        for n, p in policy.named_parameters():
            if p.requires_grad and ("lora_B" in n or not lora):
                p.add_(torch.randn_like(p) * 0.2)
    stale = engine.generate(q, qm, greedy, **kw)
    engine.sync(policy)
    reference.sync(policy)
    fresh = engine.generate(q, qm, greedy, **kw)
    expected = reference.generate(q, qm, greedy, **kw)
    assert torch.equal(fresh, expected)
    assert not torch.equal(stale, expected)  # without sync the copy is out of date
    # the copy shares nothing with the policy
    assert not any(p.requires_grad for p in engine.model.parameters())
    assert {p.data_ptr() for p in engine.model.parameters()}.isdisjoint(
        p.data_ptr() for p in policy.parameters()
    )


def test_sampling_ignores_the_models_generation_config(tiny) -> None:
    """A checkpoint's repetition penalty or suppressed tokens must not change what is sampled:
    PPO computes log π at the plain tempered distribution."""
    from palate.sampling import generate_responses

    model, tok = tiny
    model = copy.deepcopy(model)
    prompts = ["hello there", "a b c", "tell me a story"]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    torch.manual_seed(0)
    plain = [g.token_ids for g in generate_responses(model, tok, prompts, sampling)]
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.suppress_tokens = list(range(len(tok) // 2))
    torch.manual_seed(0)
    tweaked = [g.token_ids for g in generate_responses(model, tok, prompts, sampling)]
    assert tweaked == plain
    assert model.generation_config.repetition_penalty == 50.0  # restored after sampling

    # The check can fail: generate() itself applies those settings.
    q, qm = _queries(tok)
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "max_new_tokens": 12}
    torch.manual_seed(0)
    with_config = model.generate(
        input_ids=q, attention_mask=qm, pad_token_id=tok.pad_token_id, **kw
    )
    model.generation_config.repetition_penalty = 1.0
    model.generation_config.suppress_tokens = None
    torch.manual_seed(0)
    without = model.generate(input_ids=q, attention_mask=qm, pad_token_id=tok.pad_token_id, **kw)
    assert not torch.equal(with_config, without)
