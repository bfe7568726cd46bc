"""The shared causal-LM forwards (palate.lm) against transformers' own ``generate``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palate.lm import in_length_groups, policy_forward, position_ids
from palate.ppo import ValueHead


def tiny_gemma2(softcap: float | None, device: torch.device) -> torch.nn.Module:
    """A 2-layer Gemma-2-style model whose logits are soft-capped at ``softcap``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "head_dim": 16}
    heads = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    tokens = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    cfg = Gemma2Config(
        **sizes,
        **heads,
        **tokens,
        final_logit_softcapping=softcap,
        sliding_window=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # large raw logits, so the cap (tanh) really bends them
        model.get_output_embeddings().weight.mul_(40.0)
    return model.to(device)


def sample_with_scores(model: torch.nn.Module, temperature: float):
    """Two left-padded prompts, sampled with ``generate``; its per-step scores (the logits
    after the temperature warper) and the PPO-style response mask (through EOS)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([[0, 0, 2, 5, 9, 11], [2, 7, 3, 8, 12, 4]], device=device)
    prompt_mask = (prompt != 0).long()
    torch.manual_seed(1)
    out = model.generate(
        input_ids=prompt,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=8,
        pad_token_id=0,
        eos_token_id=1,
        output_scores=True,
        return_dict_in_generate=True,
    )
    width = prompt.shape[1]
    response = out.sequences[:, width:]
    after_eos = (response == 1).long().cumsum(1) - (response == 1).long() > 0
    mask = torch.cat([prompt_mask, (~after_eos).long()], 1)
    scores = torch.stack(out.scores, 1)  # (B, T, V)
    want = F.log_softmax(scores.float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    return out.sequences, mask, width, want, ~after_eos


def test_ppo_logprobs_equal_generate_scores_with_logit_softcapping(device: torch.device) -> None:
    model = tiny_gemma2(softcap=0.5, device=device)
    temperature = 0.7
    ids, mask, width, want, real = sample_with_scores(model, temperature)
    with torch.no_grad():
        logprobs, _, _ = policy_forward(model, None, ids, mask, width, temperature)
    torch.testing.assert_close(logprobs[real], want[real], rtol=1e-5, atol=1e-5)

    # The check can fail: without the cap (the decoder + LM head alone) the log-probs differ.
    with torch.no_grad():
        h = model.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
        raw = model.get_output_embeddings()(h[:, width - 1 : -1]).float() / temperature
    uncapped = F.log_softmax(raw, -1).gather(-1, ids[:, width:].unsqueeze(-1)).squeeze(-1)
    assert (uncapped[real] - want[real]).abs().max() > 0.1


def test_value_head_reads_the_lm_heads_hidden_states_with_softcapping(device: torch.device) -> None:
    model = tiny_gemma2(softcap=0.5, device=device)
    ids, mask, width, _, _ = sample_with_scores(model, 1.0)
    torch.manual_seed(2)
    head = ValueHead(model.config.hidden_size).to(device)
    torch.nn.init.normal_(head.linear.weight)
    with torch.no_grad():
        _, values, entropy = policy_forward(model, head, ids, mask, width, 1.0, True)
        h = model.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
    assert values is not None and entropy is not None
    torch.testing.assert_close(values, head(h[:, width - 1 : -1]))


def test_plain_head_matches_generate_too(device: torch.device) -> None:
    model = tiny_gemma2(softcap=None, device=device)
    ids, mask, width, want, real = sample_with_scores(model, 0.9)
    with torch.no_grad():
        logprobs, _, _ = policy_forward(model, None, ids, mask, width, 0.9)
    torch.testing.assert_close(logprobs[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 3, 7, 20])
def test_in_length_groups_restores_row_order(groups: int) -> None:
    lengths = torch.tensor([5, 1, 3, 3, 9, 0, 2])
    seen: list[list[int]] = []

    def fn(rows: torch.Tensor) -> tuple[torch.Tensor, None]:
        seen.append(rows.tolist())
        return lengths[rows] * 10, None

    out, none = in_length_groups(fn, lengths, groups)
    assert none is None
    assert torch.equal(out, lengths * 10)
    assert len(seen) == min(groups, len(lengths))
    # each group holds rows of similar length: sorted, stable
    flat = [r for group in seen for r in group]
    assert flat == sorted(range(len(lengths)), key=lambda i: int(lengths[i]))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logits_and_values_are_fp32_under_bf16_autocast(
    softcap: float | None, device: torch.device
) -> None:
    """The LM head and the value head compute in fp32 under bf16 autocast (what the ratio, the
    KL and the returns are made of), for a plain head and for a soft-capped one."""
    model = tiny_gemma2(softcap=softcap, device=device)
    ids, mask, width, _, _ = sample_with_scores(model, 1.0)
    head = model.get_output_embeddings()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = head.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    value_head = ValueHead(32).to(device)
    torch.nn.init.normal_(value_head.linear.weight)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            logprobs, values, _ = policy_forward(model, value_head, ids, mask, width, 1.0)
    finally:
        hook.remove()
    h, logits = seen[-1]
    assert logits.dtype == torch.float32 and values is not None
    assert values.dtype == torch.float32
    exact = F.linear(h.float(), head.weight.float())  # fp32 all through
    torch.testing.assert_close(logits, exact, rtol=0, atol=1e-4)
    # the check can fail: the same head in bf16 is off by far more
    assert (F.linear(h.bfloat16(), head.weight.bfloat16()).float() - exact).abs().max() > 1e-2
    torch.testing.assert_close(values, value_head.linear(h.float()).squeeze(-1), rtol=0, atol=1e-5)
    assert head.forward.__func__ is type(head).forward  # the head's own forward is back
