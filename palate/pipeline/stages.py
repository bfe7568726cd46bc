"""The stages of ``palate run``, each a function of the :class:`~palate.pipeline.run.Run` that
calls the library stage it names and returns its summary."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from palate.data import Prompt, prompt_json, prompt_text, read_jsonl, read_records, write_jsonl
from palate.errors import DataError
from palate.pipeline.launch import launched, run_here
from palate.pipeline.run import STAGES, Run, WaitingForLabels
from palate.ppo import PPOConfig, RewardSource
from palate.progress import console, progress_bar
from palate.reward import RewardConfig
from palate.rundir import RunDir
from palate.sft import SFTConfig

__all__ = ["STAGE_FNS", "ppo_config", "reward_config", "sft_config"]


def read_prompts(path: Path) -> list[Prompt]:
    return [r.prompt for r in read_records(path, "prompts").records]


def read_criteria(path: Path) -> list[str]:
    """Each prompt's criterion (from the split's metadata; helpfulness when absent)."""
    return [
        r.metadata.get("criterion", "helpfulness") for r in read_records(path, "prompts").records
    ]


def sft_config(run: Run) -> SFTConfig:
    """The SFT stage as a plain ``palate sft`` config."""
    assert run.cfg.sft is not None
    data = run.cfg.sft.model_dump()
    data.update(model=run.cfg.sft.model or run.cfg.model, output_dir=str(run.dir("sft")))
    return SFTConfig.model_validate(data)


def stage_sft(run: Run) -> dict[str, Any]:
    return launched(run, "sft") or run_here(run, "sft")


def round_policy(run: Run, r: int) -> str:
    """The policy that answers round r's prompts: the initial one, then each round's newest."""
    return run.policy if r == 0 else str(run.round_dir(r - 1, "ppo") / "final")


def stage_pairs(run: Run, r: int = 0) -> dict[str, Any]:
    """Round r's pairs: the round's policy answers its slice of the training prompts k times;
    with ``pairs.budget`` the pairs to label are chosen (``pairs.select``: the previous round's
    reward model scores the candidates; round 0 has none and draws at random)."""
    import torch

    from palate.active import select_pairs
    from palate.evaluate import load_sampler
    from palate.label.campaign import sample_pairs

    cfg = run.cfg.pairs
    train = run.root / "prompts" / "train.jsonl"
    lo, hi = r * cfg.prompts, (r + 1) * cfg.prompts
    prompts, criteria = read_prompts(train)[lo:hi], read_criteria(train)[lo:hi]
    if not prompts:
        raise DataError(
            f"{train}: round {r} needs training prompts {lo + 1}-{hi} (pairs.prompts per round), "
            f"found {lo}; add prompts or lower pairs.prompts"
        )
    criterion_of = {prompt_text(p): c for p, c in zip(prompts, criteria, strict=True)}
    precision = run.precision()
    policy = round_policy(run, r)
    model, tok = load_sampler(policy, precision)
    random.seed(run.cfg.seed + r)
    torch.manual_seed(run.cfg.seed + r)
    with progress_bar("pairs", total=len(prompts) * cfg.samples_per_prompt) as bar:
        pairs, gens = sample_pairs(
            model,
            tok,
            prompts,
            cfg.sampling,
            k=cfg.samples_per_prompt,
            pairing=cfg.pairing,
            source=policy,
            batch_size=cfg.batch_size,
            precision=precision,
            on_batch=bar.advance,
        )
    del model
    method = cfg.select if r > 0 else "random"
    probs = None
    budget = cfg.budget or len(pairs)
    if budget < len(pairs) and method != "random":
        probs = candidate_probs(run, r - 1, pairs)  # (M, N) the last reward model's P(a ≻ b)
    chosen = select_pairs(  # index → why: all, random, or the selection rule
        len(pairs),
        budget,
        method,
        probs=probs,
        random_share=cfg.random_share,
        seed=run.cfg.seed + r,
    )

    rows = []
    for i, p in enumerate(pairs):
        row = {
            "prompt": p.prompt,
            "response_a": p.response_a,
            "response_b": p.response_b,
            "source_a": p.source_a,
            "source_b": p.source_b,
            "metadata": {
                "criterion": criterion_of[prompt_text(p.prompt)],
                **({"round": r} if r else {}),
                **({"selected_by": chosen.get(i, "none")} if cfg.budget else {}),
                **({"p_a": float(probs.mean(0)[i])} if probs is not None else {}),
            },
        }
        rows.append(row)
    d = run.round_dir(r, "pairs")
    d.mkdir(parents=True, exist_ok=True)
    if cfg.budget:
        write_jsonl(d / "candidates.jsonl", rows)
    write_jsonl(d / "pairs.jsonl", [row for i, row in enumerate(rows) if i in chosen])
    # every sample, in demonstrations format: the round policy's own responses, which the
    # reward stage may normalise on (see reward_config)
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
        "pairs": len(chosen),
        "candidates": len(pairs),
        "select": method,
        "prompts": len(prompts),
        "mean_tokens": sum(len(g.token_ids) for g in gens) / max(1, len(gens)),
        "eos_rate": sum(g.finished for g in gens) / max(1, len(gens)),
    }
    RunDir(d).write_summary(summary)
    return summary


def candidate_probs(run: Run, r: int, pairs: list[Any]) -> Any:
    """(M, N) P(a ≻ b) of round r's reward model (each ensemble member; M = 1 for one model)."""
    import numpy as np

    from palate.active import preference_probs
    from palate.reward.model import RewardEnsemble, load_reward_model

    rm = load_reward_model(run.round_dir(r, "reward") / "final")
    # an ensemble's members are raw (the ensemble's gain scales their mean); one model scores
    # with its own gain. Offsets cancel in r_a − r_b.
    members, gain = (rm.members, rm.gain) if isinstance(rm, RewardEnsemble) else ([rm], 1.0)
    prompts = [p.prompt for p in pairs]

    def scores(responses: list[str]) -> Any:  # (M, N)
        return np.stack([m.score(prompts, responses).float().numpy() * gain for m in members])

    return preference_probs(
        scores([p.response_a for p in pairs]), scores([p.response_b for p in pairs])
    )


