"""The stages of ``palate run``, each a function of the :class:`~palate.pipeline.run.Run` that
calls the library stage it names and returns its summary."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from palate.data import Prompt, prompt_json, prompt_text, read_jsonl, read_records, write_jsonl
from palate.errors import DataError
from palate.pipeline.run import STAGES, Run, WaitingForLabels
from palate.ppo import PPOConfig, RewardSource
from palate.progress import progress_bar
from palate.reward import RewardConfig
from palate.rundir import RunDir
from palate.sft import SFTConfig

__all__ = ["STAGE_FNS", "ppo_config"]


def read_prompts(path: Path) -> list[Prompt]:
    return [r.prompt for r in read_records(path, "prompts").records]


def read_criteria(path: Path) -> list[str]:
    """Each prompt's criterion (from the split's metadata; helpfulness when absent)."""
    return [
        r.metadata.get("criterion", "helpfulness") for r in read_records(path, "prompts").records
    ]


def stage_sft(run: Run) -> dict[str, Any]:
    from palate.sft import sft

    assert run.cfg.sft is not None
    data = run.cfg.sft.model_dump()
    data.update(model=run.cfg.sft.model or run.cfg.model, output_dir=str(run.dir("sft")))
    return sft(SFTConfig.model_validate(data))


def stage_pairs(run: Run) -> dict[str, Any]:
    import torch

    from palate.evaluate import load_sampler
    from palate.label.campaign import sample_pairs

    cfg = run.cfg.pairs
    prompts = read_prompts(run.root / "prompts" / "train.jsonl")[: cfg.prompts]
    criteria = read_criteria(run.root / "prompts" / "train.jsonl")[: cfg.prompts]
    criterion_of = {prompt_text(p): c for p, c in zip(prompts, criteria, strict=True)}
    precision = run.precision()
    model, tok = load_sampler(run.policy, precision)
    random.seed(run.cfg.seed)
    torch.manual_seed(run.cfg.seed)
    with progress_bar("pairs", total=len(prompts) * cfg.samples_per_prompt) as bar:
        pairs, gens = sample_pairs(
            model,
            tok,
            prompts,
            cfg.sampling,
            k=cfg.samples_per_prompt,
            pairing=cfg.pairing,
            source=run.policy,
            batch_size=cfg.batch_size,
            precision=precision,
            on_batch=bar.advance,
        )
    rows = [
        {
            "prompt": p.prompt,
            "response_a": p.response_a,
            "response_b": p.response_b,
            "source_a": p.source_a,
            "source_b": p.source_b,
            "metadata": {"criterion": criterion_of[prompt_text(p.prompt)]},
        }
        for p in pairs
    ]
    d = run.dir("pairs")
    write_jsonl(d / "pairs.jsonl", rows)
    # every sample, in demonstrations format: the initial policy's own responses, which the
    # reward stage may normalise on (see stage_reward)
    per_prompt = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    write_jsonl(
        d / "samples.jsonl",
        [
            {"prompt": prompt_json(p), "response": g.text, "metadata": {"finished": g.finished}}
            for p, g in zip(per_prompt, gens, strict=True)
        ],
    )
    summary = {
        "stage": "pairs",
        "pairs": len(rows),
        "prompts": len(prompts),
        "mean_tokens": sum(len(g.token_ids) for g in gens) / max(1, len(gens)),
        "eos_rate": sum(g.finished for g in gens) / max(1, len(gens)),
    }
    RunDir(d).write_summary(summary)
    return summary


def campaign_plan(run: Run) -> list[tuple[str, str, str | None]]:
    """(campaign name, who labels it, criterion) for the run's pairs: one campaign labelled by
    ``raters.kind``, or with ``raters.routes`` one per criterion, each by its route."""
    raters = run.cfg.raters
    if not raters.routes:
        return [(run.campaign, raters.kind, None)]
    rows = read_jsonl(run.dir("pairs") / "pairs.jsonl")
    criteria = sorted({r.get("metadata", {}).get("criterion", "helpfulness") for r in rows})
    plan: list[tuple[str, str, str | None]] = [
        (f"{run.campaign}-{c}", raters.routes.get(c, raters.kind), c) for c in criteria
    ]
    if sum(kind == "people" for _, kind, _ in plan) > 1:
        raise DataError(
            f"raters.routes: people would label {len(plan)} campaigns; route one criterion to "
            "people (the others to simulated or judge)"
        )
    return plan


def run_campaign(
    run: Run, name: str | None = None, criterion: str | None = None, overlap: int | None = None
) -> tuple[sessionmaker[Session], int]:
    """Create (or find) a campaign of the run's pairs (those of ``criterion`` when given);
    returns (sessionmaker, campaign id)."""
    from palate.label.campaign import parse_pairs
    from palate.label.db import Campaign, open_db
    from palate.label.store import create_campaign

    name = name or run.campaign
    factory = open_db(run.db_url)
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == name))
        if camp is None:
            pairs_file = run.dir("pairs") / "pairs.jsonl"
            pairs = parse_pairs(pairs_file.read_text(), str(pairs_file))
            if criterion is not None:
                pairs = [
                    p for p in pairs if (p.meta or {}).get("criterion", "helpfulness") == criterion
                ]
            people = run.cfg.raters.people
            guidelines = Path(people.guidelines).read_text() if people.guidelines else ""
            camp = create_campaign(
                db,
                name,
                pairs,
                overlap=overlap or run.cfg.raters.overlap,
                guidelines=guidelines,
                source=run.policy,
            )
        return factory, camp.id


def label_by_people(run: Run, factory: sessionmaker[Session], cid: int, name: str) -> None:
    """Serve the campaign to the run's people until it is complete (or stop and say how)."""
    from palate.label.people import (
        announce,
        campaign_progress,
        ensure_accounts,
        serve_until_complete,
    )

    people = run.cfg.raters.people
    d = run.dir("labels")
    accounts_file = d / "raters.json"
    accounts = ensure_accounts(factory, accounts_file, people, cid)
    progress = campaign_progress(factory, cid)
    if progress["labels"] >= progress["target"]:
        return

    def show(url: str) -> None:
        announce(url, name, cid, accounts, accounts_file)

    if not people.wait:
        show(people.url())
        raise WaitingForLabels(
            f"campaign {name!r}: {progress['labels']}/{progress['target']} "
            f"labels. Serve it with `palate serve --db {run.db_url}`, then run the same "
            "command again.",
            {"stage": "labels", "status": "waiting_for_labels", **progress},
        )
    serve_until_complete(
        run.db_url, factory, cid, people, serving_file=d / "serving.json", on_url=show
    )


