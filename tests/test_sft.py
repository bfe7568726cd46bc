from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from palate.config import load_config
from palate.data import Demonstration, write_jsonl
from palate.lm import response_cross_entropy
from palate.models import load_model
from palate.sampling import SamplingConfig, generate_responses
from palate.sft import (
    IGNORE_INDEX,
    SFTConfig,
    collate,
    sft,
    sft_loss,
    tokenize_demonstration,
)

# ---------------------------------------------------------------- tokenization and the loss


def test_prompt_tokens_are_masked_and_eos_appended(tiny) -> None:
    _, tok = tiny
    ex = tokenize_demonstration(tok, Demonstration(prompt="Hi there", response="Hello!"), 512)
    n_prompt = sum(1 for lab in ex.labels if lab == IGNORE_INDEX)
    response = tok("Hello!", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.labels[n_prompt:] == response == ex.input_ids[n_prompt:]
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:n_prompt])
    assert tok.decode(ex.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert ex.truncated is None


def test_loss_hand_computed() -> None:
    # vocab 3; sequence [p, a, b] with the prompt p masked: loss = CE(logits[0], a) + CE(logits[1], b)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    total, n = sft_loss(logits, labels)
    z0 = math.log(math.exp(2) + 2)  # logsumexp of [2, 0, 0]
    z1 = math.log(math.exp(1) + 2)
    expected = (z0 - 0.0) + (z1 - 0.0)  # -log p(a | p) - log p(b | p, a)
    assert n == 2
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_loss_ignores_prompt_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [4, 5, 6], [IGNORE_INDEX] * 2 + [1, 2, 3, 7]])
    base, n = sft_loss(logits, labels)
    assert n == 7
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, 11) * 10  # predictions *of* prompt tokens (positions 0..1)
    changed[1, :1] = torch.randn(1, 11) * 10
    assert torch.allclose(sft_loss(changed, labels)[0], base)
    changed[0, 3] += torch.randn(11)  # a response prediction
    assert not torch.allclose(sft_loss(changed, labels)[0], base)


def test_loss_unchanged_when_prompt_labels_change(tiny) -> None:
    """Different prompt label values (as long as they are prompt) never enter the loss."""
    model, tok = tiny
    ex = tokenize_demonstration(tok, Demonstration(prompt="Question?", response="Answer."), 512)
    batch = collate([ex], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    other = batch["labels"].clone()
    n_prompt = int((other == IGNORE_INDEX).sum())
    a, _ = sft_loss(logits, other)
    other[0, :n_prompt] = IGNORE_INDEX  # already masked: same loss
    assert sft_loss(logits, other)[0] == a
    # the same loss computed by hand from log-softmax at response positions
    logp = F.log_softmax(logits[0, :-1], -1)
    tgt = batch["labels"][0, 1:]
    manual = -sum(logp[t, tgt[t]] for t in range(len(tgt)) if tgt[t] != IGNORE_INDEX)
    assert a.item() == pytest.approx(manual.item(), rel=1e-5)


def test_fast_lm_head_matches_full_forward(tiny) -> None:
    model, tok = tiny
    exs = [
        tokenize_demonstration(tok, Demonstration(prompt=p, response=r), 512)
        for p, r in [("a b c", "d e"), ("longer prompt here", "and a longer reply too")]
    ]
    batch = collate(exs, tok.pad_token_id)
    with torch.no_grad():
        fast, n_fast = response_cross_entropy(model, batch, fast=True)
        full, n_full = sft_loss(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
        )
    assert n_fast == n_full
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


def test_truncation_from_left_of_prompt_then_right_of_response(tiny) -> None:
    _, tok = tiny
    long_prompt = " ".join(["word"] * 200)
    ex = tokenize_demonstration(tok, Demonstration(prompt=long_prompt, response="short"), 32)
    assert ex.truncated == "prompt" and len(ex.input_ids) == 32
    assert ex.input_ids[-1] == tok.eos_token_id  # the response survives whole
    ex = tokenize_demonstration(tok, Demonstration(prompt="hi", response=long_prompt), 32)
    assert ex.truncated == "response" and len(ex.input_ids) == 32
    assert ex.input_ids[-1] != tok.eos_token_id


def test_collate_pads_right_with_pad_not_eos(tiny) -> None:
    _, tok = tiny
    exs = [
        tokenize_demonstration(tok, Demonstration(prompt="a", response="b"), 64),
        tokenize_demonstration(
            tok, Demonstration(prompt="a much longer prompt", response="b c d"), 64
        ),
    ]
    b = collate(exs, tok.pad_token_id)
    n0 = len(exs[0].input_ids)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["input_ids"][0, n0:] == tok.pad_token_id).all()
    assert (b["labels"][0, n0:] == IGNORE_INDEX).all() and b["attention_mask"][0, n0:].sum() == 0
    assert b["labels"][0, n0 - 1] == tok.eos_token_id  # the real EOS keeps its label


# ---------------------------------------------------------------- training


TOPICS = [
    "oceans",
    "cats",
    "winter",
    "music",
    "bread",
    "moonlight",
    "rivers",
    "books",
    "trains",
    "gardens",
    "rain",
    "coffee",
    "mountains",
    "clocks",
    "bees",
    "lanterns",
    "snow",
    "maps",
    "owls",
    "violins",
    "tea",
    "bridges",
    "storms",
    "candles",
]
ENDINGS = ["is quiet", "feels warm", "sings softly", "waits patiently", "shines bright"]


