"""Step 3 — the reward model: a scalar picture of what the raters prefer.

A reward model is any Hugging Face backbone with a scalar head
(``AutoModelForSequenceClassification``, ``num_labels=1``): causal LMs are scored at the last
real token of prompt + response (the EOS we append; padding is a distinct token), encoders such
as ``minilm-l6`` by their pooled ``[CLS]`` embedding of the (prompt, response) pair.

It is trained on comparisons with the Bradley-Terry model: the probability that ``chosen`` beats
``rejected`` is ``σ(r_chosen − r_rejected)``. See :func:`preference_loss` for ties, margins, soft
labels, label smoothing and the centring term. After training, scores are shifted so the mean
score of a reference set (the chosen training responses) is 0, and the shift is stored with the
model, so PPO sees centred rewards.

Where things are: :func:`preference_loss` (the loss), :class:`RewardModel` (load / score /
save), :func:`train_reward` (``palate reward train``), :func:`evaluate_reward`
(``palate reward eval``: accuracy, calibration, length-bias checks), :func:`score_file`
(``palate reward score``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from palate.config import Config
from palate.data import (
    Comparison,
    Demonstration,
    Prompt,
    prompt_text,
    read_records,
    split_heldout,
    write_jsonl,
)
from palate.errors import ConfigError, ModelLoadError
from palate.formatting import prompt_ids, response_ids
from palate.models import load_model
from palate.progress import console
from palate.rundir import RunDir
from palate.training import (
    LoraSettings,
    OptimSettings,
    TrainSettings,
    apply_lora,
    autocast,
    begin_stage,
    build_optimizer,
    disable_dropout,
    freeze_bottom,
    length_grouped_order,
    prune_checkpoints,
    resolve_precision,
    resume_training,
    run_steps,
    save_training_state,
    total_steps,
    trainable_parameters,
)

__all__ = [
    "RewardConfig",
    "RewardEvalConfig",
    "RewardModel",
    "RewardScoreConfig",
    "evaluate_reward",
    "preference_loss",
    "score_file",
    "train_reward",
]

META_FILE = "palate_reward.json"


# --------------------------------------------------------------------------- the loss


def preference_loss(
    r_chosen: torch.Tensor,  # (B,) scores of the chosen responses
    r_rejected: torch.Tensor,  # (B,) scores of the rejected responses
    *,
    margin: torch.Tensor | None = None,  # (B,) ≥ 0: required score gap (strength of preference)
    prob_chosen: torch.Tensor | None = None,  # (B,) soft label P(chosen ≻ rejected), default 1
    tie: torch.Tensor | None = None,  # (B,) bool: rated equal → target 0.5, no margin
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:  # (B,) per-pair loss
    """Bradley-Terry loss per pair.

    With ``Δ = r_chosen − r_rejected − margin`` and target ``q`` (1 for a hard label, the vote
    fraction for a soft label, 0.5 for a tie), the loss is the binary cross-entropy
    ``−q·log σ(Δ) − (1−q)·log σ(−Δ)``; for a hard label that is ``−log σ(Δ)``. Ties drop the
    margin, so they pull the two scores together. Label smoothing ε (noisy raters) moves the
    target toward ½: ``q ← (1−ε)·q + ε·(1−q)``. ``center_coef`` adds
    ``c·(r_chosen + r_rejected)²``, which keeps scores near zero without changing the ranking.
    """
    q = torch.ones_like(r_chosen) if prob_chosen is None else prob_chosen.to(r_chosen)
    m = torch.zeros_like(r_chosen) if margin is None else margin.to(r_chosen)
    if tie is not None:
        tie = tie.to(torch.bool)
        q = torch.where(tie, torch.full_like(q, 0.5), q)
        m = torch.where(tie, torch.zeros_like(m), m)
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing * (1 - q)
    delta = r_chosen - r_rejected - m
    loss = -(q * F.logsigmoid(delta) + (1 - q) * F.logsigmoid(-delta))
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


# --------------------------------------------------------------------------- the model


def _backbone_kind(model: Any, tokenizer: Any) -> str:
    archs = getattr(model.config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if model.config.model_type in ("bert", "roberta", "deberta", "deberta-v2", "distilbert",
                                   "electra", "xlm-roberta", "mpnet", "modernbert"):  # fmt: skip
        return "encoder"
    return "encoder" if tokenizer.cls_token_id is not None else "causal"


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


class RewardModel:
    """A backbone with a scalar head, its tokenizer, and how to turn (prompt, response) into ids.

    ``score(prompts, responses)`` returns a float tensor of rewards (offset applied), batched;
    this is what PPO calls.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        kind: str,
        max_length: int = 512,
        offset: float = 0.0,
        base_spec: str | None = None,
        pooling: str = "cls",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.offset = offset
        self.base_spec = base_spec
        self.pooling = pooling
        self.precision = "fp32"

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_backbone(
        cls, spec: str, max_length: int = 512, pooling: str = "cls", head_init: str = "normal"
    ) -> RewardModel:
        """A fresh reward model: backbone ``spec`` plus a new scalar head.

        ``head_init``: ``normal`` (std 1/√(H+1)) or ``zero`` (every run starts from the same
        point, so models trained with different seeds can be weight-averaged).
        """
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
        try:
            model, tok = load_model(
                spec, auto_class=AutoModelForSequenceClassification, num_labels=1
            )
        finally:
            hf_logging.set_verbosity(level)
        kind = _backbone_kind(model, tok)
        model.config.pad_token_id = tok.pad_token_id
        head = _score_head(model)
        if head is not None:
            if head_init == "zero":
                torch.nn.init.zeros_(head.weight)
            else:
                torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
        if pooling == "mean" and (kind != "encoder" or _score_head(model) is None):
            raise ConfigError(
                f"pooling: mean needs an encoder backbone with a linear head; {spec} is {kind}"
            )
        return cls(model, tok, kind=kind, max_length=max_length, base_spec=spec, pooling=pooling)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardModel:
        """Load a reward model saved by :meth:`save` (``palate reward train`` writes ``final/``)."""
        from transformers import AutoModelForSequenceClassification

        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ModelLoadError(
                f"{path}: not a palate reward model (no {META_FILE}); train one with "
                "`palate reward train`"
            )
        meta = json.loads(meta_file.read_text())
        if "members" in meta:
            return RewardEnsemble.load(path, **kwargs)  # type: ignore[return-value]
        model, tok = load_model(
            str(path), auto_class=AutoModelForSequenceClassification, num_labels=1, **kwargs
        )
        model.eval()
        return cls(
            model,
            tok,
            kind=meta["kind"],
            max_length=meta["max_length"],
            offset=meta.get("offset", 0.0),
            base_spec=meta.get("base_spec"),
            pooling=meta.get("pooling", "cls"),
        )

    def save(self, path: str | Path) -> None:
        """Save as a plain HF sequence-classification model + tokenizer + palate metadata."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        meta = {
            "kind": self.kind,
            "max_length": self.max_length,
            "offset": self.offset,
            "base_spec": self.base_spec,
            "pooling": self.pooling,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    # ----------------------------------------------------------------- tokenization

    def encode(self, prompt: Prompt, response: str) -> Encoded:
        """Token ids for one (prompt, response); the prompt is truncated from the left."""
        tok, budget = self.tokenizer, self.max_length
        if self.kind == "causal":
            p, r = prompt_ids(tok, prompt), response_ids(tok, response)
            specials: tuple[list[int], list[int], list[int]] = ([], [], [])
        else:
            p = tok(prompt_text(prompt), add_special_tokens=False, verbose=False)["input_ids"]
            r = tok(response, add_special_tokens=False, verbose=False)["input_ids"]
            specials = ([tok.cls_token_id], [tok.sep_token_id], [tok.sep_token_id])
        budget -= sum(len(s) for s in specials)
        truncated = len(p) + len(r) > budget
        if truncated:
            keep_r = min(len(r), max(budget - min(len(p), budget // 4), budget // 2))
            r = r[:keep_r]
            p = p[len(p) - (budget - len(r)) :] if budget - len(r) > 0 else []
        if self.kind == "causal":
            return Encoded(p + r, None, truncated)
        cls_, sep1, sep2 = specials
        ids = cls_ + p + sep1 + r + sep2
        types = [0] * (len(cls_) + len(p) + len(sep1)) + [1] * (len(r) + len(sep2))
        return Encoded(ids, types, truncated)

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad (the score is read at the last non-pad token)."""
        width = max(len(e.input_ids) for e in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
            if e.token_type_ids is not None:
                types[i, : len(e.input_ids)] = torch.tensor(e.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "encoder":
            batch["token_type_ids"] = types
        return batch

    # ----------------------------------------------------------------- scoring

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw scores (no offset) for a collated batch: (N,).

        Causal LMs and ``pooling: cls`` encoders use the transformers head as it is. With
        ``pooling: mean`` an encoder's token states are averaged over the attention mask (how
        sentence-embedding models such as MiniLM were trained) and fed to the same head.
        """
        if self.kind == "encoder" and self.pooling == "mean":
            model = self.model
            if hasattr(model, "get_base_model"):
                model = model.get_base_model()
            encoder = getattr(model, model.base_model_prefix)
            hidden = encoder(**batch).last_hidden_state  # (N, T, H)
            m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            return _score_head(model)(pooled).squeeze(-1).float()  # type: ignore[misc]
        return self.model(**batch).logits.squeeze(-1).float()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that do the scoring (one here; K in an ensemble)."""
        return [self.model]

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards for each (prompt, response), offset applied: a float tensor of shape (N,)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was = self.model.training
        self.model.eval()
        enc = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        out = torch.empty(len(enc))
        try:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                batch = {
                    k: v.to(self.device) for k, v in self.collate([enc[j] for j in idx]).items()
                }
                with autocast(self.device, self.precision):
                    out[idx] = self.forward(batch).cpu()
        finally:
            self.model.train(was)
        return out + self.offset


class RewardEnsemble:
    """K reward models trained on the same comparisons from different seeds; the reward is the
    mean of their scores (plus one offset). Averaging cancels much of each member's
    seed-specific error: more accurate, better calibrated, and harder for PPO to exploit
    (Coste et al. 2023), at K times the scoring cost. Same interface as :class:`RewardModel`;
    ``RewardModel.load`` returns one when the directory holds an ensemble.
    """

    def __init__(self, members: Sequence[RewardModel], offset: float = 0.0):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.offset = offset

    @property
    def kind(self) -> str:
        return self.members[0].kind

    @property
    def tokenizer(self) -> Any:
        return self.members[0].tokenizer

    @property
    def model(self) -> Any:
        """The first member's model (what a critic initialised from the reward model copies)."""
        return self.members[0].model

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def precision(self) -> str:
        return self.members[0].precision

    @precision.setter
    def precision(self, value: str) -> None:
        for m in self.members:
            m.precision = value

    def modules(self) -> list[torch.nn.Module]:
        return [m.model for m in self.members]

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], *,
              batch_size: int = 16) -> torch.Tensor:  # fmt: skip
        """Mean of the members' rewards, plus the ensemble's offset: (N,)."""
        total = sum(m.score(prompts, responses, batch_size=batch_size) for m in self.members)
        return total / len(self.members) + self.offset  # type: ignore[operator]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        names = [f"member-{k}" for k in range(len(self.members))]
        for name, m in zip(names, self.members, strict=True):
            m.save(path / name)
        meta = {"kind": self.kind, "members": names, "offset": self.offset}
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardEnsemble:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        members = [RewardModel.load(path / name, **kwargs) for name in meta["members"]]
        return cls(members, offset=meta.get("offset", 0.0))


