"""``palate eval``: any set of policies against a baseline, judged by whoever you trust.

Every policy (a model spec, a ``palate run`` directory, a PPO output directory or one PPO
checkpoint) and the baseline answer the same prompts with the same random stream. Each policy
is then compared with the baseline prompt by prompt, by any of four judges:

* ``reward_model`` — a trained reward model's scores (the proxy PPO optimised);
* ``gold`` — a gold preference (a rubric or another reward model), as in ``palate run``;
* ``ai`` — an AI judge under the constitution, both orders (``palate/feedback``);
* ``people`` — a labeling campaign of policy-vs-baseline pairs in a palate store: the first run
  creates it, later runs read the labels back (the samples are cached, so the pairs stay the
  same).

Per judge: the win rate (ties ½) with a bootstrap 95% interval and the length-controlled win
rate (:func:`palate.evaluate.length_controlled_win_rate`). Per policy, judge-free: KL to the
reference (the baseline by default), length, EOS rate, distinct-1/2, repeated trigrams, refusal
rate. Writes ``summary.json``, ``report.html`` and ``samples/<policy>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from palate.config import Config
from palate.data import Prompt, atomic_write, prompt_json, read_jsonl, read_records, write_jsonl
from palate.errors import ConfigError, DataError
from palate.evaluate import (
    PolicySamples,
    checkpoint_policy,
    evaluate_policy,
    load_sampler,
    pairwise_wins,
    win_rates,
)
from palate.feedback.config import JudgeSettings
from palate.overopt import OveroptSettings
from palate.ppo.monitors import distinct_n, repeated_trigrams
from palate.progress import progress_bar
from palate.rundir import RunDir
from palate.safety import is_refusal
from palate.sampling import SamplingConfig
from palate.simulate import GoldConfig
from palate.training import resolve_precision

__all__ = ["EvalConfig", "PeopleJudge", "evaluate_policies", "resolve_policy"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PeopleJudge(Config):
    """People judge policy-vs-baseline pairs in a palate labeling store."""

    db: str = Field(description="Database URL of the labeling store (sqlite:///... or postgres).")
    campaign: str | None = Field(
        None, description="Campaign name (default: eval-<output directory name>)."
    )
    overlap: int = Field(1, ge=1, description="Raters per pair.")
    guidelines: str | None = Field(None, description="Guidelines file (markdown) shown to raters.")


class Judges(Config):
    """Who decides which answer is better; any subset (at least one)."""

    reward_model: str | None = Field(
        None, description="A trained reward model directory (e.g. RUN/reward/final)."
    )
    gold: GoldConfig | None = Field(
        None, description="A gold preference: a rubric or a reward model (as in palate run)."
    )
    ai: JudgeSettings | None = Field(
        None, description="An AI judge under the constitution (both orders by default)."
    )
    people: PeopleJudge | None = Field(
        None, description="People, through a labeling campaign (read back on the next run)."
    )


class EvalConfig(Config):
    """Config for ``palate eval``."""

    output_dir: str = Field(description="Where summary.json, report.html and samples/ go.")
    prompts: str = Field(
        description="JSONL of prompts (prompts, demonstrations, comparisons or HH transcripts), "
        "e.g. RUN/prompts/eval.jsonl."
    )
    max_prompts: int | None = Field(64, ge=2, description="Use only the first N prompts.")
    baseline: str = Field(
        "smollm2-135m-instruct",
        description="The policy everything is compared with: a model spec, a run directory, a "
        "PPO output directory or a PPO checkpoint directory.",
    )
    policies: dict[str, str] = Field(
        description="name → policy (same forms as baseline), e.g. {ppo: runs/quickstart}."
    )
    reference: str | None = Field(
        None, description="KL reference (same forms; default: the baseline)."
    )
    judges: Judges = Field(default_factory=Judges, description="Judges.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=40, temperature=0.7),
        description="Sampling (every policy and the baseline use the same seed).",
    )
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = Field(64, ge=1, description="Sequences generated together.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast where supported (auto) or fp32."
    )
    overopt: OveroptSettings | None = Field(
        None,
        description="Over-optimisation study: best-of-n on the baseline and the policies, gold "
        "and reward-model gains against √KL with Gao et al.'s fits (needs judges.reward_model "
        "and judges.gold; the KL reference is the baseline). e.g. overopt: {}; null: skip.",
    )

    @field_validator("policies")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("name at least one policy")
        for name in v:
            if not NAME.match(name) or name == "baseline":
                raise ValueError(
                    f"policy name {name!r}: letters, digits, '.', '_' or '-' (not 'baseline')"
                )
        return v

    @model_validator(mode="after")
    def _judged(self) -> EvalConfig:
        if not any(getattr(self.judges, k) is not None for k in Judges.model_fields):
            raise ValueError("judges: name at least one (reward_model, gold, ai or people)")
        if self.overopt is not None:
            if self.judges.reward_model is None or self.judges.gold is None:
                raise ValueError("overopt needs judges.reward_model (the proxy) and judges.gold")
            if self.reference not in (None, self.baseline):
                raise ValueError("overopt: the KL reference must be the baseline")
        return self


# --------------------------------------------------------------------------- policies


def resolve_policy(spec: str) -> tuple[str, str | None]:
    """(what to load, base model of a LoRA checkpoint or None) for a policy spec:
    a run directory (→ its ``ppo/final``), a PPO output directory (→ ``final``), a PPO
    checkpoint (``policy/`` over the PPO config's model), or a model spec as it is."""
    p = Path(spec)
    if not p.is_dir():
        return spec, None
    if (p / "ppo" / "final").is_dir():
        return str(p / "ppo" / "final"), None
    if (p / "final").is_dir() and (p / "config.yaml").is_file():
        return str(p / "final"), None
    if (p / "policy").is_dir():
        if not (p / "policy" / "adapter_config.json").is_file():
            return str(p / "policy"), None
        config = p.parent.parent / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{spec}: a LoRA checkpoint, but no PPO config at {config}")
        import yaml

        base = (yaml.safe_load(config.read_text()) or {}).get("model")
        if not base:
            raise ConfigError(f"{config}: no 'model' field (the checkpoint's base model)")
        return str(p), str(base)
    return spec, None


def load_policy(spec: str, precision: str) -> tuple[Any, Any]:
    """(model, tokenizer) frozen for sampling."""
    path, base = resolve_policy(spec)
    if base is None:
        return load_sampler(path, precision)
    from palate.models import load_tokenizer

    return checkpoint_policy(Path(path), base, precision), load_tokenizer(base)


# --------------------------------------------------------------------------- samples (cached)


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def policy_samples(
    cfg: EvalConfig,
    name: str,
    spec: str,
    prompts: list[Prompt],
    reference: Any,
    reference_tok: Any,
    loaded: dict[str, tuple[Any, Any]] | None = None,
) -> tuple[PolicySamples, list[float] | None, bool]:
    """The policy's samples on ``prompts`` (and per-response KL to ``reference``), from
    ``samples/<name>.jsonl`` when it was written with the same settings; else sampled now.
    Returns (samples, kl, reused)."""
    ref_spec = cfg.reference or cfg.baseline
    fp = _fingerprint(
        resolve_policy(spec),
        [prompt_json(p) for p in prompts],
        cfg.sampling.model_dump(),
        cfg.seed,
        cfg.precision,
        None if reference is None else resolve_policy(ref_spec),
    )
    path = Path(cfg.output_dir) / "samples" / f"{name}.jsonl"
    marker = path.with_suffix(".json")
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()).get("fp") == fp:
        rows = read_jsonl(path)
        samples = PolicySamples(
            list(prompts),
            [r["response"] for r in rows],
            [r["finished"] for r in rows],
            [r["token_ids"] for r in rows],
        )
        kl = [r["kl"] for r in rows] if reference is not None else None
        return samples, kl, True
    precision = _precision(cfg)
    model, tok = (loaded or {}).get(spec) or load_policy(spec, precision)
    if reference is not None and reference_tok.get_vocab() != tok.get_vocab():
        raise ConfigError(f"policies.{name}: its tokenizer differs from the KL reference's")
    with progress_bar(f"sample {name}", total=len(prompts)) as bar:
        scored = evaluate_policy(
            model,
            tok,
            prompts,
            cfg.sampling,
            reference=reference,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            precision=precision,
            on_batch=bar.advance,
        )
    samples, kl = scored.samples, scored.kl
    del model
    write_jsonl(
        path,
        [
            {
                "prompt": prompt_json(p),
                "response": r,
                "finished": f,
                "token_ids": t,
                "kl": None if kl is None else kl[i],
            }
            for i, (p, r, f, t) in enumerate(
                zip(prompts, samples.responses, samples.finished, samples.token_ids, strict=True)
            )
        ],
    )
    with atomic_write(marker) as fh:
        fh.write(json.dumps({"fp": fp, "spec": spec}) + "\n")
    return samples, kl, False