def demos(n: int) -> list[Demonstration]:
    return [
        Demonstration(
            prompt=f"Describe {t}.",
            response=f"{t.capitalize()} {ENDINGS[i % 5]}. Thanks for asking!",
        )
        for i, t in enumerate(TOPICS[:n])
    ]


def make_cfg(tmp_path: Path, *overrides: str, n: int = 24) -> SFTConfig:
    data = tmp_path / "demos.jsonl"
    write_jsonl(data, demos(n))
    base = [
        "model=tiny",
        f"data={data}",
        f"output_dir={tmp_path / 'run'}",
        "sample_prompts=2",
        "sample_max_new_tokens=8",
    ]
    return load_config(SFTConfig, None, [*base, *overrides])


def test_tiny_model_learns_demonstrations(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        "finetune=full",
        "eval_fraction=0.2",
        "optim.lr=3e-3",
        "optim.warmup_ratio=0",
        "train.epochs=150",
        "train.batch_size=8",
        "precision=fp32",
    )
    summary = sft(cfg)
    assert summary["eval_loss_after"] <= 0.5 * summary["eval_loss_before"], summary
    model, tok = load_model(summary["final"])
    held_in = [d for d in demos(24) if d.prompt not in _held_out_prompts(tmp_path)]
    assert len(held_in) == 19
    gens = generate_responses(
        model, tok, [d.prompt for d in held_in], SamplingConfig(temperature=0, max_new_tokens=24)
    )
    exact = [g.text == d.response for g, d in zip(gens, held_in, strict=True)]
    assert all(exact), [(g.text, d.response) for g, d in zip(gens, held_in, strict=True)]
    assert all(g.finished for g in gens)  # it learned to stop
    run = tmp_path / "run"
    assert (run / "samples" / "epoch-000.jsonl").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "timing/step"} <= set(rows[1])


def _held_out_prompts(tmp_path: Path) -> set[str]:
    # the held-out split is written nowhere; recompute it the way sft does
    from palate.sft import load_demonstrations

    cfg = make_cfg(tmp_path, "eval_fraction=0.2")
    return {d.prompt for d in load_demonstrations(cfg)[1]}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, finetune: str) -> None:
    common = [
        f"finetune={finetune}",
        "train.max_steps=6",
        "train.batch_size=3",
        "train.grad_accum=2",
        "checkpoint_every=100",
        "optim.lr=1e-2",
        "sample_prompts=0",
        "save=adapter",
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sft(make_cfg(tmp_path / "a", *common))
    part = sft(make_cfg(tmp_path / "b", *common), stop_after=2)
    assert part["stopped_at"] == 2 and not (tmp_path / "b" / "run" / "summary.json").exists()
    resumed = sft(make_cfg(tmp_path / "b", *common))
    assert resumed["steps"] == 6

    def weights(root: Path) -> dict[str, torch.Tensor]:
        final = root / "run" / "final"
        f = final / ("adapter_model.safetensors" if finetune == "lora" else "model.safetensors")
        return load_file(f)

    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    ma = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra.get("train/loss") == pytest.approx(rb.get("train/loss"), abs=1e-6)


def test_lora_adapter_and_merged_load_back_the_same(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "m").mkdir()
    args = ["train.max_steps=3", "optim.lr=1e-2", "sample_prompts=0"]
    sa = sft(make_cfg(tmp_path / "a", *args, "save=adapter"))
    sm = sft(make_cfg(tmp_path / "m", *args, "save=merged"))
    assert (Path(sa["final"]) / "adapter_config.json").is_file()
    assert (
        json.loads((Path(sa["final"]) / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        == "tiny"
    )
    assert (Path(sm["final"]) / "config.json").is_file()
    adapter, tok = load_model(sa["final"])
    merged, _ = load_model(sm["final"])
    base, _ = load_model("tiny")
    ids = tok("Describe the sea.", return_tensors="pt").input_ids
    with torch.no_grad():
        la, lm, lb = adapter(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(la, lm, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(la, lb, atol=1e-4)  # training changed something


def test_bad_data_file_is_a_clear_error(tmp_path: Path) -> None:
    from palate.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "x"}\n')
    cfg = load_config(
        SFTConfig, None, ["model=tiny", f"data={bad}", f"output_dir={tmp_path / 'r'}"]
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        sft(cfg)


def test_tensorboard_tracker(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    summary = sft(
        make_cfg(tmp_path, "train.max_steps=2", "sample_prompts=0", "tracker=tensorboard")
    )
    assert summary["steps"] == 2
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


@pytest.mark.slow
def test_smollm2_lora_sft_lowers_heldout_loss(tmp_path: Path, hh_file: Path, capsys) -> None:
    cfg = load_config(
        SFTConfig,
        None,
        [
            "model=smollm2-135m-instruct",
            f"data={hh_file}",
            "max_examples=20",
            "eval_fraction=0.2",
            f"output_dir={tmp_path / 'run'}",
            "max_length=256",
            "optim.lr=3e-4",
            "train.batch_size=4",
            "sample_prompts=1",
            "sample_max_new_tokens=16",
        ],
    )
    s = sft(cfg)
    with capsys.disabled():
        print(
            f"\nsmollm2 LoRA SFT: eval loss {s['eval_loss_before']:.3f} -> "
            f"{s['eval_loss_after']:.3f}, {s['tokens_per_s']:.0f} tokens/s ({s['precision']})"
        )
    assert s["eval_loss_after"] < s["eval_loss_before"]