def campaign_plan(run: Run, r: int = 0) -> list[tuple[str, str, str | None]]:
    """(campaign name, who labels it, criterion) for round r's pairs: one campaign labelled by
    ``raters.kind``, or with ``raters.routes`` one per criterion, each by its route."""
    raters = run.cfg.raters
    base = run.campaign if r == 0 else f"{run.campaign}-round-{r}"
    if not raters.routes:
        return [(base, raters.kind, None)]
    rows = read_jsonl(run.round_dir(r, "pairs") / "pairs.jsonl")
    criteria = sorted({r.get("metadata", {}).get("criterion", "helpfulness") for r in rows})
    plan: list[tuple[str, str, str | None]] = [
        (f"{base}-{c}", raters.routes.get(c, raters.kind), c) for c in criteria
    ]
    if sum(kind == "people" for _, kind, _ in plan) > 1:
        raise DataError(
            f"raters.routes: people would label {len(plan)} campaigns; route one criterion to "
            "people (the others to simulated or judge)"
        )
    return plan


def run_campaign(
    run: Run,
    name: str | None = None,
    criterion: str | None = None,
    overlap: int | None = None,
    r: int = 0,
) -> tuple[sessionmaker[Session], int]:
    """Create (or find) a campaign of round r's pairs (those of ``criterion`` when given);
    returns (sessionmaker, campaign id)."""
    from palate.label.campaign import parse_pairs
    from palate.label.db import Campaign, open_db
    from palate.label.store import create_campaign

    name = name or run.campaign
    factory = open_db(run.db_url)
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == name))
        if camp is None:
            pairs_file = run.round_dir(r, "pairs") / "pairs.jsonl"
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
                source=round_policy(run, r),
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


def group_panels(run: Run) -> list[tuple[str, Any]]:
    """(group name, its panel with the attribute ``group``) for ``raters.groups``; each
    group's panel seeds differently (its seed + the group's index)."""
    out = []
    for i, g in enumerate(run.cfg.raters.groups):
        panel = g.panel or run.cfg.raters.panel
        update: dict[str, Any] = {"attributes": {**panel.attributes, "group": g.name}}
        if g.panel is None:
            update["seed"] = panel.seed + i
        out.append((g.name, panel.model_copy(update=update)))
    return out


