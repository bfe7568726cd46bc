"""``palate label create`` / ``palate label export`` / ``palate label user``: campaigns from files
or from a model's samples, exports that ``palate reward train`` reads directly."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from palate.config import Config
from palate.data import (
    Comparison,
    PairRecord,
    Prompt,
    format_validation_error,
    prompt_json,
    read_records,
    write_jsonl,
)
from palate.errors import ConfigError, DataError
from palate.label.db import ANSWERS, Answer, Campaign, open_db
from palate.label.quality import (
    QualitySettings,
    flagged_raters,
    group_stats,
    label_rows,
    rater_attributes,
    rater_quality,
)
from palate.label.store import (
    MAX_OVERLAP,
    PairIn,
    change_access,
    create_campaign,
    create_user,
    export_rows,
    user_by_name,
)
from palate.models import load_model
from palate.sampling import SamplingConfig, generate_responses

if TYPE_CHECKING:  # torch is imported only when sampling
    from palate.sampling import Generated, SamplingConfig


class LabelCreateConfig(Config):
    """Config for ``palate label create``."""

    db: str = Field(description="Database URL (postgresql://...) or a SQLite file path.")
    name: str = Field(description="Campaign name (unique).")
    pairs: str | None = Field(
        None,
        description="Ready pairs: JSONL rows {prompt, response_a, response_b[, gold, source_a, "
        "source_b]} or comparisons {prompt, chosen, rejected}.",
    )
    prompts: str | None = Field(None, description="Or prompts to sample pairs for, with `model`.")
    model: str | None = Field(None, description="Model that samples the responses (with prompts).")
    samples_per_prompt: int = Field(2, ge=2, description="k responses per prompt → k/2 pairs.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    max_new_tokens: int = Field(128, ge=1, description="Sampling length.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    overlap: int = Field(1, ge=1, le=MAX_OVERLAP, description="Raters per pair.")
    assignment_timeout_minutes: int = Field(
        30,
        ge=1,
        description="An open assignment not answered within this is released to other raters.",
    )
    guidelines: str | None = Field(None, description="Markdown file shown to raters.")
    answers: list[Answer] = Field(
        default_factory=lambda: list(ANSWERS), description="Allowed answers."
    )
    gold: str | None = Field(
        None, description="Honeypot pairs with known answers: JSONL like `pairs` with `gold`."
    )

    @model_validator(mode="after")
    def _source(self) -> LabelCreateConfig:
        if (self.pairs is None) == (self.prompts is None):
            raise ValueError("set exactly one of pairs and prompts")
        if self.prompts is not None and self.model is None:
            raise ValueError("prompts needs model (the policy that samples responses)")
        return self


def _read_pairs(path: str) -> list[PairIn]:
    return parse_pairs(Path(path).read_text(), path)


def parse_pairs(text: str, name: str = "pairs") -> list[PairIn]:
    """JSONL rows {prompt, response_a, response_b[, gold, source_a, source_b, id, metadata]} or
    comparisons {prompt, chosen, rejected, ...}, validated as ``palate data validate`` does:
    the first bad row raises a DataError naming the line and the field."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{n}: not JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise DataError(f"{name}:{n}: expected a JSON object, got {type(row).__name__}")
        try:
            if {"chosen", "rejected"} <= set(row) and "response_a" not in row:
                c = Comparison.model_validate({k: v for k, v in row.items() if k != "gold"})
                record = PairRecord(
                    prompt=c.prompt,
                    response_a=c.chosen,
                    response_b=c.rejected,
                    gold=row.get("gold"),
                    metadata=c.metadata,
                )
            elif "response_a" in row or "response_b" in row:
                record = PairRecord.model_validate(row)
            else:
                raise DataError(
                    f"{name}:{n}: expected prompt with response_a/response_b (or chosen/rejected)"
                )
        except ValidationError as err:
            raise DataError(f"{name}:{n}: {format_validation_error(err)}") from err
        out.append(
            PairIn(
                prompt=prompt_json(record.prompt),
                response_a=record.response_a,
                response_b=record.response_b,
                source_a=record.source_a,
                source_b=record.source_b,
                gold=record.gold,
                meta=record.metadata,
            )
        )
    if not out:
        raise DataError(f"{name}: no pairs (the file is empty)")
    return out


