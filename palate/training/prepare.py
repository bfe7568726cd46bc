"""Getting a model ready to train: dropout off, LoRA adapters or frozen bottom layers, and the
optimiser with its learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from palate.errors import ConfigError
from palate.training.settings import LoraSettings, OptimSettings

__all__ = [
    "apply_lora",
    "build_optimizer",
    "disable_dropout",
    "freeze_bottom",
    "trainable_parameters",
]


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF convention: log-probs must be deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def freeze_bottom(model: torch.nn.Module, n_layers: int) -> int:
    """Freeze the embeddings and the lowest ``n_layers`` transformer blocks; returns how many
    parameters were frozen. Cheaper steps (no backward below the frozen part) and, on small
    preference sets, less forgetting of what pre-training learned."""
    if n_layers <= 0:
        return 0
    base: Any = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = None
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == getattr(
            model.config, "num_hidden_layers", -1
        ):
            layers = module
            break
    if layers is None:
        raise ConfigError(f"freeze_layers: cannot find the transformer blocks of {type(model)}")
    if n_layers > len(layers):
        raise ConfigError(f"freeze_layers={n_layers} but the model has {len(layers)} layers")
    parts: list[torch.nn.Module] = [
        getattr(base, "embeddings", None) or base.get_input_embeddings()
    ]
    parts += list(layers[:n_layers])
    n = 0
    for part in parts:
        for p in part.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
    return n


def apply_lora(model: Any, settings: LoraSettings, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model  # heavy: loaded only when LoRA is used

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def build_optimizer(
    params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW plus warm-up and the chosen decay, as a per-step LambdaLR."""
    from transformers import get_scheduler  # heavy: transformers loads only for training

    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(
        params,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        eps=settings.eps,
        fused=fused or None,  # one kernel for all parameters: faster on CPU and GPU
    )
    warmup = int(round(settings.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(settings.schedule, settings.schedule)
    sched = get_scheduler(
        name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1)
    )
    return opt, sched


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