def stage_labels(run: Run, r: int = 0) -> dict[str, Any]:
    from palate.label.db import Campaign
    from palate.label.stats import campaign_stats
    from palate.label.store import export_rows

    raters = run.cfg.raters
    d = run.round_dir(r, "labels")
    d.mkdir(parents=True, exist_ok=True)
    out = d / "comparisons.jsonl"
    summary: dict[str, Any] = {"stage": "labels", "raters": raters.kind}
    if raters.kind == "file":
        assert raters.file is not None and r == 0
        records = read_records(raters.file, "comparisons").records
        write_jsonl(out, records)
        summary.update(comparisons=len(records), source=raters.file)
        RunDir(d).write_summary(summary)
        return summary
    rows: list[dict[str, Any]] = []
    campaigns: dict[str, Any] = {}
    quality: dict[str, Any] = {}  # per campaign: raters' reliability and flags, populations
    keep = ("labels", "pairwise_agreement", "krippendorff_alpha", "median_seconds", "flagged")
    groups = group_panels(run)
    for name, kind, criterion in campaign_plan(run, r):
        overlap = 1 if kind == "judge" else None
        if groups:  # every rater of every group labels every pair
            overlap = sum(p.raters + p.random_raters + p.first_raters for _, p in groups)
        factory, cid = run_campaign(run, name, criterion, overlap, r)
        if kind == "simulated":
            from palate.simulate import label_with_panel

            plan: list[tuple[str | None, Any]] = [*groups] or [(None, raters.panel)]
            for group, panel in plan:
                prefix = f"sim-{group}" if group else "sim"
                label_with_panel(run.db_url, name, panel, run.gold(group), prefix=prefix)
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
            settings = raters.quality
            if groups and settings.within is None:  # reliability within each population
                settings = settings.model_copy(update={"within": "group"})
            stats = campaign_stats(db, camp, settings)
            drop = stats["flagged"] if raters.drop_flagged else []
            if not groups:
                rows += export_rows(db, camp, aggregate=raters.aggregate, drop_raters=drop)
            for group, _ in groups:  # one row per pair and group, marked with the group
                others = [
                    q["rater"]
                    for q in stats["raters"]
                    if (q.get("attributes") or {}).get("group") != group
                ]
                for row in export_rows(
                    db, camp, aggregate=raters.aggregate, drop_raters=[*drop, *others]
                ):
                    row["metadata"]["group"] = group
                    rows.append(row)
        quality[name] = {
            "flagged": stats["flagged"],
            "dropped": drop,
            "aggregate": raters.aggregate,
            "raters": stats["raters"],
            "populations": stats["populations"],
        }
        campaigns[name] = {
            "raters": kind,
            "criterion": criterion,
            **{k: stats[k] for k in keep if k in stats},
        }
    if not rows:
        raise DataError(f"campaign {name!r}: no usable labels (all skipped or both bad)")
    write_jsonl(out, rows)
    (d / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
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


def stage_reward(run: Run, r: int = 0) -> dict[str, Any]:
    """The reward model on every label so far (those of ``raters.train_groups`` when set);
    with ``raters.per_group_reward``, one more per group, each on its own group's labels; with
    ``reward.per_criterion``, one more per prompt criterion, each on its criterion's labels."""
    keep = ("train_pairs", "eval_accuracy", "eval_pairs", "normalize_samples")

    def part(name: str) -> dict[str, Any]:  # one more reward model, in reward/<name>
        done = RunDir(run.round_dir(r, "reward") / name)
        got = done.read_summary() if done.is_complete() else None
        got = got or launched(run, "reward", r, name) or run_here(run, "reward", r, name)
        return {k: got.get(k) for k in keep}

    # first: the pooled model's summary marks the stage done
    groups = (
        {group: part(f"groups/{group}") for group, _ in group_panels(run)}
        if run.cfg.raters.per_group_reward
        else {}
    )
    criteria = (
        {c: part(f"criteria/{c}") for c in label_criteria(run, r)}
        if run.cfg.reward.per_criterion
        else {}
    )
    out = launched(run, "reward", r) or run_here(run, "reward", r)
    if groups:
        agreement = held_out_agreement(run, r)
        for group, row in groups.items():
            row["gold_agreement"] = agreement[group]
        out["groups"] = groups
        out["gold_agreement"] = agreement["run"]
    if criteria:
        out["criteria"] = criteria
    if groups or criteria:
        RunDir(run.round_dir(r, "reward")).write_summary(out)
    return out


def label_criteria(run: Run, r: int) -> list[str]:
    """The prompt criteria of the labels up to round r (each gets a reward model of its own
    with ``reward.per_criterion``)."""
    return sorted(
        {
            row.get("metadata", {}).get("criterion", "helpfulness")
            for k in range(r + 1)
            for row in read_jsonl(run.round_dir(k, "labels") / "comparisons.jsonl")
        }
    )


def reward_routes(run: Run, r: int) -> dict[str, str]:
    """{criterion: reward model directory} of round r (empty without ``reward.per_criterion``)."""
    if not run.cfg.reward.per_criterion:
        return {}
    d = run.round_dir(r, "reward") / "criteria"
    return {c: str(d / c / "final") for c in label_criteria(run, r)}


def run_scorer(run: Run, r: int, precision: str) -> Any:
    """Round r's reward as a ScoreFn on the CPU: its reward model, or with
    ``reward.per_criterion`` each prompt's criterion's model (the pooled one for the rest)."""
    import torch

    from palate.reward.routed import reward_models
    from palate.reward.scoring import load_score_fn
    from palate.training import store_frozen_linears

    source = RewardSource(
        model=str(run.round_dir(r, "reward") / "final"), routes=reward_routes(run, r)
    )
    score = load_score_fn(source, torch.device("cpu"), precision, run.criteria())
    for rm in reward_models(score):
        for module in rm.modules():
            store_frozen_linears(module, precision)
    return score


def held_out_agreement(run: Run, r: int) -> dict[str, dict[str, float | None]]:
    """On the reward stage's held-out pairs (the same prompts for every reward model: the
    split is by prompt, in first-seen order): for the run's reward model and each group's,
    how often it orders the two responses as each group's gold does (gold ties left out)."""
    import numpy as np

    from palate.evaluate import order_agreement
    from palate.reward import load_reward_model

    d = run.round_dir(r, "reward")
    models = {"run": d, **{g: d / "groups" / g for g, _ in group_panels(run)}}
    held = [
        {prompt_text(x["prompt"]) for x in read_jsonl(m / "heldout.jsonl")} for m in models.values()
    ]
    common = set.intersection(*held)  # held out by every model (the same split, checked)
    seen, prompts, first, second = set(), [], [], []
    for row in read_jsonl(d / "heldout.jsonl"):
        key = (prompt_text(row["prompt"]), *sorted((row["chosen"], row["rejected"])))
        if key[0] in common and key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
            first.append(row["chosen"])
            second.append(row["rejected"])
    golds = {}
    for group, _ in group_panels(run):
        score = run.gold(group)
        golds[group] = np.asarray(score(prompts, first)) - np.asarray(score(prompts, second))
    out: dict[str, dict[str, float | None]] = {}
    for name, path in models.items():
        rm = load_reward_model(path / "final")
        delta = (rm.score(prompts, first) - rm.score(prompts, second)).detach().float().numpy()
        out[name] = {group: order_agreement(delta, dg) for group, dg in golds.items()}
    return out


def comparisons_file(run: Run, r: int, part: str | None = None) -> Path:
    """The comparisons round r's reward model trains on: every round's labels so far (rounds
    ≥ 1 concatenate them into ``round-r/labels/all.jsonl``); with rater groups, those of
    ``raters.train_groups``. ``part`` ``groups/<g>``: group g's labels alone;
    ``criteria/<c>``: the labels of criterion c's prompts alone (``labels/<part>.jsonl``)."""
    kind, _, name = (part or "").partition("/")
    keep = [name] if kind == "groups" else run.cfg.raters.train_groups
    if r == 0 and keep is None and not part:
        return run.dir("labels") / "comparisons.jsonl"
    rows = [
        row
        for k in range(r + 1)
        for row in read_jsonl(run.round_dir(k, "labels") / "comparisons.jsonl")
        if (keep is None or row.get("metadata", {}).get("group") in keep)
        and (kind != "criteria" or row.get("metadata", {}).get("criterion", "helpfulness") == name)
    ]
    d = run.round_dir(r, "labels")
    path = d / f"{part}.jsonl" if part else d / ("all.jsonl" if r else "train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return path


def criterion_prompts(run: Run, r: int, criterion: str, source: Path, kind: str) -> str:
    """``source`` (a prompts or samples file) cut to the rows whose prompt is of ``criterion``,
    written beside round r's labels of that criterion: a criterion's reward model is normalised
    on the policy's samples of its own prompts."""
    of = run.criteria()
    rows = [
        rec
        for rec in read_jsonl(source)
        if of.get(prompt_text(rec["prompt"]), "helpfulness") == criterion
    ]
    path = run.round_dir(r, "labels") / "criteria" / f"{criterion}-{kind}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return str(path)


def reward_config(run: Run, r: int = 0, part: str | None = None) -> RewardConfig:
    """Round r's reward stage as a plain ``palate reward train`` config, on every label so far
    (``part``: one more model on some of them, see :func:`comparisons_file`).

    Normalisation is on the round policy's samples with PPO's sampling settings: the pairs
    stage's samples when they were drawn with exactly those settings (free), else fresh samples
    of the policy on the training prompts (for ``criteria/<c>``: on c's prompts alone). Settings
    the user gave win.
    """
    data = run.cfg.reward.model_dump(exclude={"per_criterion"})
    given = run.cfg.reward.normalize.model_fields_set
    norm = data["normalize"]
    kind, _, criterion = (part or "").partition("/")
    if not {"policy", "responses"} & given:
        samples = run.round_dir(r, "pairs") / "samples.jsonl"
        if run.cfg.pairs.sampling == run.cfg.ppo.sampling and samples.is_file():
            norm["responses"] = str(samples)
            if kind == "criteria":
                norm["responses"] = criterion_prompts(run, r, criterion, samples, "samples")
        else:
            norm["policy"] = round_policy(run, r)
            if "prompts" not in given:
                norm["prompts"] = str(run.root / "prompts" / "train.jsonl")
                if kind == "criteria":
                    norm["prompts"] = criterion_prompts(
                        run, r, criterion, run.root / "prompts" / "train.jsonl", "prompts"
                    )
            if "sampling" not in given:
                norm["sampling"] = run.cfg.ppo.sampling.model_dump()
    out = run.round_dir(r, "reward")
    data.update(
        data=str(comparisons_file(run, r, part)),
        output_dir=str(out / part if part else out),
    )
    return RewardConfig.model_validate(data)


def ppo_config(run: Run, r: int = 0) -> PPOConfig:
    """Round r's PPO stage as a plain ``palate ppo`` config. Later rounds continue the previous
    round's LoRA adapter (the reference stays the initial policy) at its last KL coefficient, or
    at ``ppo.later_rounds_kl_coef``, fixed."""
    data = run.cfg.ppo.model_dump()
    later_coef = data.pop("later_rounds_kl_coef")
    own = data.pop("ptx_own_declines")
    shares = data.pop("prompt_shares")
    data.pop("sft_own_declines")
    if r == 0 and (adapter := warm_start_adapter(run)) is not None:
        data["init_adapter"] = str(adapter)
    if own is not None:  # written by stage_ppo before training; none found: no ptx this round
        demos = own_declines_file(run, r)
        if demos.is_file() and demos.stat().st_size > 0:
            data["ppo"].update(ptx_coef=own["coef"], ptx_data=str(demos))
    data.update(
        model=run.policy,
        prompts=str(ppo_prompts_file(run, r) if shares else run.root / "prompts" / "train.jsonl"),
        output_dir=str(run.round_dir(r, "ppo")),
    )
    data["reward"]["model"] = str(run.round_dir(r, "reward") / "final")
    data["reward"]["routes"] = reward_routes(run, r)
    if r > 0:
        prev = RunDir(run.round_dir(r - 1, "ppo"))
        last = prev.latest_checkpoint()
        if last is None:
            raise DataError(f"{prev.path}: no checkpoint to continue from")
        data["init_adapter"] = str(last / "policy")
        beta = prev.read_summary().get("kl_coef_last")
        if later_coef is not None:  # a fixed, usually stiffer leash for the later rounds
            data["kl"].update(coef=later_coef, adaptive=False)
        elif run.cfg.ppo.kl.adaptive and beta is not None:
            data["kl"]["coef"] = float(beta)
    return PPOConfig.model_validate(data)


def ppo_prompts_file(run: Run, r: int) -> Path:
    """Where round r's PPO prompts are with ``ppo.prompt_shares``."""
    return run.round_dir(r, "ppo") / "prompts.jsonl"


def write_ppo_prompts(run: Run, r: int) -> dict[str, int]:
    """``ppo.prompt_shares``: the training prompts with each listed criterion's prompts repeated
    so that they make up about its share of PPO's prompts: a criterion with n of the prompts
    and share s is repeated round(s·M / ((1 − S)·n)) times (at least once), in place, M being
    the prompts of unlisted criteria and S the listed shares' sum. A listed criterion no
    training prompt has (a flag that matched none) is skipped with a warning."""
    shares = run.cfg.ppo.prompt_shares
    train = run.root / "prompts" / "train.jsonl"
    recs = read_jsonl(train)
    of = run.criteria()
    criterion = [of[prompt_text(rec["prompt"])] for rec in recs]
    counts = {c: n for c in shares if (n := criterion.count(c))}
    if missing := sorted(set(shares) - set(counts)):  # e.g. a flag that matched no prompt
        console.print(
            f"[yellow]ppo.prompt_shares: no training prompt in {train} has criterion "
            f"{', '.join(missing)}; PPO's prompts hold none of it[/]"
        )
    others = len(recs) - sum(counts.values())
    total = sum(shares[c] for c in counts)
    repeats = {c: max(1, round(shares[c] * others / ((1 - total) * n))) for c, n in counts.items()}
    out = [rec for rec, c in zip(recs, criterion, strict=True) for _ in range(repeats.get(c, 1))]
    path = ppo_prompts_file(run, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, out)
    console.print(
        "PPO prompts: "
        + "".join(f"{c} {counts[c]} × {repeats[c]}, " for c in counts)
        + f"{len(out)} in all"
    )
    return {f"ppo_prompts_{c}": counts.get(c, 0) * repeats.get(c, 1) for c in shares}


def own_declines_file(run: Run, r: int) -> Path:
    """Where round r's PPO-ptx demonstrations of ``ppo.ptx_own_declines`` are."""
    return run.round_dir(r, "ppo") / "ptx-own-declines.jsonl"


def write_own_declines_to(
    run: Run, r: int, criteria: list[str], path: Path, use: str, if_none: str
) -> tuple[int, int]:
    """The declines among the pairs samples of rounds 0..r on prompts of ``criteria``, each cut
    after its first declining sentence (:func:`palate.safety.decline_opening`), without
    repeats, written to ``path`` as demonstrations (and said, for ``use``); returns (how many,
    on how many prompts)."""
    from palate.safety import decline_opening

    of, keep = run.criteria(), set(criteria)
    demos: dict[tuple[str, str], dict[str, Any]] = {}
    samples = 0
    for i in range(r + 1):
        for rec in read_jsonl(run.round_dir(i, "pairs") / "samples.jsonl"):
            if of.get(prompt_text(rec["prompt"])) not in keep:
                continue
            samples += 1
            cut = decline_opening(rec["response"])
            if cut is not None:
                key = (json.dumps(rec["prompt"], sort_keys=True), cut)
                demos.setdefault(key, {"prompt": rec["prompt"], "response": cut})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, list(demos.values()))
    prompts = len({k for k, _ in demos})
    console.print(
        f"{use}: {len(demos)} from {samples} samples on {'/'.join(sorted(keep))} prompts "
        f"({prompts} prompts)" + ("" if demos else f"; none, so {if_none}")
    )
    return len(demos), prompts


def write_own_declines(run: Run, r: int) -> dict[str, int]:
    """``ppo.ptx_own_declines``: round r's PPO-ptx demonstrations, the declines among the pairs
    samples of rounds 0..r on prompts of the chosen criteria (:func:`write_own_declines_to`).
    They are the initial and the newer policies' own words, so the ptx loss keeps a behaviour
    the policy already had rather than teaching a new one (PPO-ptx: InstructGPT, Ouyang et al.
    2022 §3.5)."""
    own = run.cfg.ppo.ptx_own_declines
    assert own is not None
    n, prompts = write_own_declines_to(
        run,
        r,
        own.criteria,
        own_declines_file(run, r),
        "PPO-ptx on own declines",
        "this round runs without ptx",
    )
    return {"ptx_demos": n, "ptx_demo_prompts": prompts}


def warm_start_dir(run: Run) -> Path:
    """Where ``ppo.sft_own_declines`` fine-tunes round 0's starting adapter."""
    return run.round_dir(0, "ppo") / "warm-start"


def warm_start_adapter(run: Run) -> Path | None:
    """The adapter round 0's PPO starts from, once ``ppo.sft_own_declines`` has trained it."""
    final = warm_start_dir(run) / "final"
    ready = run.cfg.ppo.sft_own_declines is not None and RunDir(warm_start_dir(run)).is_complete()
    return final if ready and (final / "adapter_config.json").is_file() else None


def warm_start(run: Run) -> dict[str, Any]:
    """``ppo.sft_own_declines``: fine-tune LoRA adapters (PPO's shape) on the initial model's
    own declines among round 0's pairs samples on the chosen criteria, for round 0's PPO to
    start from. Skipped when done; with no decline to learn from, PPO starts fresh."""
    from palate.sft import SFTConfig, sft
    from palate.sft.config import SFTTrainSettings
    from palate.training import OptimSettings

    warm = run.cfg.ppo.sft_own_declines
    assert warm is not None
    out = warm_start_dir(run)
    if RunDir(out).is_complete():
        return RunDir(out).read_summary()
    path = run.round_dir(0, "ppo") / "warm-start-declines.jsonl"
    n, prompts = write_own_declines_to(
        run,
        0,
        warm.criteria,
        path,
        "PPO warm start on own declines",
        "PPO starts from fresh adapters",
    )
    if not n:
        return {"warm_start_demos": 0}
    ppo = run.cfg.ppo
    cfg = SFTConfig(
        model=run.policy,
        data=str(path),
        eval_fraction=0.0,
        finetune="lora",
        lora=ppo.lora,
        optim=OptimSettings(lr=warm.lr, schedule="constant", warmup_ratio=0.0),
        train=SFTTrainSettings(epochs=warm.epochs, batch_size=warm.batch_size),
        save="adapter",
        sample_prompts=0,
        seed=run.cfg.seed,
        precision=ppo.precision,
        checkpoint_every=10_000,
        output_dir=str(out),
    )
    summary = sft(cfg)
    return {"warm_start_demos": n, "warm_start_prompts": prompts, **summary}


def stage_ppo(run: Run, stop_after: int | None = None, r: int = 0) -> dict[str, Any]:
    if r == 0 and run.cfg.ppo.sft_own_declines is not None:
        warm_start(run)
    if run.cfg.ppo.prompt_shares:
        write_ppo_prompts(run, r)
    if run.cfg.ppo.ptx_own_declines is not None:
        write_own_declines(run, r)
    # stopping early (stop_after) is the library's, in this process
    summary = launched(run, "ppo", r) if stop_after is None else None
    return summary or run_here(run, "ppo", r, stop_after=stop_after)


def stage_round(run: Run, stage: str) -> dict[str, Any]:
    """One later round (iterated online RLHF): the newest policy answers fresh prompts → pairs
    chosen within the budget → labelled by the run's raters → how stale the last reward model
    was on them → a reward model retrained on every label so far → PPO continued from the newest
    policy. Each step is skipped when done, so a killed round continues where it stopped."""
    r = run.round_no(stage)
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("pairs", lambda: stage_pairs(run, r)),
        ("labels", lambda: stage_labels(run, r)),
        ("reward", lambda: stage_reward(run, r)),
        ("ppo", lambda: stage_ppo(run, r=r)),
    ]
    out: dict[str, Any] = {"stage": stage, "round": r}
    for step, fn in steps:
        d = run.round_dir(r, step)
        if RunDir(d).is_complete():
            result = RunDir(d).read_summary()
        else:
            console.print(f"round {r}: {step}")
            result = fn()
            if "stopped_at" in result:
                return result
        if step == "labels":
            out["staleness"] = staleness(run, r)
        out[step] = result
    summary = {
        "stage": stage,
        "round": r,
        "pairs": out["pairs"]["pairs"],
        "candidates": out["pairs"]["candidates"],
        "select": out["pairs"]["select"],
        "comparisons": out["labels"]["comparisons"],
        "comparisons_total": out["reward"].get("train_pairs", 0)
        + out["reward"].get("eval_pairs", 0),
        **out["staleness"],
        "reward_accuracy": out["reward"].get("eval_accuracy"),
        "ppo_updates": out["ppo"].get("updates"),
        "kl_last": out["ppo"].get("kl_last"),
        "kl_coef_last": out["ppo"].get("kl_coef_last"),
    }
    RunDir(run.dir(stage)).write_summary(summary)
    return summary