def pair_indices(k: int, pairing: str) -> list[tuple[int, int]]:
    """Which of a prompt's k responses are compared: all k(k-1)/2 pairs, or disjoint ones."""
    if pairing == "all":
        return [(a, b) for a in range(k) for b in range(a + 1, k)]
    return [(a, a + 1) for a in range(0, k - 1, 2)]


def sample_pairs(
    model: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    k: int,
    pairing: str = "disjoint",
    source: str = "",
    batch_size: int = 8,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[PairIn], list[Generated]]:
    """Sample k responses per prompt and pair them (:func:`pair_indices`); returns the pairs
    and every generation (for token/EOS statistics)."""

    many = [p for p in prompts for _ in range(k)]
    gens = generate_responses(
        model, tok, many, sampling, batch_size=batch_size, precision=precision, on_batch=on_batch
    )
    pairs = []
    for j, p in enumerate(prompts):
        texts = [g.text for g in gens[j * k : (j + 1) * k]]
        for a, b in pair_indices(k, pairing):
            pairs.append(
                PairIn(
                    prompt=prompt_json(p),
                    response_a=texts[a],
                    response_b=texts[b],
                    source_a=source,
                    source_b=source,
                )
            )
    return pairs, gens


def _sampled_pairs(cfg: LabelCreateConfig) -> list[PairIn]:

    # LabelCreateConfig's validator guarantees both when `pairs` is not set.
    assert cfg.prompts is not None and cfg.model is not None
    prompts = [r.prompt for r in read_records(cfg.prompts, "prompts").records]
    prompts = prompts[: cfg.max_prompts]
    model, tok = load_model(cfg.model)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    k = cfg.samples_per_prompt - cfg.samples_per_prompt % 2
    return sample_pairs(model, tok, prompts, sampling, k=k, source=str(cfg.model))[0]


def create_label_campaign(cfg: LabelCreateConfig) -> dict[str, Any]:
    """Build the campaign (reads and validates everything before writing anything)."""
    pairs = _read_pairs(cfg.pairs) if cfg.pairs else _sampled_pairs(cfg)
    gold = _read_pairs(cfg.gold) if cfg.gold else []
    if any(g.gold is None for g in gold):
        raise DataError(f"{cfg.gold}: every gold pair needs a `gold` answer")
    guidelines = Path(cfg.guidelines).read_text() if cfg.guidelines else ""
    factory = open_db(cfg.db)
    with factory() as db:
        camp = create_campaign(
            db,
            cfg.name,
            pairs + gold,
            overlap=cfg.overlap,
            guidelines=guidelines,
            answers=cfg.answers,
            source=str(cfg.model or cfg.pairs)[:200],
            assignment_timeout_s=cfg.assignment_timeout_minutes * 60,
        )
        return {
            "stage": "label-create",
            "campaign": camp.name,
            "campaign_id": camp.id,
            "pairs": len(pairs),
            "gold_pairs": len(gold),
            "overlap": cfg.overlap,
        }


class LabelExportConfig(Config):
    """Config for ``palate label export``."""

    db: str = Field(description="Database URL or SQLite file path.")
    campaign: str = Field(description="Campaign name.")
    output: str = Field(
        description="Comparisons JSONL to write (what `palate reward train` reads)."
    )
    aggregate: Literal["majority", "reliability"] = Field(
        "majority",
        description="A pair's label: the vote fraction (majority), or the Dawid-Skene "
        "posterior with each rater weighted by their estimated reliability.",
    )
    drop_flagged: bool = Field(
        False, description="Leave out the raters the quality checks flag (`palate label quality`)."
    )
    quality: QualitySettings = Field(
        default_factory=QualitySettings, description="When a rater is flagged."
    )


def _campaign(db: Any, cfg_db: str, name: str) -> Campaign:
    from sqlalchemy import select

    camp = db.scalar(select(Campaign).where(Campaign.name == name))
    if camp is None:
        raise ConfigError(f"{cfg_db}: no campaign named {name!r}")
    return camp


