"""``palate run``: the whole loop from one config.

    [sft] → pairs → labels → reward → ppo → eval → report

* **sft** (optional): supervised fine-tuning; its ``final/`` becomes the initial policy.
* **pairs**: the initial policy answers the training prompts twice (or k times) → A/B pairs.
* **labels**: raters compare them — ``simulated`` (a panel driven by the gold rubric),
  ``people`` (a campaign in the labeling app: the server starts, invite links are printed, the
  run waits — or exits and continues on the next run — until the campaign is complete) or
  ``file`` (comparisons you already have). Simulated and human labels go through the same store.
* **reward**: a reward model trained on those comparisons (:mod:`palate.reward`).
* **ppo**: the policy optimised against it on a KL leash (:mod:`palate.ppo`).
* **eval**: on held-out prompts, the final policy against the initial one — gold win rate with a
  bootstrap 95% interval, proxy (reward-model) win rate, KL, lengths — and gold vs proxy along
  PPO checkpoints and rollouts (:mod:`palate.evaluate`).
* **report**: one self-contained HTML file (:mod:`palate.report`).

Each stage writes into its own folder of ``output_dir`` and is done when that folder holds
``summary.json``. A re-run skips finished stages, continues an interrupted one (PPO from its
newest checkpoint) and re-runs a stage whose settings — or an upstream stage's — changed since it
ran; ``--from STAGE`` forces a stage and everything after it. The gold preference is used by the
simulated raters and by evaluation only; the reward model never sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from palate.config import Config
from palate.data import prompt_json, prompt_text, read_records, write_jsonl
from palate.errors import ConfigError, DataError
from palate.generation import SamplingConfig
from palate.ppo import PPOConfig, RewardSource
from palate.progress import console, progress_bar
from palate.reward import RewardConfig
from palate.rundir import RunDir
from palate.sft import SFTConfig
from palate.simulate import GoldConfig, PanelConfig

__all__ = ["STAGES", "RunConfig", "WaitingForLabels", "run_pipeline"]

STAGES = ("sft", "pairs", "labels", "reward", "ppo", "eval", "report")


# --------------------------------------------------------------------------- config


class PromptSettings(Config):
    """Where prompts come from and how they are split."""

    file: str = Field(description="Prompts JSONL (any palate data file or HH-RLHF transcripts).")
    eval_prompts: int = Field(
        64, ge=1, description="Prompts held out (seeded) for the final evaluation."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use at most this many training prompts (after the hold-out)."
    )
    max_tokens: int | None = Field(
        128, ge=8, description="Drop prompts longer than this many tokens (null = keep all)."
    )


class PairSettings(Config):
    """Sampling the A/B pairs raters compare."""

    prompts: int = Field(64, ge=1, description="Training prompts answered for pairs.")
    samples_per_prompt: int = Field(2, ge=2, description="k responses sampled per prompt.")
    pairing: Literal["all", "disjoint"] = Field(
        "all",
        description="all: every two of a prompt's k responses form a pair, k(k-1)/2 pairs (as "
        "InstructGPT turned rankings of K into comparisons; more labels per generated token); "
        "disjoint: k/2 pairs, each response in one.",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0),
        description="How the responses are sampled.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")


class PeopleSettings(Config):
    """``raters.kind: people``: a campaign in the labeling app."""

    raters: list[str] = Field(
        default_factory=lambda: ["rater-1"], description="Rater accounts to create."
    )
    admin: str = Field("admin", description="Admin account (dashboard, export).")
    host: str = Field("127.0.0.1", description="Interface the app binds while the run waits.")
    port: int = Field(8000, ge=0, description="Port (0 = any free port).")
    public_url: str | None = Field(
        None, description="URL raters reach the app at, if not http://host:port (a proxy)."
    )
    wait: bool = Field(
        True,
        description="Serve the app and wait until the campaign is complete; false: print the "
        "links and exit (code 3), and continue on the next run once labels are in.",
    )
    poll_seconds: float = Field(2.0, gt=0, description="How often progress is checked.")
    guidelines: str | None = Field(None, description="Markdown file shown to raters.")


class RaterSettings(Config):
    """Who labels the pairs."""

    kind: Literal["simulated", "people", "file"] = Field(
        "simulated",
        description="simulated (a panel driven by the gold preference), people (the labeling "
        "app) or file (existing comparisons).",
    )
    overlap: int = Field(3, ge=1, description="Raters per pair (simulated and people).")
    db: str | None = Field(
        None, description="Labels database URL or SQLite path (default: RUN/labels/labels.db)."
    )
    panel: PanelConfig = Field(
        default_factory=PanelConfig, description="Simulated panel (noise, biases, raters)."
    )
    people: PeopleSettings = Field(default_factory=PeopleSettings, description="People.")
    file: str | None = Field(None, description="kind=file: comparisons JSONL to train on.")

    @model_validator(mode="after")
    def _check(self) -> RaterSettings:
        if self.kind == "file" and not self.file:
            raise ValueError("raters.kind=file needs raters.file")
        if self.kind == "simulated" and self.overlap > self.panel.raters:
            raise ValueError("raters.overlap is larger than raters.panel.raters")
        if self.kind == "people" and self.overlap > len(self.people.raters):
            raise ValueError("raters.overlap is larger than the number of raters.people.raters")
        return self


class RunSFT(SFTConfig):
    """The optional SFT stage (``palate sft`` fields; model and output_dir are the run's)."""

    model: str | None = Field(None, description="Default: the run's model.")  # type: ignore[assignment]
    output_dir: str | None = Field(None, description="Set by the run (RUN/sft).")  # type: ignore[assignment]


class RunReward(RewardConfig):
    """The reward-model stage (``palate reward train`` fields; data and output_dir are the run's)."""

    data: str | None = Field(None, description="Set by the run (the labels).")  # type: ignore[assignment]
    split_by: Literal["comparison", "prompt"] = Field(
        "prompt", description="Held-out accuracy on whole prompts (k samples → several pairs each)."
    )
    output_dir: str | None = Field(None, description="Set by the run (RUN/reward).")  # type: ignore[assignment]


class RunRewardSource(RewardSource):
    """PPO's reward settings; the model is the run's reward model."""

    model: str | None = Field(None, description="Set by the run (RUN/reward/final).")

    @model_validator(mode="after")
    def _one_source(self) -> RunRewardSource:  # the run supplies the model
        if self.function is not None:
            raise ValueError("palate run trains its reward model; reward.function is not used")
        return self


class RunPPO(PPOConfig):
    """The PPO stage (``palate ppo`` fields; policy, prompts, output_dir and reward model are
    the run's)."""

    model: str | None = Field(None, description="Set by the run (the initial policy).")  # type: ignore[assignment]
    prompts: str | None = Field(None, description="Set by the run (the training prompts).")  # type: ignore[assignment]
    output_dir: str | None = Field(None, description="Set by the run (RUN/ppo).")  # type: ignore[assignment]
    reward: RunRewardSource = Field(  # type: ignore[assignment]
        default_factory=RunRewardSource, description="Reward shaping (the model is the run's)."
    )
    sample_every: int = Field(1, ge=1, description="Write rollouts every N updates.")
    keep_checkpoints: int = Field(
        100, ge=1, description="Checkpoints kept (evaluated along training by the eval stage)."
    )


class EvalSettings(Config):
    """Final vs initial policy on held-out prompts, and along PPO checkpoints."""

    sampling: SamplingConfig | None = Field(
        None, description="Sampling for evaluation (default: PPO's rollout sampling)."
    )
    checkpoints: bool = Field(
        True, description="Also evaluate every kept PPO checkpoint (gold vs proxy along PPO)."
    )
    checkpoint_prompts: int = Field(
        32, ge=1, description="Held-out prompts used for each intermediate checkpoint."
    )
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    seed: int = Field(0, description="Sampling seed (both policies see the same random stream).")


class RunConfig(Config):
    """Config for ``palate run``: every stage of the loop in one file."""

    output_dir: str = Field(description="Run directory; each stage writes a subfolder.")
    model: str = Field(
        "smollm2-135m-instruct", description="Initial policy (before the optional SFT)."
    )
    seed: int = Field(0, description="Seed of the prompt split and pair sampling.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Sampling precision for pairs and evaluation (auto: bf16 on CPU)."
    )
    prompts: PromptSettings = Field(description="Prompts.")
    sft: RunSFT | None = Field(None, description="Optional SFT stage (omit to skip it).")
    pairs: PairSettings = Field(default_factory=PairSettings, description="Pairs to label.")
    raters: RaterSettings = Field(default_factory=RaterSettings, description="Raters.")
    gold: GoldConfig = Field(
        default_factory=GoldConfig,
        description="The gold preference: drives simulated raters, judges the evaluation; "
        "never shown to the reward model.",
    )
    reward: RunReward = Field(default_factory=RunReward, description="Reward model stage.")
    ppo: RunPPO = Field(default_factory=RunPPO, description="PPO stage.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation stage.")


class WaitingForLabels(Exception):
    """The people campaign is not complete and ``raters.people.wait`` is false."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------- the run


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json") if model is not None else None


class Run:
    """Paths, fingerprints and shared state of one ``palate run``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.fingerprints: dict[str, str] = {}
        prev = ""
        for stage in STAGES:
            if stage == "sft" and cfg.sft is None:
                continue
            blob = json.dumps({"stage": stage, "settings": self._settings(stage), "up": prev},
                              sort_keys=True, default=str)  # fmt: skip
            prev = self.fingerprints[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _settings(self, stage: str) -> Any:
        c = self.cfg
        if stage == "sft":
            return {"model": c.model, "sft": _dump(c.sft)}
        if stage == "pairs":
            return {"model": c.model, "seed": c.seed, "prompts": _dump(c.prompts),
                    "pairs": _dump(c.pairs)}  # fmt: skip
        if stage == "labels":
            r = _dump(c.raters)
            for k in ("host", "port", "public_url", "wait", "poll_seconds"):
                r["people"].pop(k)  # serving details do not change the labels
            return {"raters": r, "gold": _dump(c.gold) if c.raters.kind == "simulated" else None}
        if stage == "reward":
            return _dump(c.reward)
        if stage == "ppo":
            return _dump(c.ppo)
        if stage == "eval":
            return {"eval": _dump(c.eval), "gold": _dump(c.gold), "precision": c.precision}
        return {}

    def dir(self, stage: str) -> Path:
        return self.root / stage

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
        from palate.training import resolve_precision

        return resolve_precision(self.cfg.precision)

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
        d = self.dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        (d / "stage.json").write_text(json.dumps({"fingerprint": self.fingerprints[stage]}) + "\n")


# --------------------------------------------------------------------------- stages


def _prepare_prompts(run: Run) -> tuple[Path, Path]:
    """Split the prompts once (seeded): RUN/prompts/{train,eval}.jsonl."""
    cfg = run.cfg.prompts
    d = run.root / "prompts"
    train, held = d / "train.jsonl", d / "eval.jsonl"
    meta = d / "split.json"
    key = json.dumps({"prompts": _dump(cfg), "seed": run.cfg.seed, "model": run.cfg.model},
                     sort_keys=True)  # fmt: skip
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return train, held
    from palate.formatting import prompt_ids
    from palate.models import load_tokenizer

    prompts = [r.prompt for r in read_records(cfg.file, "prompts").records]
    seen: set[str] = set()
    unique = []
    for p in prompts:
        k = prompt_text(p)
        if k not in seen:
            seen.add(k)
            unique.append(p)
    if cfg.max_tokens is not None:
        tok = load_tokenizer(run.cfg.model)
        unique = [p for p in unique if len(prompt_ids(tok, p)) <= cfg.max_tokens]
    random.Random(run.cfg.seed).shuffle(unique)
    if len(unique) < cfg.eval_prompts + 8:
        raise DataError(
            f"{cfg.file}: {len(unique)} usable prompts (unique, ≤ prompts.max_tokens tokens); "
            f"need prompts.eval_prompts ({cfg.eval_prompts}) + at least 8 for training"
        )
    held_p, train_p = unique[: cfg.eval_prompts], unique[cfg.eval_prompts :][: cfg.max_prompts]

    write_jsonl(train, [{"prompt": prompt_json(p)} for p in train_p])
    write_jsonl(held, [{"prompt": prompt_json(p)} for p in held_p])
    meta.write_text(json.dumps({"key": key, "train": len(train_p), "eval": len(held_p)}) + "\n")
    return train, held


def _prompts(path: Path) -> list[Any]:
    return [r.prompt for r in read_records(path, "prompts").records]


def _load_sampler(spec: str, precision: str) -> tuple[Any, Any]:
    from palate.generation import inference_model
    from palate.models import load_model

    model, tok = load_model(spec)
    return inference_model(model, precision), tok


def stage_sft(run: Run) -> dict[str, Any]:
    from palate.sft import sft

    assert run.cfg.sft is not None
    data = run.cfg.sft.model_dump()
    data.update(model=run.cfg.sft.model or run.cfg.model, output_dir=str(run.dir("sft")))
    return sft(SFTConfig.model_validate(data))


def stage_pairs(run: Run) -> dict[str, Any]:
    import torch

    from palate.label.campaign import sample_pairs

    cfg = run.cfg.pairs
    prompts = _prompts(run.root / "prompts" / "train.jsonl")[: cfg.prompts]
    precision = run.precision()
    model, tok = _load_sampler(run.policy, precision)
    random.seed(run.cfg.seed)
    torch.manual_seed(run.cfg.seed)
    with progress_bar("pairs", total=len(prompts) * cfg.samples_per_prompt) as bar:
        pairs, gens = sample_pairs(model, tok, prompts, cfg.sampling, k=cfg.samples_per_prompt,
                                   pairing=cfg.pairing, source=run.policy,
                                   batch_size=cfg.batch_size, precision=precision,
                                   on_batch=bar.advance)  # fmt: skip
    rows = [{"prompt": p.prompt, "response_a": p.response_a, "response_b": p.response_b,
             "source_a": p.source_a, "source_b": p.source_b} for p in pairs]  # fmt: skip
    d = run.dir("pairs")
    write_jsonl(d / "pairs.jsonl", rows)
    summary = {"stage": "pairs", "pairs": len(rows), "prompts": len(prompts),
               "mean_tokens": sum(len(g.token_ids) for g in gens) / max(1, len(gens)),
               "eos_rate": sum(g.finished for g in gens) / max(1, len(gens))}  # fmt: skip
    RunDir(d).write_summary(summary)
    return summary


def _campaign(run: Run) -> tuple[Any, int]:
    """Create (or find) the run's campaign; returns (sessionmaker, campaign id)."""
    from sqlalchemy import select

    from palate.label.campaign import parse_pairs
    from palate.label.db import Campaign, open_db
    from palate.label.store import create_campaign

    factory = open_db(run.db_url)
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == run.campaign))
        if camp is None:
            pairs_file = run.dir("pairs") / "pairs.jsonl"
            pairs = parse_pairs(pairs_file.read_text(), str(pairs_file))
            people = run.cfg.raters.people
            guidelines = Path(people.guidelines).read_text() if people.guidelines else ""
            camp = create_campaign(db, run.campaign, pairs, overlap=run.cfg.raters.overlap,
                                   guidelines=guidelines, source=run.policy)  # fmt: skip
        return factory, camp.id


