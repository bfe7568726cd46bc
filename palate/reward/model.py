"""The reward model PPO and raters load: a backbone with a scalar head, and ensembles of them.

A reward model is any Hugging Face backbone with a scalar head
(``AutoModelForSequenceClassification``, ``num_labels=1``): causal LMs are scored at the last
real token of prompt + response (the EOS we append; padding is a distinct token), encoders such
as ``minilm-l6`` by their pooled ``[CLS]`` embedding of the (prompt, response) pair (or the
mask-averaged token states with ``pooling: mean``, the closing ``[SEP]`` state with ``last``,
their sum with ``mean_last``). ``score`` applies the stored gain and offset
(fitted so the initial policy's rewards have mean 0 and std 1), so PPO sees normalised rewards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from palate.data import Comparison, Prompt, prompt_text
from palate.errors import ConfigError, ModelLoadError
from palate.formatting import prompt_ids, response_ids
from palate.lm import in_length_groups
from palate.models import load_model
from palate.training import autocast

__all__ = [
    "META_FILE",
    "ScoreFn",
    "Encoded",
    "EncodedPair",
    "RewardEnsemble",
    "RewardModel",
    "RewardModelScorer",
    "encode_pairs",
    "forward_pairs",
    "load_reward_model",
]

META_FILE = "palate_reward.json"

# What a reward model, a reward function, a gold preference or a judge is to the rest of palate:
# score(prompts, responses) -> one score per response (higher is better).
ScoreFn = Callable[[Sequence[Prompt], Sequence[str]], "Sequence[float] | torch.Tensor"]


def _backbone_kind(model: Any, tokenizer: Any) -> str:
    archs = getattr(model.config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if model.config.model_type in (
        "bert",
        "roberta",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "xlm-roberta",
        "mpnet",
        "modernbert",
    ):
        return "encoder"
    return "encoder" if tokenizer.cls_token_id is not None else "causal"


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


class RewardModel:
    """A backbone with a scalar head, its tokenizer, and how to turn (prompt, response) into ids.

    ``score(prompts, responses)`` returns a float tensor of rewards, ``gain · raw + offset``,
    batched; this is what PPO calls. ``gain`` and ``offset`` are the normalisation fitted after
    training (:mod:`palate.reward.normalize`) and saved with the model.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        kind: str,
        max_length: int = 512,
        offset: float = 0.0,
        gain: float = 1.0,
        base_spec: str | None = None,
        pooling: str = "cls",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.offset = offset
        self.gain = gain
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
        if pooling != "cls" and (kind != "encoder" or _score_head(model) is None):
            raise ConfigError(
                f"pooling: {pooling} needs an encoder backbone with a linear head; {spec} is {kind}"
            )
        return cls(model, tok, kind=kind, max_length=max_length, base_spec=spec, pooling=pooling)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardModel:
        """Load one reward model saved by :meth:`save` (see :func:`load_reward_model`)."""
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
            raise ModelLoadError(f"{path}: an ensemble; load it with load_reward_model")
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
            gain=meta.get("gain", 1.0),
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
            "gain": self.gain,
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
        sentence-embedding models such as MiniLM were trained) and fed to the same head;
        ``last`` feeds the closing ``[SEP]`` state (it attends to how the reply ends, and its
        position embedding says how long the input is: what mean pooling dilutes), and
        ``mean_last`` the sum of the two.
        """
        if self.kind == "encoder" and self.pooling != "cls":
            model = self.model
            if hasattr(model, "get_base_model"):
                model = model.get_base_model()
            encoder = getattr(model, model.base_model_prefix)
            hidden = encoder(**batch).last_hidden_state  # (N, T, H)
            mask = batch["attention_mask"]  # (N, T), right-padded
            pooled = torch.zeros_like(hidden[:, 0])  # (N, H)
            if self.pooling in ("mean", "mean_last"):
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = pooled + (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            if self.pooling in ("last", "mean_last"):  # each row's closing [SEP]
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                pooled = pooled + hidden[rows, mask.sum(1) - 1]
            head = _score_head(model)
            assert head is not None  # checked by from_backbone
            return head(pooled).squeeze(-1).float()
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
        """Rewards ``gain · raw + offset`` for each (prompt, response): a float tensor (N,)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was = self.model.training
        self.model.eval()
        enc, where = unique_encodings(
            [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        )  # each distinct sequence scored once; where: (N,) its row
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
        return out[where] * self.gain + self.offset


class RewardEnsemble:
    """K reward models trained on the same comparisons from different seeds; the reward is the
    mean of their raw scores, times one gain, plus one offset. Averaging cancels much of each member's
    seed-specific error: more accurate, better calibrated, and harder for PPO to exploit
    (Coste et al. 2023), at K times the scoring cost. Same interface as :class:`RewardModel`;
    ``RewardModel.load`` returns one when the directory holds an ensemble.
    """

    def __init__(self, members: Sequence[RewardModel], offset: float = 0.0, gain: float = 1.0):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.offset = offset
        self.gain = gain

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
    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], *, batch_size: int = 16
    ) -> torch.Tensor:
        """``gain · (mean of the members' rewards) + offset``: (N,)."""
        total = self.members[0].score(prompts, responses, batch_size=batch_size)
        for m in self.members[1:]:
            total = total + m.score(prompts, responses, batch_size=batch_size)
        return total / len(self.members) * self.gain + self.offset

    def save(self, path: str | Path) -> None:
        path = Path(path)
        names = [f"member-{k}" for k in range(len(self.members))]
        for name, m in zip(names, self.members, strict=True):
            m.save(path / name)
        meta = {"kind": self.kind, "members": names, "offset": self.offset, "gain": self.gain}
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardEnsemble:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        members = [RewardModel.load(path / name, **kwargs) for name in meta["members"]]
        return cls(members, offset=meta.get("offset", 0.0), gain=meta.get("gain", 1.0))


