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
rate (:func:`palate.eval.stats.length_controlled_win_rate`). Per policy, judge-free: KL to the
reference (the baseline by default), length, EOS rate, distinct-1/2, repeated trigrams, refusal
rate. Writes ``summary.json``, ``report.html`` and ``samples/<policy>.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, field_validator, model_validator

from palate.config import Config
from palate.data import Prompt, atomic_write, prompt_json, read_jsonl, read_records, write_jsonl
from palate.errors import ConfigError, DataError
from palate.eval.gold import GoldConfig, gold_scorer
from palate.eval.overopt import OveroptSettings, study
from palate.eval.people import PeopleJudge, people_campaign
from palate.eval.policies import PolicySamples, sample_and_score
from palate.eval.stats import pairwise_wins, win_rates
from palate.feedback.config import JudgeSettings
from palate.feedback.judge import load_judge
from palate.models import load_tokenizer
from palate.ppo.config import RewardSource
from palate.progress import progress_bar
from palate.report import build_eval_report
from palate.reward.scoring import load_score_fn
from palate.rundir import RunDir, fingerprint
from palate.sampling import SamplingConfig, checkpoint_policy, load_sampler
from palate.text import distinct_n, is_refusal, repeated_trigrams
from palate.training import resolve_precision

__all__ = ["EvalConfig", "PeopleJudge", "compare_policies", "resolve_policy"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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

    return checkpoint_policy(Path(path), base, precision), load_tokenizer(base)


# --------------------------------------------------------------------------- samples (cached)


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
    fp = fingerprint(
        [
            resolve_policy(spec),
            [prompt_json(p) for p in prompts],
            cfg.sampling.model_dump(),
            cfg.seed,
            cfg.precision,
            None if reference is None else resolve_policy(ref_spec),
        ]
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
        scored = sample_and_score(
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
        prompts,
        cfg.sampling,
        score_fns["gold"],
        score_fns["reward_model"],
        points,
        cfg.overopt,
        seed=cfg.seed + 1,
        batch_size=cfg.batch_size,
        precision=precision,
    )
    out["rl_title"] = "the policies (KL to the baseline)"
    return out


# --------------------------------------------------------------------------- the command


def judge_scores(
    cfg: EvalConfig, prompts: list[Prompt], sides: dict[str, PolicySamples], precision: str
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """The scoring judges (``reward_model``, ``gold``): judge → side → (N,) score, and the
    score functions."""
    score_fns: dict[str, Any] = {}
    if cfg.judges.reward_model:
        score_fns["reward_model"] = load_score_fn(
            RewardSource(model=cfg.judges.reward_model), torch.device("cpu"), precision
        )
    if cfg.judges.gold:
        score_fns["gold"] = gold_scorer(cfg.judges.gold)
    scores = {
        judge_name: {
            side: [float(x) for x in fn(prompts, s.responses)] for side, s in sides.items()
        }
        for judge_name, fn in score_fns.items()
    }
    return scores, score_fns


def ai_probs(
    cfg: EvalConfig, prompts: list[Prompt], base: PolicySamples, samples: dict[str, PolicySamples]
) -> dict[str, list[float]]:
    """The AI judge's P(policy's answer wins over the baseline's), per policy and prompt."""
    if not cfg.judges.ai:
        return {}
    judge = load_judge(cfg.judges.ai)
    out = {}
    for name, s in samples.items():
        verdicts = judge.compare(
            [(p, a, b) for p, a, b in zip(prompts, s.responses, base.responses, strict=True)]
        )
        out[name] = [v.prob_a for v in verdicts]
    return out


def policy_row(
    cfg: EvalConfig,
    name: str,
    s: PolicySamples,
    base: PolicySamples,
    kl: list[float] | None,
    scores: dict[str, dict[str, list[float]]],
    ai: dict[str, list[float]],
    people: dict[str, list[float | None]],
) -> dict[str, Any]:
    """One policy's summary: judge-free numbers, KL, and each judge's win rate over the
    baseline."""
    row: dict[str, Any] = {"spec": cfg.policies[name], **text_stats(s)}
    if kl is not None:
        row["kl"] = float(np.mean(kl))
    res: dict[str, Any] = {}
    for judge_name, sc in scores.items():
        res[judge_name] = {
            **win_rates(pairwise_wins(sc[name], sc["baseline"]), s.lengths, base.lengths, cfg.seed),
            "mean": float(np.mean(sc[name])),
            "baseline_mean": float(np.mean(sc["baseline"])),
        }
    if name in ai:
        pr = np.asarray(ai[name])
        res["ai"] = {
            **win_rates(
                pairwise_wins(pr, np.full_like(pr, 0.5)), s.lengths, base.lengths, cfg.seed
            ),
            "mean_prob": float(pr.mean()),
        }
    if cfg.judges.people:
        got = [(i, x) for i, x in enumerate(people[name]) if x is not None]
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
            "complete": len(got) == len(s.responses),
        }
    row["judges"] = res
    return row


def compare_policies(cfg: EvalConfig) -> dict[str, Any]:
    """``palate eval``: sample every policy and the baseline, judge each policy against the
    baseline, write ``summary.json``, ``samples.jsonl`` and ``report.html``; returns the
    summary."""
    run = RunDir(cfg.output_dir).create(cfg)
    records = read_records(cfg.prompts, "prompts").records
    prompts = [r.prompt for r in records][: cfg.max_prompts]
    if len(prompts) < 2:
        raise DataError(f"{cfg.prompts}: at least 2 prompts are needed, found {len(prompts)}")
    precision = _precision(cfg)
    ref_spec = cfg.reference or cfg.baseline
    reference, ref_tok = load_policy(ref_spec, precision)
    loaded = {ref_spec: (reference, ref_tok)}  # the reference samples as itself (no reload)
    base_ref = None if ref_spec == cfg.baseline else reference
    base, base_kl, _ = policy_samples(
        cfg, "baseline", cfg.baseline, prompts, base_ref, ref_tok, loaded
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
    scores, score_fns = judge_scores(cfg, prompts, {"baseline": base, **samples}, precision)
    ai = ai_probs(cfg, prompts, base, samples)
    people: dict[str, list[float | None]] = {}
    people_progress: dict[str, Any] | None = None
    if cfg.judges.people:
        _, people, people_progress = people_campaign(
            cfg.judges.people, cfg.output_dir, prompts, base, samples
        )
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
        summary["policies"][name] = policy_row(cfg, name, s, base, kls[name], scores, ai, people)
    if people_progress is not None:
        summary["people"] = people_progress
    if cfg.overopt is not None:
        # the baseline is the reference here (checked with the config): already loaded
        summary["overopt"] = overopt_study(
            cfg, prompts, scores, kls, score_fns, loaded.get(cfg.baseline)
        )
    write_samples(run.path / "samples.jsonl", prompts, base, samples, scores, ai)
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


def write_samples(
    path: Path,
    prompts: list[Prompt],
    base: PolicySamples,
    samples: dict[str, PolicySamples],
    scores: dict[str, dict[str, list[float]]],
    ai: dict[str, list[float]],
) -> None:
    """samples.jsonl: per prompt, every policy's answer and every judge's score."""
    write_jsonl(
        path,
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
                **{f"ai_{name}": ai[name][i] for name in ai},
            }
            for i, p in enumerate(prompts)
        ],
    )