def _score_head(model: Any) -> torch.nn.Linear | None:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    return None


# --------------------------------------------------------------------------- configs


class RewardLossSettings(Config):
    """Loss options (see ``preference_loss``)."""

    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Move targets toward 1/2 by this much (noisy raters)."
    )
    center_coef: float = Field(
        0.0, ge=0, description="Weight of (r_chosen + r_rejected)^2, keeping scores near 0."
    )
    use_margin: bool = Field(
        True, description="Use each comparison's `margin` field as a Bradley-Terry margin."
    )


class RewardTrainSettings(TrainSettings):
    """Batching (in pairs), schedule and checkpointing for reward-model training."""

    batch_size: int = Field(8, ge=1, description="Comparison pairs per micro-batch (per process).")
    group_by_length: bool = Field(
        True, description="Batch pairs of similar length together (less padding, faster)."
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps as well as at each epoch end (0 = epochs)."
    )
    forward_chunks: int = Field(
        2,
        ge=1,
        description="Sort a batch's 2B sequences (chosen and rejected) by length and run them "
        "as this many forwards: less padding than one forward over all.",
    )


def _rm_optim() -> OptimSettings:
    return OptimSettings(lr=5e-5, warmup_ratio=0.1)


class RewardConfig(Config):
    """Config for ``palate reward train``."""

    model: str = Field("minilm-l6", description="Backbone spec (causal LM or encoder).")
    data: str = Field(description="Comparisons JSONL or HH-RLHF file.")
    eval_data: str | None = Field(
        None, description="Held-out comparisons; default: split eval_fraction off `data`."
    )
    eval_fraction: float = Field(
        0.2, ge=0, lt=1, description="Fraction of `data` held out (seeded) when no eval_data."
    )
    split_by: Literal["comparison", "prompt"] = Field(
        "comparison",
        description="Hold out comparisons at random, or whole prompts (every comparison of a "
        "held-out prompt: use it when prompts have several pairs, else held-out accuracy is "
        "optimistic).",
    )
    max_examples: int | None = Field(None, ge=1, description="Use only the first N comparisons.")
    output_dir: str = Field(description="Run directory.")
    seed: int = Field(0, description="Seed for the split, data order and the head's init.")
    split_seed: int | None = Field(
        None, description="Seed for the held-out split alone (default: `seed`)."
    )
    ensemble: int = Field(
        1,
        ge=1,
        description="Train this many models (seeds seed, seed+1, ...; same split) and average "
        "their scores: more accurate and calibrated, K times the cost.",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="Freeze the embeddings and the lowest N transformer blocks (full "
        "fine-tuning): faster steps, less forgetting on small preference sets.",
    )
    max_length: int = Field(
        384, ge=16, description="Max tokens per (prompt, response); prompts cut from the left."
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="Encoders: the model's [CLS] pooler (cls) or the mask-averaged token states "
        "(mean, how sentence-embedding models like MiniLM were trained).",
    )
    head_init: Literal["normal", "zero"] = Field(
        "normal",
        description="Scalar head init: normal (small random) or zero (seed-independent start).",
    )
    finetune: Literal["full", "lora"] = Field(
        "full", description="Train all weights (default) or LoRA adapters plus the head."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    optim: OptimSettings = Field(default_factory=_rm_optim, description="Optimiser.")
    loss: RewardLossSettings = Field(default_factory=RewardLossSettings, description="Loss.")
    train: RewardTrainSettings = Field(default_factory=RewardTrainSettings, description="Training.")
    normalize: bool = Field(
        True, description="Shift scores so the chosen training responses average 0."
    )
    normalize_examples: int = Field(
        256, ge=1, description="How many chosen training responses form that reference set."
    )
    tracker: str = Field("none", description="Experiment tracker: none, tensorboard, wandb, ...")
    resume: bool = Field(True, description="Continue from the newest checkpoint in output_dir.")


class RewardEvalConfig(Config):
    """Config for ``palate reward eval``."""

    model: str = Field(description="A trained reward model directory (e.g. RUN/final).")
    data: str = Field(description="Comparisons to evaluate on (JSONL or HH file).")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N comparisons.")
    batch_size: int = Field(16, ge=1, description="Sequences scored together.")
    bins: int = Field(10, ge=2, description="Bins for the expected calibration error.")
    output_dir: str | None = Field(None, description="Write eval.json (and nothing else) here.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Autocast for scoring.")


class RewardScoreConfig(Config):
    """Config for ``palate reward score``."""

    model: str = Field(description="A trained reward model directory (e.g. RUN/final).")
    data: str = Field(description="JSONL of {prompt, response} rows to score.")
    output: str = Field(description="Output JSONL: the input rows plus a `reward` field.")
    batch_size: int = Field(16, ge=1, description="Sequences scored together.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Autocast for scoring.")


# --------------------------------------------------------------------------- data


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    margin: float
    prob_chosen: float
    tie: bool

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _encode_pairs(
    rm: RewardModel, comps: Sequence[Comparison], use_margin: bool
) -> list[EncodedPair]:
    return [
        EncodedPair(
            rm.encode(c.prompt, c.chosen),
            rm.encode(c.prompt, c.rejected),
            c.margin if use_margin else 0.0,
            1.0 if c.prob_chosen is None else c.prob_chosen,
            c.tie,
        )
        for c in comps
    ]


def _pair_scores(
    rm: RewardModel, pairs: Sequence[EncodedPair], chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from ``chunks`` forwards over the 2B sequences.

    The sequences are sorted by length and cut into ``chunks`` groups, so each forward pads
    only to its own longest sequence.
    """
    items = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    size = math.ceil(len(items) / max(1, min(chunks, len(items))))
    parts = []
    for start in range(0, len(order), size):
        batch = rm.collate([items[i] for i in order[start : start + size]])
        parts.append(rm.forward({k: v.to(rm.device) for k, v in batch.items()}))
    scores = torch.cat(parts)[torch.argsort(torch.tensor(order, device=parts[0].device))]
    return scores[: len(pairs)], scores[len(pairs) :]


def _split(cfg: RewardConfig) -> tuple[list[Comparison], list[Comparison]]:
    comps = list(read_records(cfg.data, "comparisons").records)[: cfg.max_examples]
    if cfg.eval_data:
        return comps, list(read_records(cfg.eval_data, "comparisons").records)
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    by_prompt = cfg.split_by == "prompt"
    return split_heldout(comps, cfg.eval_fraction, seed,
                         group=(lambda c: prompt_text(c.prompt)) if by_prompt else None)  # fmt: skip


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _score_pairs(
    rm: RewardModel, comps: Sequence[Comparison], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    prompts = [c.prompt for c in comps]
    sc = rm.score(prompts + prompts, [c.chosen for c in comps] + [c.rejected for c in comps],
                  batch_size=batch_size).numpy()  # fmt: skip
    return sc[: len(comps)], sc[len(comps) :]


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE: Σ_bins (n_b/N)·|mean predicted − mean observed| with equal-width bins on [0, 1]."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def preference_metrics(
    comps: Sequence[Comparison],
    r_c: np.ndarray,
    r_r: np.ndarray,
    tokenizer: Any,
    bins: int = 10,
) -> dict[str, Any]:
    """Accuracy, margin, calibration and length-bias checks for scored comparisons."""
    from scipy.stats import spearmanr

    tie = np.array([c.tie for c in comps], dtype=bool)
    q = np.array(
        [0.5 if c.tie else (1.0 if c.prob_chosen is None else c.prob_chosen) for c in comps]
    )
    delta = r_c - r_r
    decided = ~tie & (q != 0.5)
    correct = (delta > 0) == (q > 0.5)
    # Calibration: each pair in both orientations, so "observed" is not always 1.
    p = 1 / (1 + np.exp(-np.concatenate([delta, -delta])))
    y = np.concatenate([q, 1 - q])
    len_c = np.array(
        [len(tokenizer(c.chosen, add_special_tokens=False)["input_ids"]) for c in comps]
    )
    len_r = np.array(
        [len(tokenizer(c.rejected, add_special_tokens=False)["input_ids"]) for c in comps]
    )
    rewards = np.concatenate([r_c, r_r])
    lengths = np.concatenate([len_c, len_r])
    rho = spearmanr(rewards, lengths).statistic if len(set(lengths)) > 1 else float("nan")
    rej_longer = decided & (len_r > len_c)
    ch_longer = decided & (len_c > len_r)

    def acc(sel: np.ndarray) -> float | None:
        return float(correct[sel].mean()) if sel.any() else None

    return {
        "pairs": len(comps),
        "accuracy": acc(decided),
        "mean_margin": float(delta[decided].mean()) if decided.any() else None,
        "ece": expected_calibration_error(p, y, bins),
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std()),
        "tie_pairs": int(tie.sum()),
        "length_reward_spearman": float(rho),
        "accuracy_rejected_longer": acc(rej_longer),
        "pairs_rejected_longer": int(rej_longer.sum()),
        "accuracy_chosen_longer": acc(ch_longer),
        "pairs_chosen_longer": int(ch_longer.sum()),
        "chosen_longer_fraction": float((len_c > len_r)[decided].mean()) if decided.any() else None,
    }


def evaluate_reward(cfg: RewardEvalConfig) -> dict[str, Any]:
    """``palate reward eval``: score held-out comparisons and report accuracy, ECE, length bias."""
    rm = RewardModel.load(cfg.model)
    rm.precision = resolve_precision(cfg.precision, rm.device)
    comps = list(read_records(cfg.data, "comparisons").records)[: cfg.max_examples]
    r_c, r_r = _score_pairs(rm, comps, cfg.batch_size)
    summary = {"stage": "reward-eval", "model": cfg.model, "data": cfg.data}
    summary.update(preference_metrics(comps, r_c, r_r, rm.tokenizer, cfg.bins))
    if cfg.output_dir:
        run = RunDir(cfg.output_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        from palate.data import atomic_write

        with atomic_write(run.path / "eval.json") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def score_file(cfg: RewardScoreConfig) -> dict[str, Any]:
    """``palate reward score``: add a ``reward`` field to every {prompt, response} row."""
    rm = RewardModel.load(cfg.model)
    rm.precision = resolve_precision(cfg.precision, rm.device)
    demos: list[Demonstration] = list(read_records(cfg.data, "demonstrations").records)
    rewards = rm.score([d.prompt for d in demos], [d.response for d in demos],
                       batch_size=cfg.batch_size)  # fmt: skip
    rows = []
    for d, r in zip(demos, rewards.tolist(), strict=True):
        row = d.model_dump(mode="json", exclude_defaults=True)
        row["reward"] = r
        rows.append(row)
    write_jsonl(cfg.output, rows)
    return {
        "stage": "reward-score",
        "output": cfg.output,
        "rows": len(rows),
        "mean_reward": float(rewards.mean()) if rows else None,
        "std_reward": float(rewards.std()) if len(rows) > 1 else None,
    }


# --------------------------------------------------------------------------- training


def train_reward(cfg: RewardConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """``palate reward train``: Bradley-Terry training, normalisation, held-out evaluation."""
    if cfg.ensemble > 1:
        return _train_ensemble(cfg, stop_after=stop_after)
    acc, run, device, precision = begin_stage(cfg, cfg.train.precision)

    train_c, eval_c = _split(cfg)
    if not train_c:
        raise ConfigError(f"{cfg.data}: no training comparisons left after the held-out split")
    if acc.is_main_process and eval_c and not cfg.eval_data:
        write_jsonl(run.path / "heldout.jsonl", eval_c)

    rm = RewardModel.from_backbone(cfg.model, cfg.max_length, cfg.pooling, cfg.head_init)
    disable_dropout(rm.model)
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if cfg.finetune == "lora":
        rm.model = apply_lora(rm.model, cfg.lora, task_type="SEQ_CLS")
    else:
        freeze_bottom(rm.model, cfg.freeze_layers)
    if ckpt is not None:
        from safetensors.torch import load_file

        state_dict = load_file(ckpt / "trainable.safetensors")
        missing = set(state_dict) - {n for n, _ in rm.model.named_parameters()}
        if missing:
            raise ConfigError(
                f"{ckpt}: checkpoint does not match the model ({sorted(missing)[:3]})"
            )
        rm.model.load_state_dict(state_dict, strict=False)
    rm.model.train()
    rm.precision = precision

    train_p = _encode_pairs(rm, train_c, cfg.loss.use_margin)
    eval_p = _encode_pairs(rm, eval_c, cfg.loss.use_margin)
    n_trunc = sum(p.chosen.truncated or p.rejected.truncated for p in train_p + eval_p)
    if n_trunc and acc.is_main_process:
        console.print(
            f"[yellow]{n_trunc} of {len(train_p) + len(eval_p)} pairs truncated to "
            f"max_length={cfg.max_length} (prompt from the left; responses kept whole when they fit)"
        )

    world = acc.num_processes
    steps = total_steps(cfg.train, len(train_p), world)
    params = trainable_parameters(rm.model)
    optimizer, scheduler = build_optimizer(params, cfg.optim, steps)
    rm.model, optimizer = acc.prepare(rm.model, optimizer)

    step, metrics = resume_training(
        acc=acc, run=run, ckpt=ckpt, optimizer=optimizer, scheduler=scheduler, total=steps,
        tracker=cfg.tracker, project="palate-reward", cfg=cfg,
    )  # fmt: skip

    @torch.no_grad()
    def do_eval() -> dict[str, float]:
        if not eval_p:
            return {}
        was = rm.model.training
        rm.model.eval()
        losses, correct, n = 0.0, 0, 0
        try:
            bs = cfg.train.batch_size * 2
            order = sorted(range(len(eval_p)), key=lambda i: eval_p[i].length)
            for i in range(0, len(order), bs):
                chunk = [eval_p[j] for j in order[i : i + bs]]
                with autocast(device, precision):
                    r_c, r_r = _pair_scores(rm, chunk, cfg.train.forward_chunks)
                losses += float(_loss(chunk, r_c, r_r).sum())
                decided = [not p.tie and p.prob_chosen != 0.5 for p in chunk]
                ok = (r_c > r_r) == torch.tensor([p.prob_chosen > 0.5 for p in chunk])
                correct += int(ok[torch.tensor(decided)].sum())
                n += sum(decided)
        finally:
            rm.model.train(was)
        return {"eval/loss": losses / len(eval_p), "eval/accuracy": correct / max(n, 1)}

    def _loss(chunk: list[EncodedPair], r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
        return preference_loss(
            r_c,
            r_r,
            margin=torch.tensor([p.margin for p in chunk], device=r_c.device),
            prob_chosen=torch.tensor([p.prob_chosen for p in chunk], device=r_c.device),
            tie=torch.tensor([p.tie for p in chunk], device=r_c.device),
            label_smoothing=cfg.loss.label_smoothing,
            center_coef=cfg.loss.center_coef,
        )

    def checkpoint(at: int) -> None:
        if not acc.is_main_process:
            return
        from safetensors.torch import save_file

        path = run.checkpoint_dir(at)
        path.mkdir(parents=True, exist_ok=True)
        model = acc.unwrap_model(rm.model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                     if p.requires_grad}  # fmt: skip
        save_file(trainable, path / "trainable.safetensors")
        save_training_state(
            path,
            optimizer=optimizer,
            scheduler=scheduler,
            state={"step": at, "total_steps": steps, "stage": "reward"},
        )
        prune_checkpoints(run.checkpoints, cfg.train.keep_checkpoints)

    eval_start = do_eval() if step == 0 else {}
    if eval_start:
        metrics.log(0, eval_start)

    def loss_sum(mb: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        chunk = [train_p[j] for j in mb]
        with autocast(device, precision):
            r_c, r_r = _pair_scores(rm, chunk, cfg.train.forward_chunks)
        loss = _loss(chunk, r_c, r_r)
        r_c, r_r = r_c.detach(), r_r.detach()
        return loss.sum(), {
            "correct": float((r_c > r_r).sum()),
            "margin": float((r_c - r_r).sum()),
            "reward": float((r_c + r_r).sum() / 2),
        }

    last_eval: dict[str, float] = {}
    pairs_seen = 0

    def after_step(at: int, epoch_done: bool, stats: dict[str, float], dt: float) -> dict:
        nonlocal last_eval, pairs_seen
        n = stats["units"]
        pairs_seen += int(n * world)
        row: dict[str, Any] = {
            "train/accuracy": stats["correct"] / n,
            "train/margin": stats["margin"] / n,
            "train/mean_reward": stats["reward"] / n,
            "train/pairs_per_s": n * world / dt,
        }
        if epoch_done or (cfg.train.eval_every and at % cfg.train.eval_every == 0):
            last_eval = do_eval()
            row.update(last_eval)
        return row

    if cfg.train.group_by_length:
        lengths = [p.length for p in train_p]

        def order(epoch: int) -> list[int]:
            return length_grouped_order(lengths, cfg.train.batch_size, cfg.seed, epoch)
    else:
        from palate.training import epoch_order

        def order(epoch: int) -> list[int]:
            return epoch_order(len(train_p), cfg.seed, epoch)

    result = run_steps(
        acc=acc,
        model=rm.model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        settings=cfg.train,
        max_grad_norm=cfg.optim.max_grad_norm,
        order=order,
        n_examples=len(train_p),
        start_step=step,
        units=len,
        loss_sum=loss_sum,
        after_step=after_step,
        checkpoint=checkpoint,
        metrics=metrics,
        desc="reward",
        stop_after=stop_after,
    )
    metrics.close()
    summary: dict[str, Any] = {
        "stage": "reward",
        "output_dir": str(run.path),
        "steps": result.step,
        "total_steps": steps,
        "train_pairs": len(train_p),
        "eval_pairs": len(eval_p),
        "train_loss": result.last.get("train/loss"),
        "eval_accuracy_before": eval_start.get("eval/accuracy"),
        "pairs_per_s": pairs_seen / result.seconds if result.seconds else None,
        "train_seconds": result.seconds,
        "precision": precision,
        "truncated_pairs": n_trunc,
    }
    if result.stopped:
        summary["stopped_at"] = result.step
        return summary
    rm.model = acc.unwrap_model(rm.model)
    rm.model.eval()
    if cfg.normalize:
        ref = train_c[: cfg.normalize_examples]
        rm.offset = 0.0
        raw = rm.score([c.prompt for c in ref], [c.chosen for c in ref])
        rm.offset = -float(raw.mean())
    summary["offset"] = rm.offset
    if acc.is_main_process:
        rm.save(run.final)
        summary["final"] = str(run.final)
        if eval_c:
            r_c, r_r = _score_pairs(rm, eval_c, cfg.train.batch_size * 2)
            heldout = preference_metrics(eval_c, r_c, r_r, rm.tokenizer)
            summary.update({f"eval_{k}": v for k, v in heldout.items()})
        run.write_summary(summary)
    acc.end_training()
    return summary


def _train_ensemble(cfg: RewardConfig, *, stop_after: int | None) -> dict[str, Any]:
    """Train ``cfg.ensemble`` members in ``RUN/members/member-k`` (each resumable on its own),
    then normalise, save and evaluate their average as ``RUN/final``."""
    run = RunDir(cfg.output_dir)
    run.create(cfg)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    members: list[dict[str, Any]] = []
    for k in range(cfg.ensemble):
        sub = cfg.model_copy(update={
            "ensemble": 1, "seed": cfg.seed + k, "split_seed": split_seed,
            "output_dir": str(run.path / "members" / f"member-{k}"),
        })  # fmt: skip
        done = Path(sub.output_dir, "summary.json")
        if done.is_file() and Path(sub.output_dir, "final", META_FILE).is_file():
            members.append(json.loads(done.read_text()))
            continue
        console.print(f"ensemble member {k + 1}/{cfg.ensemble} (seed {sub.seed})")
        summary = train_reward(sub, stop_after=stop_after)
        if "stopped_at" in summary:
            return {"stage": "reward", "output_dir": str(run.path), "member": k, **summary}
        members.append(summary)
    ens = RewardEnsemble([RewardModel.load(Path(m["final"])) for m in members])
    ens.precision = resolve_precision(cfg.train.precision, ens.device)
    train_c, eval_c = _split(cfg)  # the members' split (split_seed, else seed)
    if cfg.normalize:
        ref = train_c[: cfg.normalize_examples]
        ens.offset = -float(ens.score([c.prompt for c in ref], [c.chosen for c in ref]).mean())
    ens.save(run.final)
    summary: dict[str, Any] = {
        "stage": "reward",
        "output_dir": str(run.path),
        "final": str(run.final),
        "ensemble": cfg.ensemble,
        "train_pairs": len(train_c),
        "eval_pairs": len(eval_c),
        "train_seconds": sum(m.get("train_seconds") or 0 for m in members),
        "member_eval_accuracy": [m.get("eval_accuracy") for m in members],
        "offset": ens.offset,
        "truncated_pairs": members[0].get("truncated_pairs"),
        "precision": ens.precision,
    }
    if eval_c:
        if not cfg.eval_data:
            write_jsonl(run.path / "heldout.jsonl", eval_c)
        r_c, r_r = _score_pairs(ens, eval_c, cfg.train.batch_size * 2)  # type: ignore[arg-type]
        summary.update({f"eval_{k}": v for k, v in preference_metrics(
            eval_c, r_c, r_r, ens.tokenizer).items()})  # fmt: skip
    run.write_summary(summary)
    return summary