class RewardModelScorer:
    """A reward model (or ensemble) as a :data:`ScoreFn`: PPO's reward, evaluation's proxy."""

    def __init__(self, reward_model: RewardModel | RewardEnsemble, batch_size: int = 16):
        self.reward_model = reward_model
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return self.reward_model.score(prompts, responses, batch_size=self.batch_size)


def load_reward_model(path: str | Path, **kwargs: Any) -> RewardModel | RewardEnsemble:
    """Load what ``palate reward train`` wrote to ``final/``: one model, or an ensemble."""
    meta_file = Path(path) / META_FILE
    if meta_file.is_file() and "members" in json.loads(meta_file.read_text()):
        return RewardEnsemble.load(path, **kwargs)
    return RewardModel.load(path, **kwargs)


def _score_head(model: Any) -> torch.nn.Linear | None:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    return None


# --------------------------------------------------------------------------- pairs


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    margin: float
    prob_chosen: float
    tie: bool
    weight: float = 1.0  # loss weight (the comparison's source weight)

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def encode_pairs(
    rm: RewardModel,
    comps: Sequence[Comparison],
    use_margin: bool,
    source_weights: Mapping[Any, float] | None = None,
) -> list[EncodedPair]:
    weights = source_weights or {}
    return [
        EncodedPair(
            rm.encode(c.prompt, c.chosen),
            rm.encode(c.prompt, c.rejected),
            c.margin if use_margin else 0.0,
            1.0 if c.prob_chosen is None else c.prob_chosen,
            c.tie,
            weights.get(c.source, 1.0),
        )
        for c in comps
    ]


def forward_pairs(
    rm: RewardModel, pairs: Sequence[EncodedPair], chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), raw scores with the graph kept (training).

    The 2B sequences are sorted by length and run as ``chunks`` forwards, each padded only to
    its own longest sequence (:func:`palate.lm.in_length_groups`).
    """
    # A reply in several pairs (K replies to a prompt make K(K-1)/2 pairs) is encoded once and
    # its score shared: the same loss and gradients as encoding it in every pair.
    items, where = unique_encodings([p.chosen for p in pairs] + [p.rejected for p in pairs])

    def forward(rows: torch.Tensor) -> tuple[torch.Tensor]:
        batch = rm.collate([items[i] for i in rows.tolist()])
        return (rm.forward({k: v.to(rm.device) for k, v in batch.items()}),)

    lengths = torch.tensor([len(e.input_ids) for e in items])
    (unique,) = in_length_groups(forward, lengths, chunks)  # (U,) one score per distinct sequence
    assert unique is not None
    scores = unique[where.to(unique.device)]  # (2B,)
    return scores[: len(pairs)], scores[len(pairs) :]


def unique_encodings(items: Sequence[Encoded]) -> tuple[list[Encoded], torch.Tensor]:
    """(the distinct sequences in first-seen order, (N,) index of each item among them)."""
    seen: dict[tuple[tuple[int, ...], tuple[int, ...] | None], int] = {}
    unique: list[Encoded] = []
    where = []
    for e in items:
        key = (tuple(e.input_ids), None if e.token_type_ids is None else tuple(e.token_type_ids))
        if key not in seen:
            seen[key] = len(unique)
            unique.append(e)
        where.append(seen[key])
    return unique, torch.tensor(where, dtype=torch.long)
