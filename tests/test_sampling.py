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


def test_gumbel_noise_samples_the_tempered_softmax() -> None:
    from palate.sampling import EpisodeNoise, episode_seed

    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    noise = EpisodeNoise([episode_seed(0, 0, 0)], 0.7, torch.device("cpu"))
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[noise(None, logits).argmax()] += 1
    # softmax([1, 0, -1, 2] / 0.7) = [0.183, 0.044, 0.010, 0.763]; 20k draws: sd ≤ 0.003
    expected = torch.tensor([0.1828, 0.0438, 0.0105, 0.7629])
    torch.testing.assert_close(counts / 20000, expected, rtol=0, atol=0.012)


def test_episode_seeds_make_samples_independent_of_the_batch(tiny) -> None:
    """A response depends on its seed alone: one batch of 4 samples what two batches of 2
    sample (as PPO's ranks do), row for row; other seeds give other responses."""
    from palate.sampling import episode_seed

    model, tok = tiny
    torch.manual_seed(0)
    q, qm = _queries(tok)
    q, qm = torch.cat([q, q[:1]]), torch.cat([qm, qm[:1]])  # row 3 repeats row 0's prompt
    hot = SamplingConfig(max_new_tokens=12, temperature=1.0)
    engine = PolicyEngine(contextlib.nullcontext)
    engine.sync(model)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    seeds = [episode_seed(1, 0, i) for i in range(4)]
    whole = engine.generate(q, qm, hot, seeds=seeds, **kw)[:, q.shape[1] :]
    for rows in ([0, 2], [1, 3]):
        part = engine.generate(q[rows], qm[rows], hot, seeds=[seeds[i] for i in rows], **kw)
        part = part[:, q.shape[1] :]
        width = min(part.shape[1], whole.shape[1])
        assert torch.equal(part[:, :width], whole[rows, :width])
    torch.manual_seed(123)  # the global RNG plays no part
    again = engine.generate(q, qm, hot, seeds=seeds, **kw)[:, q.shape[1] :]
    assert torch.equal(again, whole)
    other = engine.generate(q, qm, hot, seeds=[s + 1 for s in seeds], **kw)[:, q.shape[1] :]
    assert not torch.equal(other[:, : whole.shape[1]], whole[:, : other.shape[1]])
    assert not torch.equal(whole[0], whole[3])  # same prompt, own seed: another sample
