"""Batched sampling from a causal LM with the KV cache (``model.generate``).

Used to sample responses for inspection, for labeling campaigns and PPO rollouts. Prompts are
rendered with :mod:`palate.formatting` and left-padded; each response is cut at its first EOS
and reports whether it ever emitted one (``finished``).

PPO samples through a :class:`RolloutEngine`: ``sync(policy)`` before each rollout, then
``generate(query_ids, query_mask, sampling)``. Two engines ship (transformers ``generate``); a
faster engine (e.g. vLLM) would implement the same two methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import Field

from palate.compiling import eager_layers
from palate.config import Config
from palate.data import Conversation, Prompt
from palate.formatting import pad_batch, prompt_ids
from palate.lm import base_model
from palate.models import load_merged, load_model
from palate.progress import progress_bar
from palate.training import autocast, store_frozen_linears

__all__ = [
    "Generated",
    "MergedCopyEngine",
    "PolicyEngine",
    "RolloutEngine",
    "EpisodeNoise",
    "SamplingConfig",
    "episode_seed",
    "generate_responses",
    "inference_model",
    "plain_generation_config",
]


class SamplingConfig(Config):
    """How responses are sampled."""

    max_new_tokens: int = Field(128, ge=1, description="Maximum tokens generated per response.")
    temperature: float = Field(
        0.7, ge=0.0, description="Softmax temperature; 0 means greedy decoding."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0 = off).")


@dataclass
class Generated:
    """One sampled response."""

    text: str  # decoded response, special tokens removed
    token_ids: list[int]  # response tokens up to and including EOS when finished
    finished: bool  # emitted EOS within max_new_tokens


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | Conversation],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "fp32",
) -> list[Generated]:
    """Sample one response per prompt, ``batch_size`` prompts at a time (``precision='bf16'``:
    under bf16 autocast; see :func:`inference_copy` for a model stored for it)."""
    sampling = sampling or SamplingConfig()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    out: list[Generated] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            input_ids, attention = pad_batch(chunk, pad)
            width = input_ids.shape[1]
            seqs = _sample(
                model,
                input_ids.to(device),
                attention.to(device),
                sampling,
                autocast(device, precision),
                pad,
                eos,
            )
            for row in seqs[:, width:].tolist():
                finished = eos in row
                ids = row[: row.index(eos) + 1] if finished else row
                text = tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Generated(text=text.strip(), token_ids=ids, finished=finished))
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return out


def inference_model(model: Any, precision: str) -> Any:
    """Freeze ``model`` for sampling/scoring only: no grads, eval mode, and under bf16 its
    linear weights stored in bf16 (what autocast would compute, without re-casting per token)."""
    model.requires_grad_(False).eval()
    store_frozen_linears(model, precision)
    return model


# --------------------------------------------------------------------------- rollout engines


class RolloutEngine(Protocol):
    """What PPO needs from a sampler."""

    def sync(self, policy: torch.nn.Module) -> None:
        """Take the policy's current weights (called before every rollout)."""

    def generate(
        self,
        query_ids: torch.Tensor,  # (B, Tq) left-padded prompt ids
        query_mask: torch.Tensor,  # (B, Tq)
        sampling: SamplingConfig,
        *,
        pad_token_id: int,
        eos_token_id: int,
        seeds: Sequence[int] | None = None,  # (B,) per-row sampling seeds, or the global RNG
    ) -> torch.Tensor:  # (B, Tq + T): the queries followed by the sampled tokens
        """Sample one response per query."""


@contextmanager
def plain_generation_config(model: Any) -> Iterator[None]:
    """Sample with only the knobs :class:`SamplingConfig` sets.

    ``generate`` fills every setting a call leaves unset from ``model.generation_config``, so a
    checkpoint's ``repetition_penalty``, ``no_repeat_ngram_size``, bad words, ... would change
    what is sampled, while PPO computes log π at the plain tempered distribution. A clean config
    (keeping only the special-token ids) stands in for the model's while sampling.
    """
    from transformers import GenerationConfig

    hf_model = base_model(model)
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id,
        eos_token_id=saved.eos_token_id,
        pad_token_id=saved.pad_token_id,
    )
    try:
        yield
    finally:
        hf_model.generation_config = saved


