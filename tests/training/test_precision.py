"""Precision: frozen weights stored in bf16 compute what autocast computes."""

from __future__ import annotations

import copy

import torch

from palate.training import LoraSettings, apply_lora, autocast, store_frozen_linears


def test_frozen_linears_in_bf16_give_the_autocast_numbers(tiny) -> None:
    model, _tok = tiny
    model = apply_lora(copy.deepcopy(model), LoraSettings(r=4))
    with torch.no_grad():  # non-zero adapters, so the LoRA path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        before = model(input_ids=ids, attention_mask=mask).logits.float()
    n = store_frozen_linears(model, "bf16")
    assert n > 0
    frozen = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16
    ]
    assert frozen and all(not m.weight.requires_grad for m in frozen)
    # adapters (trainable) and embeddings (the residual stream) stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.float32
    with autocast(cpu, "bf16"):
        after = model(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # gradients still reach the adapters
    with autocast(cpu, "bf16"):
        model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_store_frozen_linears_is_a_no_op_in_fp32(tiny) -> None:
    model, _tok = tiny
    model = copy.deepcopy(model).requires_grad_(False)
    assert store_frozen_linears(model, "fp32") == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