def stage_labels(run: Run) -> dict[str, Any]:
    from palate.label.db import Campaign
    from palate.label.stats import campaign_stats
    from palate.label.store import export_rows

    raters = run.cfg.raters
    d = run.dir("labels")
    out = d / "comparisons.jsonl"
    summary: dict[str, Any] = {"stage": "labels", "raters": raters.kind}
    if raters.kind == "file":
        assert raters.file is not None
        records = read_records(raters.file, "comparisons").records
        write_jsonl(out, records)
        summary.update(comparisons=len(records), source=raters.file)
        RunDir(d).write_summary(summary)
        return summary
    rows: list[dict[str, Any]] = []
    campaigns: dict[str, Any] = {}
    keep = ("labels", "pairwise_agreement", "krippendorff_alpha", "median_seconds")
    for name, kind, criterion in campaign_plan(run):
        factory, cid = run_campaign(run, name, criterion, 1 if kind == "judge" else None)
        if kind == "simulated":
            from palate.simulate import gold_scorer, label_with_panel

            label_with_panel(run.db_url, name, raters.panel, gold_scorer(run.cfg.gold))
        elif kind == "judge":
            from palate.feedback import label_campaign, load_judge

            criteria = None if raters.judge.criteria or raters.judge.principles else criterion
            judge = load_judge(raters.judge, [criteria] if criteria else None)
            label_campaign(run.db_url, name, judge, tie_band=raters.judge.tie_band)
        else:
            label_by_people(run, factory, cid, name)
        with factory() as db:
            camp = db.get(Campaign, cid)
            assert camp is not None
            rows += export_rows(db, camp)
            stats = campaign_stats(db, camp)
        campaigns[name] = {
            "raters": kind,
            "criterion": criterion,
            **{k: stats[k] for k in keep if k in stats},
        }
    if not rows:
        raise DataError(f"campaign {run.campaign!r}: no usable labels (all skipped or both bad)")
    write_jsonl(out, rows)
    summary.update(db=run.db_url, comparisons=len(rows))
    if len(campaigns) == 1:
        summary.update(campaign=name, **{k: v for k, v in stats.items() if k in keep})
    else:
        summary["campaigns"] = campaigns
        summary["sources"] = {
            src: sum(r["source"] == src for r in rows)
            for src in sorted({r["source"] for r in rows})
        }
    RunDir(d).write_summary(summary)
    return summary


def stage_reward(run: Run) -> dict[str, Any]:
    from palate.reward import train_reward

    return train_reward(reward_config(run))