def staleness(run: Run, r: int) -> dict[str, Any]:
    """How well the previous round's reward model predicts round r's new labels, before it is
    retrained: its accuracy on them (ties and soft labels aside: the chosen answer scored
    higher), on all of them and on the randomly drawn share alone (the unbiased number: pairs
    chosen for uncertainty are near ½ by construction)."""
    import torch

    from palate.reward.model import load_reward_model

    rows = [
        x for x in read_jsonl(run.round_dir(r, "labels") / "comparisons.jsonl") if not x.get("tie")
    ]
    if not rows:
        return {"stale_accuracy": None, "stale_accuracy_random": None, "stale_n": 0}
    prompts = [x["prompt"] for x in rows]
    if run.cfg.reward.per_criterion:  # each prompt by its criterion's model, as PPO scored it
        score = run_scorer(run, r - 1, "fp32")
    else:
        rm = load_reward_model(run.round_dir(r - 1, "reward") / "final")
        score = rm.score
    chosen = torch.as_tensor(score(prompts, [x["chosen"] for x in rows])).float()
    rejected = torch.as_tensor(score(prompts, [x["rejected"] for x in rows])).float()
    right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()

    def drawn(x: dict[str, Any]) -> bool:  # the export carries the pair's selected_by
        return x.get("metadata", {}).get("selected_by", "random") in ("random", "all")

    rand = [float(v) for v, x in zip(right.tolist(), rows, strict=True) if drawn(x)]
    return {
        "stale_accuracy": float(right.mean()),
        "stale_accuracy_random": sum(rand) / len(rand) if rand else None,
        "stale_n": len(rows),
        "stale_n_random": len(rand),
    }


