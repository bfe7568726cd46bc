"""One ``palate run``'s bookkeeping: stage folders, settings fingerprints, done/partial/stale."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from palate.config import added_later
from palate.data import (
    Prompt,
    criteria_by_prompt,
    prompt_contents,
    prompt_json,
    prompt_text,
    read_records,
    write_jsonl,
)
from palate.errors import DataError
from palate.eval.gold import gold_scorer
from palate.formatting import prompt_ids
from palate.models import load_tokenizer
from palate.pipeline.config import PromptFlag, RunConfig
from palate.raters.people import PeopleSettings, WaitingForLabels
from palate.rundir import RunDir, fingerprint
from palate.training import resolve_precision

__all__ = ["STAGES", "Run", "WaitingForLabels"]

STAGES = ("sft", "pairs", "labels", "reward", "ppo", "eval", "report")


def spread(prompts: list[tuple[Prompt, str]], flags: list[PromptFlag]) -> list[tuple[Prompt, str]]:
    """``prompts`` (prompt, criterion) reordered so that each flag with a ``share`` has that
    share of every prefix while its prompts last (the others keep their order)."""
    shares = {f.criterion: f.share for f in flags if f.share is not None}
    if not shares:
        return prompts
    pools = {c: [x for x in prompts if x[1] == c] for c in shares}
    rest = [x for x in prompts if x[1] not in shares]
    placed = dict.fromkeys(shares, 0)
    out: list[tuple[Prompt, str]] = []
    while len(out) < len(prompts):
        due = [c for c in shares if pools[c] and placed[c] < shares[c] * (len(out) + 1)]
        if due or not rest:
            c = due[0] if due else next(c for c in shares if pools[c])
            out.append(pools[c].pop(0))
            placed[c] += 1
        else:
            out.append(rest.pop(0))
    return out


def _drop_later(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (``model.model_dump(mode="json")``) without the fields marked
    :data:`~palate.config.ADDED_LATER` that are at their default, at any depth."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if added_later(type(model), name):
            if value == field.get_default(call_default_factory=True):
                dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _drop_later(value, dumped[name])
        elif isinstance(value, list) and isinstance(dumped.get(name), list):
            for m, d in zip(value, dumped[name], strict=False):
                if isinstance(m, BaseModel) and isinstance(d, dict):
                    _drop_later(m, d)
    return dumped


def _dump(model: Any) -> Any:
    return _drop_later(model, model.model_dump(mode="json")) if model is not None else None


class Run:
    """Paths, fingerprints and shared state of one ``palate run``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.fingerprints: dict[str, str] = {}
        # the stages in order: round 0 is pairs → labels → reward → ppo; later rounds are one
        # stage each (round-1, ...) between ppo and eval
        later = [f"round-{r}" for r in range(1, cfg.rounds)]
        self.stages = [s for s in STAGES if s != "sft" or cfg.sft is not None]
        i = self.stages.index("eval")
        self.stages[i:i] = later
        prev = ""
        for stage in self.stages:
            settings = {"stage": stage, "settings": self._settings(stage), "up": prev}
            prev = self.fingerprints[stage] = fingerprint(settings)

    def _settings(self, stage: str) -> Any:
        c = self.cfg
        if stage == "sft":
            return {"model": c.model, "sft": _dump(c.sft)}
        if stage == "pairs":
            return {
                "model": c.model,
                "seed": c.seed,
                "prompts": _dump(c.prompts),
                "pairs": _dump(c.pairs),
            }
        if stage.startswith("round-"):
            # a round repeats pairs → labels → reward → PPO with the same settings
            return {
                "round": self.round_no(stage),
                "pairs": _dump(c.pairs),
                "raters": _dump(c.raters),
                "gold": _dump(c.gold),
                "reward": _dump(c.reward),
                "ppo": _dump(c.ppo),
            }
        if stage == "labels":
            r = _dump(c.raters)
            for k in PeopleSettings.SERVING:
                r["people"].pop(k)  # serving details do not change the labels
            simulated = "simulated" in {c.raters.kind, *c.raters.routes.values()}
            return {"raters": r, "gold": _dump(c.gold) if simulated else None}
        if stage == "reward":
            return _dump(c.reward)
        if stage == "ppo":  # round 0: what only later rounds use is no setting of it
            return {k: v for k, v in _dump(c.ppo).items() if k != "later_rounds_kl_coef"}
        if stage == "eval":
            return {"eval": _dump(c.eval), "gold": _dump(c.gold), "precision": c.precision}
        return {}

    def dir(self, stage: str) -> Path:
        """The stage's folder (``RUN/<stage>``)."""
        return self.root / stage

    def gold(self, group: str | None = None) -> Any:
        """The gold preference as a ScoreFn, knowing each prompt's criterion (a rubric may reward
        refusals where refusing is right); ``group``: that rater group's gold."""

        gold = self.cfg.gold
        for g in self.cfg.raters.groups:
            if g.name == group and g.gold is not None:
                gold = g.gold

        return gold_scorer(gold, self.criteria())

    def criteria(self) -> dict[str, str]:
        """{prompt text: criterion} of the run's training and held-out prompts (helpfulness
        when a prompt has none)."""
        criteria = {}
        for name in ("train.jsonl", "eval.jsonl"):
            path = self.root / "prompts" / name
            if path.is_file():
                criteria.update(criteria_by_prompt(read_records(path, "prompts").records))
        return criteria

    # ---------------------------------------------------------------- rounds

    @staticmethod
    def round_no(stage: str) -> int:
        return int(stage.split("-", 1)[1])

    def round_dir(self, r: int, step: str) -> Path:
        """Round r's folder for ``step`` (pairs, labels, reward, ppo): round 0 is the run's own
        stage folders, round r ≥ 1 ``RUN/round-r/<step>``."""
        return self.dir(step) if r == 0 else self.dir(f"round-{r}") / step

    @property
    def last_round(self) -> int:
        return self.cfg.rounds - 1

    def ppo_dirs(self) -> list[Path]:
        """Every round's PPO folder, in order (the last one holds the final policy)."""
        return [self.round_dir(r, "ppo") for r in range(self.cfg.rounds)]

    @property
    def policy(self) -> str:
        """The initial policy: SFT's output, or the configured model."""
        return str(self.dir("sft") / "final") if self.cfg.sft is not None else self.cfg.model

    @property
    def db_url(self) -> str:
        return self.cfg.raters.db or str(self.dir("labels") / "labels.db")

    @property
    def campaign(self) -> str:
        return f"{self.root.name}-{self.fingerprints['labels'][:8]}"

    def precision(self) -> str:
        return resolve_precision(self.cfg.precision)

    def prepare_prompts(self) -> tuple[Path, Path]:
        """Split the prompts once (seeded): RUN/prompts/{train,eval}.jsonl."""
        cfg = self.cfg.prompts
        d = self.root / "prompts"
        train, held = d / "train.jsonl", d / "eval.jsonl"
        meta = d / "split.json"
        key = json.dumps(
            {"prompts": _dump(cfg), "seed": self.cfg.seed, "model": self.cfg.model}, sort_keys=True
        )
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            return train, held

        tok = load_tokenizer(self.cfg.model) if cfg.max_tokens is not None else None
        seen: set[str] = set()

        def usable(file: str) -> list[Prompt]:
            """The file's prompts not seen before and short enough."""
            unique = []
            for p in (r.prompt for r in read_records(file, "prompts").records):
                k = prompt_text(p)
                if k not in seen:
                    seen.add(k)
                    unique.append(p)
            if tok is not None:
                unique = [p for p in unique if len(prompt_ids(tok, p)) <= (cfg.max_tokens or 0)]
            return unique

        unique = [(p, cfg.criterion) for p in usable(cfg.file)]
        for i, extra in enumerate(cfg.more):
            mine = usable(extra.file)
            random.Random(f"{self.cfg.seed}:{i}").shuffle(mine)
            unique += [(p, extra.criterion) for p in mine[: extra.max_prompts]]
        random.Random(self.cfg.seed).shuffle(unique)
        if len(unique) < cfg.eval_prompts + 8:
            raise DataError(
                f"{cfg.file}: {len(unique)} usable prompts (unique, ≤ prompts.max_tokens tokens); "
                f"need prompts.eval_prompts ({cfg.eval_prompts}) + at least 8 for training"
            )
        held_p, train_p = unique[: cfg.eval_prompts], unique[cfg.eval_prompts :][: cfg.max_prompts]

        flags = [(re.compile(f.pattern, re.I), f.criterion) for f in cfg.flags]

        def criterion(p: Prompt, default: str) -> str:
            """The first matching flag's criterion, else the prompt file's."""
            text = prompt_contents(p)
            return next((c for rx, c in flags if rx.search(text)), default)

        def rows(ps: list[tuple[Prompt, str]]) -> list[dict[str, Any]]:
            return [{"prompt": prompt_json(p), "metadata": {"criterion": c}} for p, c in ps]

        held_p = [(p, criterion(p, c)) for p, c in held_p]
        train_p = spread([(p, criterion(p, c)) for p, c in train_p], cfg.flags)

        write_jsonl(train, rows(train_p))
        write_jsonl(held, rows(held_p))
        meta.write_text(json.dumps({"key": key, "train": len(train_p), "eval": len(held_p)}) + "\n")
        return train, held

    # ---------------------------------------------------------------- bookkeeping

    def state(self, stage: str) -> str:
        """``done``, ``partial`` (same settings, interrupted), ``stale`` or ``new``."""
        d = self.dir(stage)
        marker = d / "stage.json"
        if not marker.is_file():
            return "stale" if d.exists() and any(d.iterdir()) else "new"
        if json.loads(marker.read_text()).get("fingerprint") != self.fingerprints[stage]:
            return "stale"
        return "done" if RunDir(d).is_complete() else "partial"

    def clear(self, stage: str) -> None:
        """Remove a stage's outputs (a labels database is kept: it may hold people's work; so are
        the raters' links and tokens for it)."""
        d = self.dir(stage)
        if not d.exists():
            return
        for child in d.iterdir():
            if stage == "labels" and (
                child.name.startswith("labels.db") or child.name == "raters.json"
            ):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def begin(self, stage: str) -> None:
        """Mark the stage as started with the current settings."""
        d = self.dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        (d / "stage.json").write_text(json.dumps({"fingerprint": self.fingerprints[stage]}) + "\n")
