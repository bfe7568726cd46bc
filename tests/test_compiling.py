"""Regional compilation (palate.compiling): the compiled policy computes what the eager one does.

The compiler backend here is ``aot_eager``: dynamo captures each layer's forward and
AOTAutograd its backward, exactly as with inductor, but the graphs run eagerly (no C++/Triton
code generation, which would cost minutes on this CPU). Inductor itself runs in bench/gpu.py on a
GPU.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import palate.compiling as compiling
from palate.data import write_jsonl
from palate.lm import policy_forward
from palate.ppo import PPOTrainer
from palate.ppo.critic import ValueHead
from palate.sampling import MergedCopyEngine, SamplingConfig
from palate.training import LoraSettings, apply_lora

from .ppo.test_trainer import bright, make_cfg
from .test_sft import demos


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(tok, device, width: int = 9, T: int = 6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, width + T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ids[0, :4] = tok.pad_token_id
    mask[1, width + 3 :] = 0  # a response that ended early
    return ids.to(device), mask.to(device), width


def test_compiled_layers_compute_the_same_logprobs_values_and_gradients(tiny, device) -> None:
    from torch._dynamo.utils import counters

    model, tok = tiny
    eager = apply_lora(copy.deepcopy(model), LoraSettings(r=4)).to(device)
    with torch.no_grad():  # non-zero adapters, so they change the forward
        for n, p in eager.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    compiled = copy.deepcopy(eager)
    n_layers = compiling.compile_layers(compiled)
    assert n_layers == model.config.num_hidden_layers >= 2
    torch.manual_seed(1)
    head = ValueHead(model.config.hidden_size).to(device)
    ids, mask, width = _batch(tok, device)
    outs, grads = [], []
    counters.clear()
    for m in (eager, compiled):
        logp, values, entropy = policy_forward(m, head, ids, mask, width, 0.7, True)
        (logp.sum() + values.sum() + entropy.sum()).backward()
        outs.append((logp, values, entropy))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad()
    # one graph serves every layer (the point of regional compilation), two with the first
    # layer's (its input, the frozen embedding's output, needs no grad); other shapes reuse them
    assert counters["stats"]["unique_graphs"] == 2
    ids2, mask2, width2 = _batch(tok, device, width=5, T=11)
    policy_forward(compiled, head, ids2, mask2, width2, 0.7, True)[0].sum().backward()
    compiled.zero_grad()
    assert counters["stats"]["unique_graphs"] == 2
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * n_layers
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # sampling runs the layers eagerly (a growing KV cache would recompile each layer)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    q, qm = ids[:, :width], mask[:, :width]
    before = counters["stats"]["unique_graphs"]
    from palate.sampling import PolicyEngine

    engine = PolicyEngine(contextlib.nullcontext)
    engine.sync(compiled)
    out = engine.generate(q, qm, greedy, **kw)
    engine.sync(eager)
    assert torch.equal(out, engine.generate(q, qm, greedy, **kw))
    assert counters["stats"]["unique_graphs"] == before
    assert all(m._compiled_call_impl is not None for m in compiling.decoder_layers(compiled))


@pytest.mark.parametrize("static", [False, True])
def test_prompt_bucket_padding_samples_the_same(tiny, static: bool) -> None:
    """Left padding up to a bucket (and a static KV cache) leave greedy samples unchanged, and
    the engine hands back the prompts as given."""
    model, tok = tiny
    policy = copy.deepcopy(model)
    ids, mask, width = _batch(tok, torch.device("cpu"))
    q, qm = ids[:, :width], mask[:, :width]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    plain = MergedCopyEngine(policy, "fp32", contextlib.nullcontext)
    bucketed = MergedCopyEngine(
        policy, "fp32", contextlib.nullcontext, static_cache=static, prompt_bucket=16
    )
    expected = plain.generate(q, qm, greedy, **kw)
    got = bucketed.generate(q, qm, greedy, **kw)
    assert got.shape == expected.shape and torch.equal(got[:, :width], q)
    assert torch.equal(got, expected)


def test_ppo_with_compiled_training_matches_eager(tmp_path: Path) -> None:
    """Two PPO updates with compiled layers: the same rollouts and losses as eager ones, and as
    many graphs for a 4-layer model as for a 2-layer one (no per-layer recompiles: the training
    forwards build no KV cache, whose per-layer index a compiled layer would specialise on)."""
    from torch._dynamo.utils import counters

    from palate.models import tiny_causal_lm

    write_jsonl(tmp_path / "prompts.jsonl", demos(16))
    prompts = str(tmp_path / "prompts.jsonl")
    deeper, tok = tiny_causal_lm(num_hidden_layers=4)
    deeper.save_pretrained(tmp_path / "deeper")
    tok.save_pretrained(tmp_path / "deeper")
    rows, graphs = {}, {}
    for name, model, setting in (
        ("eager", "tiny", "false"),
        ("compiled", "tiny", "true"),
        ("deeper", str(tmp_path / "deeper"), "true"),
    ):
        torch._dynamo.reset()
        counters.clear()
        cfg = make_cfg(
            tmp_path / name,
            (model, prompts),
            "ppo.updates=2",
            "finetune=lora",
            f"compile.training={setting}",
            "compile.generation=dynamic",
        )
        trainer = PPOTrainer(cfg, score_fn=bright)
        layers = compiling.decoder_layers(trainer.policy)
        assert all((m._compiled_call_impl is not None) == (setting == "true") for m in layers)
        rows[name] = [trainer.step(trainer.prompts[:16])[0] for _ in range(2)]
        graphs[name] = counters["stats"]["unique_graphs"]
    for a, b in zip(rows["eager"], rows["compiled"], strict=True):
        for key in ("objective/score", "objective/kl", "policy/loss", "value/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    assert graphs["eager"] == 0 and 0 < graphs["compiled"] == graphs["deeper"]