def stage_eval(run: Run) -> dict[str, Any]:

    from palate.evaluate import (
        checkpoint_policy,
        compare,
        evaluate_policy,
        load_sampler,
        rollout_curve,
    )
    from palate.safety import read_xstest, xstest_rates

    cfg = run.cfg.eval
    precision = run.precision()
    sampling = cfg.sampling or run.cfg.ppo.sampling
    prompts = read_prompts(run.root / "prompts" / "eval.jsonl")
    gold = run.gold()
    # the proxy: the reward model the final policy was optimised against (the last round's;
    # with reward.per_criterion each prompt's criterion's model)
    proxy = run_scorer(run, run.last_round, precision)
    initial, tok = load_sampler(run.policy, precision)
    # checkpoints of every round, numbered by updates since the start (the last is the final)
    per_round = run.cfg.ppo.ppo.updates
    ckpts = (
        [
            (k * per_round + int(ck.name.split("-")[1]), ck)
            for k, d in enumerate(run.ppo_dirs())
            for ck in RunDir(d).complete_checkpoints()
        ][:-1]
        if cfg.checkpoints
        else []
    )
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
    clock = time.perf_counter()
    seconds: dict[str, float] = {}  # what each part of the evaluation cost

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] = round(seconds.get(part, 0.0) + now - clock, 1)
        clock = now

    with progress_bar("eval", total=total) as bar:
        kw["on_batch"] = bar.advance
        old = evaluate_policy(initial, tok, prompts, sampling, **kw)
        final, _ = load_sampler(str(run.ppo_dirs()[-1] / "final"), precision)
        new = evaluate_policy(final, tok, prompts, sampling, reference=initial, **kw)
        lap("final_vs_initial")
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
        lap("xstest")
        sycophancy = {}
        if cfg.sycophancy is not None:
            from palate.sycophancy import measure

            for side, model in (("initial", initial), ("final", final)):
                sycophancy[side] = measure(
                    model,
                    tok,
                    **cfg.sycophancy.model_dump(),
                    # scoring, not sampling: its long prompts differ in length, and batches of 64
                    # padded to their longest cost more than they save (104 s vs 72 s at 16)
                    batch_size=min(cfg.batch_size, 16),
                    precision=precision,
                    seed=cfg.seed,
                )
        lap("sycophancy")
        points = [{"update": 0, "kl": 0.0, **old.means(n_ck)}]
        for update, ck in ckpts:
            model = checkpoint_policy(ck, run.policy, precision)
            scored = evaluate_policy(model, tok, prompts[:n_ck], sampling, reference=initial, **kw)
            points.append({"update": update, **scored.means(n_ck)})
            del model
    points.append({"update": per_round * run.cfg.rounds, **new.means(n_ck)})
    lap("checkpoints")
    overopt = study_overopt(run, initial, tok, prompts, sampling, gold, proxy, points)
    lap("overopt")
    result = compare(new, old, seed=cfg.seed)
    criteria = read_criteria(run.root / "prompts" / "eval.jsonl")
    if len(set(criteria)) > 1:
        result["by_criterion"] = criterion_win_rates(new, old, criteria, cfg.seed)
    if run.cfg.raters.groups:
        result["groups"] = group_eval(run, new, old, proxy, precision, cfg.seed)
        lap("groups")
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
    write_jsonl(
        d / "rollouts.jsonl",
        [
            {**p, "update": k * per_round + p["update"]}
            for k, ppo_dir in enumerate(run.ppo_dirs())
            for p in rollout_curve(ppo_dir / "samples", gold)
        ],
    )
    kl_target = run.cfg.ppo.kl.target if run.cfg.ppo.kl.adaptive else None
    summary = {"stage": "eval", **result, "kl_target": kl_target, "seconds": seconds}
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


