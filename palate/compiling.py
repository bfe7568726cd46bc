"""torch.compile where a GPU wants it: the PPO loop there is bound by per-operation overhead.

On a GPU a small policy's forward is hundreds of tiny kernels, each launched from Python
(autocast, peft's LoRA wrappers and autograd add more per layer), so one PPO minibatch costs
about the same whether the model is 135M or 1.7B (issue #14 measured ~0.45 s per optimiser step
on an H100 at either size). Two standard remedies, each behind a setting of
:class:`CompileSettings` (``ppo.compile``):

* **training** — *regional compilation* (PyTorch recipe "Reducing torch.compile cold start
  compilation time with regional compilation"): each decoder layer is compiled in place with
  dynamic shapes. The layers share one code object, so one compile serves all of them; the
  LoRA adapters, autocast and the backward (AOTAutograd) are fused inside the layer, while the
  LM head, the fp32 log-softmax and the value head stay eager (:mod:`palate.lm`).
* **generation** — transformers' static KV cache, whose decoding step ``generate`` compiles
  itself (``reduce-overhead``: CUDA graphs). Prompts are left-padded to a multiple of
  ``prompt_bucket`` so the compiled step sees few shapes.

Both are ``auto`` = on when the device is a GPU, off on a CPU (where compiling costs minutes of
a short run and the loop is bound by arithmetic, not launches).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field

from palate.config import Config
from palate.lm import base_model

__all__ = ["CompileSettings", "compile_layers", "decoder_layers", "eager_layers", "wanted"]

# inductor generates Triton (GPU) or C++ (CPU) kernels; tests use "aot_eager" (traced forward
# and backward graphs run eagerly: same capture, no code generation).
BACKEND = "inductor"


class CompileSettings(Config):
    """torch.compile for PPO (see :mod:`palate.compiling`)."""

    training: bool | Literal["auto"] = Field(
        "auto",
        description="Compile each decoder layer of the policy (regional torch.compile, dynamic "
        "shapes) for the log-prob/value forwards and the backward; 'auto' = on a GPU.",
    )
    generation: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="Rollout decoding with the 'merged' engine: 'static' = transformers' static "
        "KV cache with its compiled (CUDA-graph) decoding step on a GPU; 'dynamic' = the plain "
        "growing cache, nothing compiled; 'auto' = static on a GPU, dynamic on a CPU.",
    )
    prompt_bucket: int = Field(
        64,
        ge=1,
        description="generation 'static': prompts are left-padded to a multiple of this many "
        "tokens, so the compiled decoding step sees few shapes.",
    )


def wanted(setting: bool | str, device: torch.device) -> bool:
    """Whether a setting is on for ``device``: ``auto`` = on a GPU; ``static`` = on,
    ``dynamic`` = off."""
    if setting == "auto":
        return device.type == "cuda"
    return setting is True or setting == "static"


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The repeated blocks of a causal LM (``model.layers`` for Llama-style models, else the
    first ``ModuleList`` of same-class modules), under peft / DDP wrappers."""
    from accelerate.utils.other import is_repeated_blocks

    hf = base_model(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and is_repeated_blocks(layers):
        return layers
    for module in decoder.modules():
        if is_repeated_blocks(module):
            return module
    raise ValueError(f"{type(hf).__name__}: no repeated decoder blocks to compile")


def compile_layers(model: Any, **kwargs: Any) -> int:
    """Compile each decoder layer of ``model`` in place (``nn.Module.compile``: the module, its
    parameters and any optimiser holding them stay the same objects); returns how many."""
    layers = decoder_layers(model)
    # Every layer (of the policy, a reference copy, a critic) shares one code object, and each
    # mode is its own graph: with/without grad, the first layer's input needing no grad, LoRA
    # adapters off for π_ref, train/eval. Dynamo's default limit of 8 per code object would
    # silently fall back to eager past it.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 32))
    options: dict[str, Any] = {"dynamic": True, "backend": BACKEND, **kwargs}
    for layer in layers:
        layer.compile(**options)
    return len(layers)


@contextmanager
def eager_layers(model: Any) -> Iterator[None]:
    """Inside, compiled decoder layers of ``model`` (if any) run eagerly: sampling with a
    growing KV cache would specialise a compiled layer on its cache index, one recompile per
    layer. A no-op for models without compiled layers."""
    try:
        layers = list(decoder_layers(model))
    except (ValueError, AttributeError):
        layers = []
    saved = [(m, m._compiled_call_impl) for m in layers if m._compiled_call_impl is not None]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, fn in saved:
            m._compiled_call_impl = fn