def reward_config(run: Run) -> RewardConfig:
    """The run's reward stage as a plain ``palate reward train`` config.

    Normalisation is on the initial policy's samples with PPO's sampling settings: the pairs
    stage's samples when they were drawn with exactly those settings (free), else fresh samples
    of the policy on the training prompts. Settings the user gave win.
    """
    data = run.cfg.reward.model_dump()
    given = run.cfg.reward.normalize.model_fields_set
    norm = data["normalize"]
    if not {"policy", "responses"} & given:
        samples = run.dir("pairs") / "samples.jsonl"
        if run.cfg.pairs.sampling == run.cfg.ppo.sampling and samples.is_file():
            norm["responses"] = str(samples)
        else:
            norm["policy"] = run.policy
            if "prompts" not in given:
                norm["prompts"] = str(run.root / "prompts" / "train.jsonl")
            if "sampling" not in given:
                norm["sampling"] = run.cfg.ppo.sampling.model_dump()
    data.update(
        data=str(run.dir("labels") / "comparisons.jsonl"), output_dir=str(run.dir("reward"))
    )
    return RewardConfig.model_validate(data)


def ppo_config(run: Run) -> PPOConfig:
    """The run's PPO stage as a plain ``palate ppo`` config."""
    data = run.cfg.ppo.model_dump()
    data.update(
        model=run.policy,
        prompts=str(run.root / "prompts" / "train.jsonl"),
        output_dir=str(run.dir("ppo")),
    )
    data["reward"]["model"] = str(run.dir("reward") / "final")
    return PPOConfig.model_validate(data)