def criterion_win_rates(
    new: Any, old: Any, criteria: list[str], seed: int
) -> dict[str, dict[str, Any]]:
    """The gold and proxy win rates on each criterion's held-out prompts (e.g. helpful and
    red-team prompts apart): {criterion: {n, gold_win_rate, gold_low, gold_high, proxy_...}}."""
    from palate.evaluate import win_rate

    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(criteria)):
        idx = [i for i, x in enumerate(criteria) if x == c]
        row: dict[str, Any] = {"n": len(idx)}
        for name in ("gold", "proxy"):
            a, b = getattr(new, name), getattr(old, name)
            if a is None or b is None:
                continue
            wr = win_rate([a[i] for i in idx], [b[i] for i in idx], seed=seed)
            row.update(
                {
                    f"{name}_win_rate": wr["win_rate"],
                    f"{name}_low": wr["low"],
                    f"{name}_high": wr["high"],
                }
            )
        out[c] = row
    return out


def group_eval(
    run: Run, new: Any, old: Any, proxy: Any, precision: str, seed: int
) -> dict[str, Any]:
    """Rater populations: the final policy's win rate over the initial one under each group's
    gold, and how often each reward model (the run's, and with ``per_group_reward`` each
    group's) orders the two answers as each group's gold does."""
    import numpy as np
    import torch

    from palate.evaluate import order_agreement, pairwise_wins, win_rates
    from palate.reward.scoring import load_score_fn

    prompts_new, prompts_old = new.samples.prompts, old.samples.prompts
    out: dict[str, Any] = {"win_rates": {}, "reward_agreement": {}}
    gold_delta = {}
    for group, _ in group_panels(run):
        score = run.gold(group)
        a = np.asarray(score(prompts_new, new.samples.responses), dtype=float)
        b = np.asarray(score(prompts_old, old.samples.responses), dtype=float)
        gold_delta[group] = a - b
        wr = win_rates(pairwise_wins(a, b), new.samples.lengths, old.samples.lengths, seed)
        out["win_rates"][group] = {
            "win_rate": wr["win_rate"],
            "low": wr["low"],
            "high": wr["high"],
            "gold_new": float(a.mean()),
            "gold_old": float(b.mean()),
        }
    models = {"run": proxy}
    if run.cfg.raters.per_group_reward:
        for group, _ in group_panels(run):
            path = run.round_dir(run.last_round, "reward") / "groups" / group / "final"
            models[group] = load_score_fn(
                RewardSource(model=str(path)), torch.device("cpu"), precision
            )
    for name, model in models.items():
        a = np.asarray(model(prompts_new, new.samples.responses), dtype=float)
        b = np.asarray(model(prompts_old, old.samples.responses), dtype=float)
        out["reward_agreement"][name] = {
            group: order_agreement(a - b, dg) for group, dg in gold_delta.items()
        }
    reward = RunDir(run.round_dir(run.last_round, "reward")).read_summary()
    if "gold_agreement" in reward:  # the same, on the reward stage's held-out labelled pairs
        out["held_out_agreement"] = {
            "run": reward["gold_agreement"],
            **{g: v["gold_agreement"] for g, v in reward["groups"].items()},
        }
    return out


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
    per_round = run.cfg.ppo.ppo.updates
    metrics, alarms = [], []
    for k, d in enumerate(run.ppo_dirs()):  # every round's PPO, steps counted from the start
        metrics += [{**m, "step": k * per_round + m["step"]} for m in RunDir(d).metrics()]
        if (d / "alarms.jsonl").is_file():
            alarms += [
                {**a, "update": k * per_round + a["update"], **({"round": k} if k else {})}
                for a in read_jsonl(d / "alarms.jsonl")
            ]
    checkpoints = read_jsonl(eval_dir / "checkpoints.jsonl")
    path = build_report(
        run.dir("report") / "report.html",
        title=f"palate run: {run.root.name}",
        summary=summary,
        stages=stages,
        ppo_metrics=metrics,
        checkpoints=checkpoints,
        rollouts=read_jsonl(eval_dir / "rollouts.jsonl"),
        lengths_initial=[s["length_old"] for s in samples],
        lengths_final=[s["length_new"] for s in samples],
        samples=samples,
        notes=gold_note(run),
        alarms=alarms,
        rounds=round_rows(run, checkpoints) if run.cfg.rounds > 1 else [],
        raters=_read_json(run.dir("labels") / "quality.json"),
    )
    out = {"stage": "report", "report": str(path)}
    RunDir(run.dir("report")).write_summary(out)
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def round_rows(run: Run, checkpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round for the report: labels (new, all so far), how the previous reward model
    did on the new labels, the new one's held-out accuracy, and gold/proxy at the round's end."""
    per_round = run.cfg.ppo.ppo.updates
    at = {p["update"]: p for p in checkpoints}
    rows = []
    for k in range(run.cfg.rounds):
        if k == 0:
            labels = RunDir(run.dir("labels")).read_summary()
            reward = RunDir(run.dir("reward")).read_summary()
            row: dict[str, Any] = {
                "round": 0,
                "comparisons": labels.get("comparisons"),
                "comparisons_total": labels.get("comparisons"),
                "select": "random",
                "reward_accuracy": reward.get("eval_accuracy"),
            }
        else:
            row = dict(RunDir(run.dir(f"round-{k}")).read_summary())
        end = at.get((k + 1) * per_round, {})
        row.update(
            updates=(k + 1) * per_round,
            gold=end.get("gold"),
            proxy=end.get("proxy"),
            kl=end.get("kl"),
        )
        rows.append(row)
    return rows


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
    note = "Gold preference (rubric, never shown to the reward model): " + "; ".join(parts) + "."
    if r.refusal_right:
        note += f" A refusal earns +{r.refusal_bonus:g} on {', '.join(r.refusal_right)} prompts."
    for name, own in g.criteria.items():
        fields = ", ".join(f"{k} {getattr(own, k)}" for k in sorted(own.model_fields_set))
        note += f" On {name} prompts: {fields}."
    return note


STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "sft": stage_sft,
    "pairs": stage_pairs,
    "labels": stage_labels,
    "reward": stage_reward,
    "ppo": stage_ppo,
    "eval": stage_eval,
    "report": stage_report,
}