def _progress(factory: Any, cid: int) -> dict[str, int]:
    from palate.label.db import Campaign
    from palate.label.store import progress

    with factory() as db:
        camp = db.get(Campaign, cid)
        return progress(db, camp)


def _people_accounts(run: Run, factory: Any, cid: int) -> dict[str, Any]:
    """Create the admin and rater accounts once; their links and tokens are kept (mode 0600) in
    RUN/labels/raters.json, the only place they exist in the clear."""
    from sqlalchemy import select

    from palate.label.db import User
    from palate.label.store import create_user

    path = run.dir("labels") / "raters.json"
    known = json.loads(path.read_text()) if path.is_file() else {"accounts": {}}
    people = run.cfg.raters.people
    with factory() as db:
        for name, role in [(people.admin, "admin")] + [(r, "rater") for r in people.raters]:
            if name in known["accounts"]:
                continue
            if db.scalar(select(User).where(User.name == name)) is not None:
                known["accounts"][name] = {"role": role, "invite": None, "api_token": None}
                continue
            _, invite, token = create_user(db, name, role)
            known["accounts"][name] = {"role": role, "invite": invite, "api_token": token}
    known["campaign_id"] = cid
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(known, fh, indent=2)
    return known


def _announce(run: Run, url: str, accounts: dict[str, Any], cid: int) -> None:
    console.print(f"[bold]labeling app:[/bold] {url}   campaign {run.campaign!r} (id {cid})")
    for name, a in accounts["accounts"].items():
        link = f"{url}/invite/{a['invite']}" if a["invite"] else "(account existed before)"
        console.print(f"  {a['role']:5s} {name}: {link}")
    console.print(f"  API tokens and links: {run.dir('labels') / 'raters.json'}")


