"""People as a judge of `palate eval`: a labelling campaign of policy-vs-baseline pairs in a
palate store. The first run creates it; later runs read the labels back (the samples are cached,
so the pairs stay the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from sqlalchemy import select

from palate.config import Config
from palate.data import Prompt, prompt_json
from palate.errors import ConfigError
from palate.eval.policies import PolicySamples
from palate.label.db import Campaign, Label, Pair, open_db
from palate.label.store import PairIn, aggregate, create_campaign

__all__ = ["PeopleJudge", "people_campaign"]


class PeopleJudge(Config):
    """People judge policy-vs-baseline pairs in a palate labeling store."""

    db: str = Field(description="Database URL of the labeling store (sqlite:///... or postgres).")
    campaign: str | None = Field(
        None, description="Campaign name (default: eval-<output directory name>)."
    )
    overlap: int = Field(1, ge=1, description="Raters per pair.")
    guidelines: str | None = Field(None, description="Guidelines file (markdown) shown to raters.")


def people_campaign(
    people: PeopleJudge,
    output_dir: str,
    prompts: list[Prompt],
    base: PolicySamples,
    policies: dict[str, PolicySamples],
) -> tuple[str, dict[str, list[float | None]], dict[str, Any]]:
    """Create (first run) or read back (later runs) the policy-vs-baseline campaign.
    Returns (campaign name, per policy the per-prompt P(policy wins) or None while unlabelled,
    campaign progress)."""

    name = people.campaign or f"eval-{Path(output_dir).resolve().name}"
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