def stage_ppo(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    from palate.ppo import ppo
    from palate.simulate import gold_scorer

    # the gold watches for reward hacking during training (the policy never sees it)
    return ppo(ppo_config(run), stop_after=stop_after, gold_fn=gold_scorer(run.cfg.gold))


def stage_eval(run: Run) -> dict[str, Any]:
    import torch

    from palate.evaluate import (
        checkpoint_policy,
        compare,
        evaluate_policy,
        load_sampler,
        rollout_curve,
    )
    from palate.ppo import load_score_fn
    from palate.reward import RewardModelScorer
    from palate.safety import read_xstest, xstest_rates
    from palate.simulate import gold_scorer
    from palate.training import store_frozen_linears

    cfg = run.cfg.eval
    precision = run.precision()
    sampling = cfg.sampling or run.cfg.ppo.sampling
    prompts = read_prompts(run.root / "prompts" / "eval.jsonl")
    gold = gold_scorer(run.cfg.gold)
    proxy = load_score_fn(
        RewardSource(model=str(run.dir("reward") / "final")), torch.device("cpu"), precision
    )
    assert isinstance(proxy, RewardModelScorer)
    for module in proxy.reward_model.modules():
        store_frozen_linears(module, precision)
    initial, tok = load_sampler(run.policy, precision)
    ckpts = RunDir(run.dir("ppo")).complete_checkpoints()[:-1] if cfg.checkpoints else []
    n_ck = min(cfg.checkpoint_prompts, len(prompts))
    total = 2 * len(prompts) + len(ckpts) * n_ck
    xstest = read_xstest(cfg.xstest, cfg.xstest_per_label, cfg.seed) if cfg.xstest else []
    total += 2 * len(xstest)
    kw: dict[str, Any] = {
        "gold": gold,
        "proxy": proxy,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "precision": precision,
    }
    with progress_bar("eval", total=total) as bar:
        kw["on_batch"] = bar.advance
        old = evaluate_policy(initial, tok, prompts, sampling, **kw)
        final, _ = load_sampler(str(run.dir("ppo") / "final"), precision)
        new = evaluate_policy(final, tok, prompts, sampling, reference=initial, **kw)
        safety = {}
        if xstest:
            xkw: dict[str, Any] = {
                "max_new_tokens": cfg.xstest_max_new_tokens,
                "batch_size": cfg.batch_size,
                "precision": precision,
                "seed": cfg.seed,
                "on_batch": bar.advance,
            }
            for side, model in (("initial", initial), ("final", final)):
                safety[side] = xstest_rates(model, tok, xstest, **xkw)
        sycophancy = {}
        if cfg.sycophancy is not None:
            from palate.sycophancy import measure

            for side, model in (("initial", initial), ("final", final)):
                sycophancy[side] = measure(
                    model,
                    tok,
                    **cfg.sycophancy.model_dump(),
                    batch_size=cfg.batch_size,
                    precision=precision,
                    seed=cfg.seed,
                )
        points = [{"update": 0, "kl": 0.0, **old.means(n_ck)}]
        for ck in ckpts:
            model = checkpoint_policy(ck, run.policy, precision)
            scored = evaluate_policy(model, tok, prompts[:n_ck], sampling, reference=initial, **kw)
            points.append({"update": int(ck.name.split("-")[1]), **scored.means(n_ck)})
            del model
    points.append({"update": run.cfg.ppo.ppo.updates, **new.means(n_ck)})
    overopt = study_overopt(run, initial, tok, prompts, sampling, gold, proxy, points)
    result = compare(new, old, seed=cfg.seed)
    d = run.dir("eval")
    write_jsonl(
        d / "samples.jsonl",
        [
            {**s, "prompt": prompt_json(s["prompt"]), "length_new": a, "length_old": b}
            for s, a, b in zip(
                result.pop("samples"), new.samples.lengths, old.samples.lengths, strict=True
            )
        ],
    )
    write_jsonl(d / "checkpoints.jsonl", points)
    write_jsonl(d / "rollouts.jsonl", rollout_curve(run.dir("ppo") / "samples", gold))
    kl_target = run.cfg.ppo.kl.target if run.cfg.ppo.kl.adaptive else None
    summary = {"stage": "eval", **result, "kl_target": kl_target}
    if safety:
        write_jsonl(
            d / "xstest.jsonl",
            [
                {
                    "prompt": a["prompt"],
                    "label": a["label"],
                    "type": a["type"],
                    "reply_initial": a["reply"],
                    "refusal_initial": a["refusal"],
                    "reply_final": b["reply"],
                    "refusal_final": b["refusal"],
                }
                for a, b in zip(
                    safety["initial"].pop("replies"), safety["final"].pop("replies"), strict=True
                )
            ],
        )
        summary["xstest"] = safety
    if sycophancy:
        summary["sycophancy"] = sycophancy
    if overopt:
        summary["overopt"] = overopt
    RunDir(d).write_summary(summary)
    return summary


def study_overopt(
    run: Run,
    initial: Any,
    tok: Any,
    prompts: list[Prompt],
    sampling: Any,
    gold: Any,
    proxy: Any,
    points: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """``eval.overopt``: best-of-n on the initial policy and the PPO checkpoints, against √KL."""
    from palate.overopt import study

    cfg = run.cfg.eval.overopt
    if cfg is None:
        return None
    return study(
        initial,
        tok,
        prompts[: cfg.prompts],
        sampling,
        gold,
        proxy,
        points,
        samples=cfg.samples,
        ns=cfg.ns,
        seed=run.cfg.eval.seed + 1,
        batch_size=run.cfg.eval.batch_size,
        precision=run.precision(),
    )


def stage_report(run: Run) -> dict[str, Any]:
    from palate.report import build_report

    eval_dir = run.dir("eval")
    summary = RunDir(eval_dir).read_summary()
    samples = read_jsonl(eval_dir / "samples.jsonl")
    stages = {
        s: RunDir(run.dir(s)).read_summary()
        for s in STAGES[:-2]
        if RunDir(run.dir(s)).is_complete()
    }
    path = build_report(
        run.dir("report") / "report.html",
        title=f"palate run: {run.root.name}",
        summary=summary,
        stages=stages,
        ppo_metrics=RunDir(run.dir("ppo")).metrics(),
        checkpoints=read_jsonl(eval_dir / "checkpoints.jsonl"),
        rollouts=read_jsonl(eval_dir / "rollouts.jsonl"),
        lengths_initial=[s["length_old"] for s in samples],
        lengths_final=[s["length_new"] for s in samples],
        samples=samples,
        notes=gold_note(run),
        alarms=read_jsonl(run.dir("ppo") / "alarms.jsonl")
        if (run.dir("ppo") / "alarms.jsonl").is_file()
        else [],
    )
    out = {"stage": "report", "report": str(path)}
    RunDir(run.dir("report")).write_summary(out)
    return out


def gold_note(run: Run) -> str:
    """The gold preference in words, for the report."""
    g = run.cfg.gold
    if g.reward_model:
        return f"Gold preference: the reward model at {g.reward_model}."
    r = g.rubric
    parts = [
        f"closeness to {r.length_target} words (×{r.length_weight:g})",
        f"VADER sentiment (×{r.sentiment_weight:g})",
        f"relevance to the prompt (×{r.relevance_weight:g})",
    ]
    if r.keywords:
        parts.append(f"keywords {', '.join(r.keywords)} (×{r.keyword_weight:g})")
    parts.append(
        f"minus refusals (×{r.refusal_weight:g}), repeated trigrams "
        f"(×{r.repetition_weight:g}), trigrams copied from the prompt "
        f"(×{r.echo_weight:g}) and cut-off endings (×{r.truncation_penalty:g})"
    )
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