def episode_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (e.g. run seed, update, episode), well mixed
    (numpy's ``SeedSequence``): neighbouring keys give unrelated streams."""
    import numpy as np

    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class EpisodeNoise:
    """Sampling at temperature τ where each row draws from its own random stream.

    Gumbel-max: argmax(z/τ + g) with g ~ Gumbel(0, 1) i.i.d. per token is an exact sample from
    softmax(z/τ) (Gumbel 1954; Maddison et al. 2014, "A* sampling"). Used as a logits processor
    under greedy decoding, with the noise for row b's t-th token drawn from a generator seeded
    with ``seeds[b]``, a response depends only on its seed — not on which other prompts share
    its batch or process. PPO uses it (``ppo.episode_seeds``) so that a run in N processes
    samples exactly what one process samples. Costs B × vocabulary uniforms per token.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device):
        if temperature <= 0:
            raise ValueError("EpisodeNoise needs a temperature > 0")
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[1]  # (B, V) next-token logits
        if len(self.generators) != scores.shape[0]:
            raise ValueError(f"{len(self.generators)} seeds for a batch of {scores.shape[0]}")
        u = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
        return scores.float() / self.temperature + gumbel


def _sample(
    model: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    s: SamplingConfig,
    autocast_ctx: Any,
    pad: int,
    eos: int,
    static_cache: bool = False,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    greedy = s.temperature == 0
    model.eval()
    # a static KV cache: on a GPU ``generate`` compiles its decoding step (CUDA graphs)
    extra: dict[str, Any] = {"cache_implementation": "static"} if static_cache else {}
    if seeds is not None and not greedy:
        if s.top_p < 1 or s.top_k > 0:
            raise ValueError("per-episode seeds sample at a plain temperature (no top_p/top_k)")
        from transformers import LogitsProcessorList

        noise = EpisodeNoise(seeds, s.temperature, query_ids.device)
        extra["logits_processor"] = LogitsProcessorList([noise])
        greedy = True  # argmax of the noised logits is the sample
    with torch.no_grad(), autocast_ctx, plain_generation_config(model), eager_layers(model):
        return model.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            max_new_tokens=s.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else s.temperature,
            top_p=None if greedy else s.top_p,
            top_k=None if greedy else s.top_k,
            pad_token_id=pad,
            eos_token_id=eos,
            **extra,
        )


class _GenerateEngine:
    """Samples with transformers' ``generate`` on ``self.model`` (its train/eval mode restored)."""

    model: Any
    _autocast: Callable[[], Any]
    static_cache: bool = False
    prompt_bucket: int = 1

    def generate(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        sampling: SamplingConfig,
        *,
        pad_token_id: int,
        eos_token_id: int,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Sampled ids (B, Tq + T); ``seeds`` (one per row) draws each row's noise from its
        own stream (:class:`EpisodeNoise`) instead of the global RNG."""
        extra = -query_ids.shape[1] % self.prompt_bucket
        if extra:  # left padding up to the bucket (positions follow the mask: same samples)
            query_ids = torch.nn.functional.pad(query_ids, (extra, 0), value=pad_token_id)
            query_mask = torch.nn.functional.pad(query_mask, (extra, 0), value=0)
        was = self.model.training
        try:
            out = _sample(
                self.model,
                query_ids,
                query_mask,
                sampling,
                self._autocast(),
                pad_token_id,
                eos_token_id,
                self.static_cache,
                seeds,
            )
        finally:
            self.model.train(was)
        return out[:, extra:]


class PolicyEngine(_GenerateEngine):
    """Samples with the training policy itself (no extra memory)."""

    def __init__(self, autocast_factory: Callable[[], Any]):
        self._autocast = autocast_factory
        self.model = None

    def sync(self, policy: torch.nn.Module) -> None:
        self.model = policy


class MergedCopyEngine(_GenerateEngine):
    """Samples with an inference copy of the policy: LoRA merged in, frozen linears in bf16.

    Generation runs one token at a time, so per-call overheads dominate: unmerged LoRA adds two
    small matmuls per adapted layer per token, and autocast re-casts every fp32 weight per token.
    The copy avoids both (one extra model in memory, in bf16 where the policy computes in bf16).
    ``sync`` writes the policy's current weights into it: for LoRA only the adapted layers,
    ``W + scale·B·A`` computed in fp32.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        precision: str,
        autocast_factory: Callable[[], Any],
        *,
        static_cache: bool = False,
        prompt_bucket: int = 1,
    ):
        import copy

        self._autocast = autocast_factory
        self.static_cache = static_cache  # static KV cache; compiled decoding on a GPU
        self.prompt_bucket = prompt_bucket if static_cache else 1
        src = _unwrap(policy)
        self._lora = hasattr(src, "merge_and_unload")
        if self._lora:
            # merged copy: deep-copy the peft model, then merge (weights become plain Linears)
            self.model = copy.deepcopy(src).merge_and_unload()
        else:
            self.model = copy.deepcopy(src)
        self.model.requires_grad_(False).eval()
        self._targets = {}
        if self._lora:
            for name, module in src.base_model.model.named_modules():
                if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                    self._targets[name] = self.model.get_submodule(name)
        store_frozen_linears(self.model, precision)
        if static_cache and precision == "bf16":
            # A static cache is allocated in one dtype, while under autocast the keys come out
            # of RoPE in fp32 and the values in bf16: the copy runs wholly in bf16 instead (its
            # linears were bf16 already; norms and the tied embedding/head now too).
            self.model.to(torch.bfloat16)
            self._autocast = contextlib.nullcontext

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        src = _unwrap(policy)
        if self._lora:
            for name, module in src.base_model.model.named_modules():
                target = self._targets.get(name)
                if target is None:
                    continue
                w = module.base_layer.weight.float()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        w = w + module.get_delta_weight(adapter).float()
                target.weight.copy_(w.to(target.weight.dtype))
        else:
            mine = dict(self.model.named_parameters())
            for name, p in src.named_parameters():
                mine[name].copy_(p.detach().to(mine[name].dtype))


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def load_sampler(spec: str, precision: str, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) frozen for sampling (bf16 weights under bf16), on ``device`` (CPU by
    default)."""
    model, tok = load_model(spec, device=device)
    return inference_model(model, precision), tok


def sample_with_progress(
    desc: str,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    seed: int,
    batch_size: int,
    precision: str,
) -> list[Generated]:
    """:func:`generate_responses` from a fresh seed (``torch.manual_seed(seed)``), with a
    progress bar named ``desc``."""
    torch.manual_seed(seed)
    with progress_bar(desc, total=len(prompts)) as bar:
        return generate_responses(
            model,
            tokenizer,
            prompts,
            sampling,
            batch_size=batch_size,
            precision=precision,
            on_batch=bar.advance,
        )


def checkpoint_policy(path: Path, base_spec: str, precision: str) -> Any:
    """A PPO checkpoint's policy (``path/policy``: a LoRA adapter over ``base_spec`` or a full
    model), merged and frozen for sampling."""
    return inference_model(load_merged(path / "policy", base_spec), precision)