def _precision(cfg: EvalConfig) -> str:
    return resolve_precision(cfg.precision)


def text_stats(samples: PolicySamples) -> dict[str, float]:
    """Judge-free numbers of one policy's answers."""
    texts = samples.responses
    return {
        "length": float(np.mean(samples.lengths)),
        "eos_rate": float(np.mean(samples.finished)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": float(np.mean([repeated_trigrams(t) for t in texts])),
        "refusal_rate": float(np.mean([is_refusal(t) for t in texts])),
    }


# --------------------------------------------------------------------------- people


def people_campaign(
    cfg: EvalConfig,
    prompts: list[Prompt],
    base: PolicySamples,
    policies: dict[str, PolicySamples],
) -> tuple[str, dict[str, list[float | None]], dict[str, Any]]:
    """Create (first run) or read back (later runs) the policy-vs-baseline campaign.
    Returns (campaign name, per policy the per-prompt P(policy wins) or None while unlabelled,
    campaign progress)."""
    from sqlalchemy import select

    from palate.label.db import Campaign, Label, Pair, open_db
    from palate.label.store import PairIn, aggregate, create_campaign

    people = cfg.judges.people
    assert people is not None
    name = people.campaign or f"eval-{Path(cfg.output_dir).resolve().name}"
    pairs = [
        PairIn(
            prompt=prompt_json(p),
            response_a=policies[pol].responses[i],
            response_b=base.responses[i],
            source_a=pol,
            source_b="baseline",
            meta={"policy": pol, "index": i},
        )
        for pol in policies
        for i, p in enumerate(prompts)
    ]
    factory = open_db(people.db)
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == name))
        if camp is None:
            guidelines = Path(people.guidelines).read_text() if people.guidelines else ""
            camp = create_campaign(
                db, name, pairs, overlap=people.overlap, guidelines=guidelines, source="palate eval"
            )
        stored = list(db.scalars(select(Pair).where(Pair.campaign_id == camp.id)))
        keys = {(p.meta.get("policy"), p.meta.get("index")): p for p in stored}
        missing = [p for p in pairs if (p.source_a, (p.meta or {})["index"]) not in keys]
        changed = [
            p
            for p in pairs
            if (k := keys.get((p.source_a, (p.meta or {})["index"]))) is not None
            and (k.response_a, k.response_b) != (p.response_a, p.response_b)
        ]
        if missing or changed:
            raise ConfigError(
                f"judges.people: campaign {name!r} in {people.db} holds other pairs "
                f"({len(missing)} missing, {len(changed)} with other answers): the policies, "
                "prompts or sampling changed since it was created; name a new campaign"
            )
        votes: dict[int, list[Label]] = {}
        for lab in db.scalars(
            select(Label).join(Pair, Pair.id == Label.pair_id).where(Pair.campaign_id == camp.id)
        ):
            votes.setdefault(lab.pair_id, []).append(lab)
        probs: dict[str, list[float | None]] = {pol: [None] * len(prompts) for pol in policies}
        labelled = 0
        for pair in stored:
            labs = votes.get(pair.id, [])
            agg = aggregate([x.answer for x in labs], [x.prob for x in labs]) if labs else None
            if len(labs) >= camp.overlap and agg is not None and not agg["skip"]:
                probs[pair.meta["policy"]][pair.meta["index"]] = float(agg["prob_a"])
            if len(labs) >= camp.overlap:
                labelled += 1
        progress = {"campaign": name, "db": people.db, "pairs": len(stored), "labelled": labelled}
    return name, probs, progress


