"""Simulated raters label a campaign through the store (palate.raters.simulated)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from palate.raters.simulated import PanelConfig, choose, label_with_panel
from tests.eval.test_gold import GOOD, PROMPT


def test_bradley_terry_choice_noise() -> None:
    cfg = PanelConfig(temperature=0.5)
    rng = random.Random(0)
    picks = [choose(1.0, 0.5, 0, 0.0, cfg, rng) for _ in range(4000)]
    # P(A) = σ(0.5 / 0.5) = 0.731
    assert picks.count("a") / 4000 == pytest.approx(0.731, abs=0.03)
    assert choose(1.0, 1.0, 0, 0.0, PanelConfig(tie_band=0.1), rng) == "tie"


def test_panel_labels_a_campaign_through_the_store(tmp_path: Path) -> None:
    from palate.label.db import open_db
    from palate.label.stats import campaign_stats
    from palate.label.store import PairIn, create_campaign, export_rows

    db = str(tmp_path / "sim.db")
    with open_db(db)() as s:
        pairs = [
            PairIn(
                prompt=PROMPT,
                response_a=GOOD if i % 2 else GOOD[:50],
                response_b=GOOD[:50] if i % 2 else GOOD,
            )
            for i in range(20)
        ]
        create_campaign(s, "sim", pairs, overlap=3)
    out = label_with_panel(db, "sim", PanelConfig(raters=3, temperature=0.2, seed=1))
    assert out["labels"] == 60
    with open_db(db)() as s:
        from sqlalchemy import select

        from palate.label.db import Campaign

        camp = s.scalar(select(Campaign))
        rows = export_rows(s, camp)
        stats = campaign_stats(s, camp)
    assert len(rows) == 20 and all(r["chosen"] == GOOD for r in rows)  # the gold side wins
    assert stats["pairwise_agreement"] == 1.0 and len(stats["raters"]) == 3


def test_shared_length_bias_overrides_the_gold(tmp_path: Path) -> None:
    """A panel that shares a strong taste for short answers picks the short side even where the
    gold prefers the long one (the biased labels a reward model then learns)."""
    from sqlalchemy import select

    from palate.label.db import Campaign, open_db
    from palate.label.store import PairIn, create_campaign, export_rows

    db = str(tmp_path / "bias.db")
    short = GOOD[:50]
    with open_db(db)() as s:
        pairs = [PairIn(prompt=PROMPT, response_a=GOOD, response_b=short) for _ in range(10)]
        create_campaign(s, "bias", pairs, overlap=3)
    cfg = PanelConfig(raters=3, temperature=0.2, seed=1, length_bias_mean=-5.0)
    label_with_panel(db, "bias", cfg)
    with open_db(db)() as s:
        rows = export_rows(s, s.scalar(select(Campaign)))
    assert len(rows) == 10 and all(r["chosen"] == short for r in rows)


def test_an_empty_reply_is_labelled_and_loses(tmp_path: Path) -> None:
    """A policy may end a reply at once (one reply in 512 did, in a quickstart's second round):
    its pairs file is valid, the panel labels it, and the empty side loses under the gold."""
    from palate.label.campaign import LabelCreateConfig, create_label_campaign
    from palate.label.db import Campaign, open_db
    from palate.label.store import export_rows

    rows = [{"prompt": PROMPT, "response_a": "", "response_b": GOOD}] * 4
    rows += [{"prompt": PROMPT, "response_a": GOOD, "response_b": " "}] * 4
    rows += [{"prompt": PROMPT, "response_a": "", "response_b": ""}]  # two empty samples
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "sim.db")
    create_label_campaign(LabelCreateConfig(name="empty", db=db, pairs=str(pairs), overlap=1))
    out = label_with_panel(db, "empty", PanelConfig(raters=1, temperature=0.2, seed=0))
    assert out["labels"] == 9
    with open_db(db)() as s:
        from sqlalchemy import select

        exported = export_rows(s, s.scalar(select(Campaign)))
    one_empty = [
        r for r in exported if (r["chosen"].strip() == "") != (r["rejected"].strip() == "")
    ]
    assert len(one_empty) == 8 and all(r["chosen"] == GOOD for r in one_empty)