def _serve_until_complete(run: Run, factory: Any, cid: int, accounts: dict[str, Any]) -> None:
    import threading

    import uvicorn

    from palate.label.app import create_app

    people = run.cfg.raters.people
    app = create_app(run.db_url, secret_key=os.environ.get("PALATE_SECRET_KEY"))
    server = uvicorn.Server(uvicorn.Config(app, host=people.host, port=people.port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, name="palate-labeling", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"raters.people: could not serve on {people.host}:{people.port}")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = people.public_url or f"http://{people.host}:{port}"
    (run.dir("labels") / "serving.json").write_text(json.dumps({"url": url}) + "\n")
    _announce(run, url, accounts, cid)
    try:
        p = _progress(factory, cid)
        with progress_bar("labels (people)", total=p["target"], completed=p["labels"]) as bar:
            while p["labels"] < p["target"]:
                time.sleep(people.poll_seconds)
                p = _progress(factory, cid)
                bar.update(p["labels"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        (run.dir("labels") / "serving.json").unlink(missing_ok=True)


def stage_labels(run: Run) -> dict[str, Any]:
    from palate.label.db import Campaign
    from palate.label.stats import campaign_stats
    from palate.label.store import export_rows

    r = run.cfg.raters
    d = run.dir("labels")
    out = d / "comparisons.jsonl"
    summary: dict[str, Any] = {"stage": "labels", "raters": r.kind}
    if r.kind == "file":
        assert r.file is not None
        rows = read_records(r.file, "comparisons").records
        write_jsonl(out, rows)
        summary.update(comparisons=len(rows), source=r.file)
        RunDir(d).write_summary(summary)
        return summary
    factory, cid = _campaign(run)
    if r.kind == "simulated":
        from palate.simulate import gold_scorer, label_with_panel

        label_with_panel(run.db_url, run.campaign, r.panel, gold_scorer(run.cfg.gold))
    else:
        accounts = _people_accounts(run, factory, cid)
        p = _progress(factory, cid)
        if p["labels"] < p["target"]:
            if not r.people.wait:
                url = r.people.public_url or f"http://{r.people.host}:{r.people.port}"
                _announce(run, url, accounts, cid)
                raise WaitingForLabels(
                    f"campaign {run.campaign!r}: {p['labels']}/{p['target']} labels. Serve it with "
                    f"`palate serve --db {run.db_url}`, then run the same command again.",
                    {"stage": "labels", "status": "waiting_for_labels", **p},
                )
            _serve_until_complete(run, factory, cid, accounts)
    with factory() as db:
        camp = db.get(Campaign, cid)
        rows = export_rows(db, camp)
        stats = campaign_stats(db, camp)
    if not rows:
        raise DataError(f"campaign {run.campaign!r}: no usable labels (all skipped or both bad)")
    write_jsonl(out, rows)
    keep = ("labels", "pairwise_agreement", "krippendorff_alpha", "median_seconds")
    summary.update(campaign=run.campaign, db=run.db_url, comparisons=len(rows),
                   **{k: stats[k] for k in keep if k in stats})  # fmt: skip
    RunDir(d).write_summary(summary)
    return summary


def stage_reward(run: Run) -> dict[str, Any]:
    from palate.reward import train_reward

    data = run.cfg.reward.model_dump()
    data.update(
        data=str(run.dir("labels") / "comparisons.jsonl"), output_dir=str(run.dir("reward"))
    )
    return train_reward(RewardConfig.model_validate(data))


def ppo_config(run: Run) -> PPOConfig:
    """The run's PPO stage as a plain ``palate ppo`` config."""
    data = run.cfg.ppo.model_dump()
    data.update(model=run.policy, prompts=str(run.root / "prompts" / "train.jsonl"),
                output_dir=str(run.dir("ppo")))  # fmt: skip
    data["reward"]["model"] = str(run.dir("reward") / "final")
    return PPOConfig.model_validate(data)


def stage_ppo(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    from palate.ppo import ppo

    return ppo(ppo_config(run), stop_after=stop_after)


def _checkpoint_policy(path: Path, base_spec: str, precision: str) -> Any:
    """A PPO checkpoint's policy, merged and ready for sampling."""
    from palate.generation import inference_model
    from palate.models import load_model

    pol = path / "policy"
    if (pol / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model(base_spec)
        model = PeftModel.from_pretrained(base, str(pol)).merge_and_unload()
    else:
        model, _ = load_model(str(pol))
    return inference_model(model, precision)


def _rollout_curve(run: Run, gold: Callable[..., Any]) -> list[dict[str, Any]]:
    """Gold vs proxy on PPO's own rollouts, one point per logged update."""
    points = []
    for f in sorted((run.dir("ppo") / "samples").glob("update-*.jsonl")):
        rows = _jsonl(f)
        if not rows:
            continue
        g = gold([r["prompt"] for r in rows], [r["response"] for r in rows])
        points.append({"update": int(f.stem.split("-")[1]),
                       "gold": sum(g) / len(g),
                       "proxy": sum(r["score"] for r in rows) / len(rows)})  # fmt: skip
    return points


def stage_eval(run: Run) -> dict[str, Any]:
    import torch

    from palate.evaluate import compare, evaluate_policy
    from palate.ppo import load_score_fn
    from palate.simulate import gold_scorer
    from palate.training import store_frozen_linears

    cfg = run.cfg.eval
    precision = run.precision()
    sampling = cfg.sampling or run.cfg.ppo.sampling
    prompts = _prompts(run.root / "prompts" / "eval.jsonl")
    gold = gold_scorer(run.cfg.gold)
    proxy = load_score_fn(RewardSource(model=str(run.dir("reward") / "final")),
                          torch.device("cpu"), precision)  # fmt: skip
    for module in proxy.reward_model.modules():  # type: ignore[attr-defined]
        store_frozen_linears(module, precision)
    initial, tok = _load_sampler(run.policy, precision)
    ckpts = []
    if cfg.checkpoints:
        root = run.dir("ppo") / "checkpoints"
        ckpts = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())[:-1]
    n_ck = min(cfg.checkpoint_prompts, len(prompts))
    total = 2 * len(prompts) + len(ckpts) * n_ck
    kw: dict[str, Any] = {"gold": gold, "proxy": proxy, "seed": cfg.seed,
                          "batch_size": cfg.batch_size, "precision": precision}  # fmt: skip
    with progress_bar("eval", total=total) as bar:
        kw["on_batch"] = bar.advance
        old = evaluate_policy(initial, tok, prompts, sampling, **kw)
        final, _ = _load_sampler(str(run.dir("ppo") / "final"), precision)
        new = evaluate_policy(final, tok, prompts, sampling, reference=initial, **kw)
        points = [{"update": 0, "kl": 0.0, **old.means(n_ck)}]
        for ck in ckpts:
            model = _checkpoint_policy(ck, run.policy, precision)
            sc = evaluate_policy(model, tok, prompts[:n_ck], sampling, reference=initial, **kw)
            points.append({"update": int(ck.name.split("-")[1]), **sc.means(n_ck)})
            del model
    points.append({"update": run.cfg.ppo.ppo.updates, **new.means(n_ck)})
    result = compare(new, old, seed=cfg.seed)
    d = run.dir("eval")
    write_jsonl(d / "samples.jsonl", [
        {**s, "prompt": prompt_json(s["prompt"]), "length_new": a, "length_old": b}
        for s, a, b in zip(result.pop("samples"), new.samples.lengths, old.samples.lengths,
                           strict=True)
    ])  # fmt: skip
    write_jsonl(d / "checkpoints.jsonl", points)
    write_jsonl(d / "rollouts.jsonl", _rollout_curve(run, gold))
    kl_target = run.cfg.ppo.kl.target if run.cfg.ppo.kl.adaptive else None
    summary = {"stage": "eval", **result, "kl_target": kl_target}
    RunDir(d).write_summary(summary)
    return summary


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def stage_report(run: Run) -> dict[str, Any]:
    from palate.report import build_report

    ev = run.dir("eval")
    summary = RunDir(ev).read_summary()
    samples = _jsonl(ev / "samples.jsonl")
    stages = {s: RunDir(run.dir(s)).read_summary() for s in STAGES[:-2]
              if RunDir(run.dir(s)).is_complete()}  # fmt: skip
    path = build_report(
        run.dir("report") / "report.html",
        title=f"palate run: {run.root.name}",
        summary=summary,
        stages=stages,
        ppo_metrics=RunDir(run.dir("ppo")).metrics(),
        checkpoints=_jsonl(ev / "checkpoints.jsonl"),
        rollouts=_jsonl(ev / "rollouts.jsonl"),
        lengths_initial=[s["length_old"] for s in samples],
        lengths_final=[s["length_new"] for s in samples],
        samples=samples,
        notes=_gold_note(run),
    )
    out = {"stage": "report", "report": str(path)}
    RunDir(run.dir("report")).write_summary(out)
    return out


def _gold_note(run: Run) -> str:
    g = run.cfg.gold
    if g.reward_model:
        return f"Gold preference: the reward model at {g.reward_model}."
    r = g.rubric
    parts = [f"closeness to {r.length_target} words (×{r.length_weight:g})",
             f"VADER sentiment (×{r.sentiment_weight:g})",
             f"relevance to the prompt (×{r.relevance_weight:g})"]  # fmt: skip
    if r.keywords:
        parts.append(f"keywords {', '.join(r.keywords)} (×{r.keyword_weight:g})")
    parts.append(f"minus refusals (×{r.refusal_weight:g}), repeated trigrams "
                 f"(×{r.repetition_weight:g}), trigrams copied from the prompt "
                 f"(×{r.echo_weight:g}) and cut-off endings (×{r.truncation_penalty:g})")  # fmt: skip
    return "Gold preference (rubric, never shown to the reward model): " + "; ".join(parts) + "."


STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "sft": stage_sft,
    "pairs": stage_pairs,
    "labels": stage_labels,
    "reward": stage_reward,
    "ppo": stage_ppo,
    "eval": stage_eval,
    "report": stage_report,
}


def run_pipeline(cfg: RunConfig, *, from_stage: str | None = None) -> dict[str, Any]:
    """``palate run``: run every stage that is not done yet; returns the run summary."""
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    if from_stage == "sft" and cfg.sft is None:
        raise ConfigError("--from sft: this config has no sft section")
    from palate.config import config_to_yaml

    run = Run(cfg)
    _prepare_prompts(run)  # reads and checks the prompts before anything is written
    (run.root / "config.yaml").write_text(config_to_yaml(cfg))
    stages = [s for s in STAGES if s in run.fingerprints]
    forced = set(stages[stages.index(from_stage) :]) if from_stage else set()
    minutes: dict[str, float] = {}
    t_run = time.perf_counter()
    upstream_ran = False
    for i, stage in enumerate(stages, 1):
        state = "stale" if stage in forced else run.state(stage)
        if state == "done" and not upstream_ran:
            console.print(f"[dim]stage {i}/{len(stages)} {stage}: done, skipped[/dim]")
            continue
        if state == "done":  # an upstream stage ran again, so this one is stale too
            state = "stale"
        why = {"new": "", "partial": " (continuing)", "stale": " (settings or inputs changed)"}
        console.rule(f"stage {i}/{len(stages)}: {stage}{why[state]}")
        if state == "stale":
            run.clear(stage)
        run.begin(stage)
        t0 = time.perf_counter()
        result = STAGE_FNS[stage](run)
        if "stopped_at" in result:  # a library stage stopped early (stop_after)
            return {"status": "stopped", "stage": stage, **result}
        minutes[stage] = (time.perf_counter() - t0) / 60
        upstream_ran = True
    return _summary(run, minutes, time.perf_counter() - t_run)


def _summary(run: Run, minutes: dict[str, float], seconds: float) -> dict[str, Any]:
    ev = RunDir(run.dir("eval")).read_summary()
    rm = RunDir(run.dir("reward")).read_summary()
    pp = RunDir(run.dir("ppo")).read_summary()
    labels = RunDir(run.dir("labels")).read_summary()
    keys = ("gold_win_rate", "gold_win_rate_low", "gold_win_rate_high", "proxy_win_rate",
            "gold_new", "gold_old", "proxy_new", "proxy_old", "kl", "kl_target", "length_new",
            "length_old", "prompts", "proxy_gold_agreement")  # fmt: skip
    summary: dict[str, Any] = {"status": "complete", "output_dir": str(run.root)}
    summary.update({k: ev.get(k) for k in keys})
    summary.update({
        "labels": labels.get("comparisons"),
        "label_agreement": labels.get("pairwise_agreement"),
        "reward_accuracy": rm.get("eval_accuracy"),
        "ppo_updates": pp.get("updates"),
        "report": str(run.dir("report") / "report.html"),
        "minutes": round(seconds / 60, 2),
        "stage_minutes": {k: round(v, 2) for k, v in minutes.items()},
    })  # fmt: skip
    RunDir(run.root).write_summary(summary)
    return summary