# --------------------------------------------------------------------------- over-optimisation


def overopt_study(
    cfg: EvalConfig,
    prompts: list[Prompt],
    scores: dict[str, dict[str, list[float]]],
    kls: dict[str, list[float] | None],
    score_fns: dict[str, Any],
    baseline: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Best-of-n on the baseline, and every policy as one point of the optimisation curve
    (its KL to the baseline; gold and reward-model means), fitted with Gao et al.'s forms."""
    from palate.overopt import study

    assert cfg.overopt is not None
    means = {
        side: (float(np.mean(scores["gold"][side])), float(np.mean(scores["reward_model"][side])))
        for side in scores["gold"]
    }
    points: list[dict[str, Any]] = [
        {"name": "baseline", "kl": 0.0, "gold": means["baseline"][0], "proxy": means["baseline"][1]}
    ]
    for n in sorted(
        (n for n in kls if kls[n] is not None), key=lambda n: float(np.mean(kls[n] or [0]))
    ):
        kl = float(np.mean(kls[n] or [0]))
        points.append({"name": n, "kl": kl, "gold": means[n][0], "proxy": means[n][1]})
    precision = _precision(cfg)
    model, tok = baseline or load_policy(cfg.baseline, precision)
    out = study(
        model,
        tok,
        prompts[: cfg.overopt.prompts],
        cfg.sampling,
        score_fns["gold"],
        score_fns["reward_model"],
        points,
        samples=cfg.overopt.samples,
        ns=cfg.overopt.ns,
        seed=cfg.seed + 1,
        batch_size=cfg.batch_size,
        precision=precision,
    )
    out["rl_title"] = "the policies (KL to the baseline)"
    return out


# --------------------------------------------------------------------------- the command


def evaluate_policies(cfg: EvalConfig) -> dict[str, Any]:
    """Sample every policy and the baseline, judge each policy against the baseline, write
    ``summary.json`` and ``report.html``; returns the summary."""
    from palate.report import build_eval_report

    run = RunDir(cfg.output_dir).create(cfg)
    records = read_records(cfg.prompts, "prompts").records
    prompts = [r.prompt for r in records][: cfg.max_prompts]
    if len(prompts) < 2:
        raise DataError(f"{cfg.prompts}: at least 2 prompts are needed, found {len(prompts)}")
    precision = _precision(cfg)
    ref_spec = cfg.reference or cfg.baseline
    reference, ref_tok = load_policy(ref_spec, precision)
    loaded = {ref_spec: (reference, ref_tok)}  # the reference samples as itself (no reload)

    base, base_kl, _ = policy_samples(
        cfg,
        "baseline",
        cfg.baseline,
        prompts,
        None if ref_spec == cfg.baseline else reference,
        ref_tok,
        loaded,
    )
    samples: dict[str, PolicySamples] = {}
    kls: dict[str, list[float] | None] = {}
    reused: list[str] = []
    for name, spec in cfg.policies.items():
        samples[name], kls[name], again = policy_samples(
            cfg, name, spec, prompts, reference, ref_tok, loaded
        )
        if again:
            reused.append(name)

    judges = cfg.judges
    scores: dict[str, dict[str, list[float]]] = {}  # judge → side → (N,) score
    score_fns: dict[str, Any] = {}
    if judges.reward_model:
        from palate.ppo.config import RewardSource
        from palate.reward.scoring import load_score_fn

        score_fns["reward_model"] = load_score_fn(
            RewardSource(model=judges.reward_model), torch.device("cpu"), precision
        )
    if judges.gold:
        from palate.simulate import gold_scorer

        score_fns["gold"] = gold_scorer(judges.gold)
    for judge_name, fn in score_fns.items():
        scores[judge_name] = {
            side: [float(x) for x in fn(prompts, s.responses)]
            for side, s in {"baseline": base, **samples}.items()
        }
    ai_probs: dict[str, list[float]] = {}
    if judges.ai:
        from palate.feedback.judge import load_judge

        judge = load_judge(judges.ai)
        for name, s in samples.items():
            verdicts = judge.compare(
                [(p, a, b) for p, a, b in zip(prompts, s.responses, base.responses, strict=True)]
            )
            ai_probs[name] = [v.prob_a for v in verdicts]
    people_probs: dict[str, list[float | None]] = {}
    people_progress: dict[str, Any] | None = None
    if judges.people:
        _, people_probs, people_progress = people_campaign(cfg, prompts, base, samples)

    summary: dict[str, Any] = {
        "stage": "eval",
        "prompts": len(prompts),
        "prompts_file": cfg.prompts,
        "baseline": {"spec": cfg.baseline, **text_stats(base)},
        "reference": ref_spec,
        "policies": {},
        "reused_samples": reused,
    }
    if base_kl is not None:
        summary["baseline"]["kl"] = float(np.mean(base_kl))
    for name, s in samples.items():
        row: dict[str, Any] = {"spec": cfg.policies[name], **text_stats(s)}
        kl = kls[name]
        if kl is not None:
            row["kl"] = float(np.mean(kl))
        res: dict[str, Any] = {}
        for judge_name, sc in scores.items():
            res[judge_name] = {
                **win_rates(
                    pairwise_wins(sc[name], sc["baseline"]),
                    s.lengths,
                    base.lengths,
                    cfg.seed,
                ),
                "mean": float(np.mean(sc[name])),
                "baseline_mean": float(np.mean(sc["baseline"])),
            }
        if name in ai_probs:
            pr = np.asarray(ai_probs[name])
            res["ai"] = {
                **win_rates(
                    pairwise_wins(pr, np.full_like(pr, 0.5)), s.lengths, base.lengths, cfg.seed
                ),
                "mean_prob": float(pr.mean()),
            }
        if judges.people:
            got = [(i, x) for i, x in enumerate(people_probs[name]) if x is not None]
            idx = [i for i, _ in got]
            pr = np.asarray([x for _, x in got])
            res["people"] = {
                **win_rates(
                    pairwise_wins(pr, np.full_like(pr, 0.5)),
                    [s.lengths[i] for i in idx],
                    [base.lengths[i] for i in idx],
                    cfg.seed,
                ),
                "labelled": len(got),
                "complete": len(got) == len(prompts),
            }
        row["judges"] = res
        summary["policies"][name] = row
    if people_progress is not None:
        summary["people"] = people_progress
    if cfg.overopt is not None:
        # the baseline is the reference here (checked with the config): already loaded
        summary["overopt"] = overopt_study(
            cfg, prompts, scores, kls, score_fns, loaded.get(cfg.baseline)
        )

    write_jsonl(
        run.path / "samples.jsonl",
        [
            {
                "prompt": prompt_json(p),
                "baseline": base.responses[i],
                **{name: s.responses[i] for name, s in samples.items()},
                **{
                    f"{j}_{side}": sc[side][i]
                    for j, sc in scores.items()
                    for side in ("baseline", *samples)
                },
                **{f"ai_{name}": ai_probs[name][i] for name in ai_probs},
            }
            for i, p in enumerate(prompts)
        ],
    )
    lengths = {"baseline": base.lengths, **{n: s.lengths for n, s in samples.items()}}
    report = build_eval_report(
        run.path / "report.html",
        summary=summary,
        lengths=lengths,
        samples=read_jsonl(run.path / "samples.jsonl"),
        title=f"palate eval: {Path(cfg.output_dir).name}",
    )
    summary["report"] = str(report)
    run.write_summary(summary)
    return summary