def export_label_campaign(cfg: LabelExportConfig) -> dict[str, Any]:

    factory = open_db(cfg.db)
    with factory() as db:
        camp = _campaign(db, cfg.db, cfg.campaign)
        drop = flagged_raters(db, [camp.id], cfg.quality) if cfg.drop_flagged else []
        rows = export_rows(db, camp, aggregate=cfg.aggregate, drop_raters=drop)
    write_jsonl(cfg.output, rows)
    return {
        "stage": "label-export",
        "campaign": cfg.campaign,
        "comparisons": len(rows),
        "aggregate": cfg.aggregate,
        "dropped_raters": drop,
        "output": cfg.output,
    }


class LabelQualityConfig(Config):
    """Config for ``palate label quality``."""

    db: str = Field(description="Database URL or SQLite file path.")
    campaign: str = Field(description="Campaign name.")
    quality: QualitySettings = Field(
        default_factory=QualitySettings, description="When a rater is flagged."
    )


def label_quality(cfg: LabelQualityConfig) -> dict[str, Any]:
    """Each rater's gold accuracy, Dawid-Skene reliability, side and speed shares, flags; and
    the rater populations (agreement within and between groups of each attribute)."""

    factory = open_db(cfg.db)
    with factory() as db:
        camp = _campaign(db, cfg.db, cfg.campaign)
        rows = label_rows(db, [camp.id])
        attributes = rater_attributes(db)
    quality = rater_quality(rows, cfg.quality, attributes)
    raters = {r: attributes.get(r, {}) for r in quality}
    return {
        "stage": "label-quality",
        "campaign": cfg.campaign,
        "labels": len(rows),
        "flagged": sorted(r for r, q in quality.items() if q.flags),
        "raters": [q.as_dict() | {"attributes": raters[r]} for r, q in quality.items()],
        "populations": group_stats(rows, raters),
    }


class LabelUserConfig(Config):
    """Config for ``palate label user``."""

    db: str = Field(description="Database URL or SQLite file path.")
    name: str = Field(description="User name (unique).")
    role: Literal["rater", "admin"] = Field("rater", description="rater or admin.")
    password: str | None = Field(None, description="Password (else log in with the invite link).")
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="What you record about the rater, e.g. {region: EU, language: de} (the "
        "dashboard compares groups by each attribute).",
    )


def add_label_user(cfg: LabelUserConfig) -> dict[str, Any]:
    factory = open_db(cfg.db)
    with factory() as db:
        user, invite, api = create_user(
            db, cfg.name, cfg.role, cfg.password, attributes=cfg.attributes
        )
    return {
        "stage": "label-user",
        "name": user.name,
        "role": user.role,
        "attributes": user.attributes,
        "invite_path": f"/invite/{invite}",
        "api_token": api,
    }


class LabelAccessConfig(Config):
    """Config for ``palate label access``."""

    db: str = Field(description="Database URL or SQLite file path.")
    name: str = Field(description="The user.")
    action: Literal[
        "invite", "revoke-invite", "api-token", "deactivate", "activate", "sign-out"
    ] = Field(  # palate.label.store.ACCESS_ACTIONS
        description="invite: a new invite link (the old one stops working); revoke-invite; "
        "api-token: a new API token; deactivate / activate the user; sign-out: end every "
        "browser session."
    )
    invite_days: float = Field(7.0, gt=0, description="How long a new invite link works.")


def label_access(cfg: LabelAccessConfig) -> dict[str, Any]:
    """Manage one user's access; prints a new invite path or API token when one is made."""
    import datetime as dt

    factory = open_db(cfg.db)
    out: dict[str, Any] = {"stage": "label-access", "name": cfg.name, "action": cfg.action}
    with factory() as db:
        user = user_by_name(db, cfg.name)
        if user is None:
            raise ConfigError(f"{cfg.db}: no user named {cfg.name!r}")
        made = change_access(db, user, cfg.action, dt.timedelta(days=cfg.invite_days))
        if "invite" in made:
            out["invite_path"] = f"/invite/{made['invite']}"
            out["invite_expires_at"] = str(user.invite_expires_at)
        out.update({k: v for k, v in made.items() if k != "invite"})
    return out
