"""Precision: bf16 autocast where the hardware has it (weights and optimiser stay fp32), and
frozen linear weights stored in bf16 where autocast would cast them anyway."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from palate.errors import ConfigError

__all__ = ["autocast", "bf16_supported", "resolve_precision", "store_frozen_linears"]


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast is fast on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → ``bf16`` where supported, else ``fp32``; explicit values are checked."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: expected auto, bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision == 'bf16'`` (weights and optimiser stay fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def store_frozen_linears(model: torch.nn.Module, precision: str) -> int:
    """Under bf16 autocast, store frozen ``nn.Linear`` weights in bf16; returns how many.

    Autocast casts an fp32 weight to bf16 at *every* call (it caches casts only for weights that
    require grad), so a frozen base — LoRA's, a reference policy's, a reward model's — pays a
    full copy of its weights per forward; during generation that is once per token. Storing
    them in bf16 computes exactly the same numbers (autocast would round them the same way),
    halves their memory and skips the casts. Embeddings (and heads tied to them) and norms
    stay fp32, so the residual stream keeps its precision.
    """
    if precision != "bf16":
        return 0
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        if id(module.weight) in tied or module.weight.dtype != torch.float32:
            continue
        module.weight.data = module.weight.data.to(torch.bfloat16)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(torch.bfloat16)
        n += 1
    return n
