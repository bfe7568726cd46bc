"""Rater quality (palate/label/quality.py): Dawid-Skene reliability against hand-computed
values, flags for a random clicker and a first-side clicker in a real simulated panel labelling
through the store, reliability-weighted labels, rater populations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlalchemy import select

from palate.eval.gold import GoldRubric, gold_score
from palate.label.db import Campaign, Pair, open_db
from palate.label.quality import (
    LabelRow,
    dawid_skene,
    group_stats,
    label_rows,
    rater_quality,
    weighted_votes,
)
from palate.label.stats import campaign_stats
from palate.label.store import PairIn, create_campaign, export_rows
from palate.raters.simulated import PanelConfig, label_with_panel

from .test_hardening import env  # noqa: F401, F811  (the app: admin, rita, otto, a campaign)

PROMPT = "How do I keep my houseplants healthy in winter?"
REPLIES = [
    "Keep your houseplants near a bright window, water them less often in winter, and watch "
    "for dry air. A little care goes a long way, and your plants will be happy until spring!",
    "Move your plants near a sunny window and water them less in winter. They will be fine.",
    "Houseplants like light in winter. Water less, keep them warm, and enjoy your happy plants!",
    "Keep your houseplants near a bright window, water them less often in",
    "Water them. Water them. Water them. Water them. Water them. Water them.",
    "I'm sorry, but I can't help with that.",
    "Plants.",
    "Winter is a lovely season for reading a good book by the fire with some tea.",
]


def row(pid: int, rater: str, answer: str, gold: str | None = None, **kw) -> LabelRow:
    return LabelRow(pid, rater, answer, kw.get("first"), kw.get("seconds"), 10, gold)


def test_dawid_skene_with_every_answer_known_is_the_counted_confusion() -> None:
    """With every pair a gold item, the model's confusion matrix is the raters' counted hit
    rates: x answers 3 of 4 true-a pairs right and 1 of 2 true-b ones → P(a|a) 0.75, P(b|b)
    0.5, J = 0.25, expected accuracy (prior 4/6) = 4/6 · 0.75 + 2/6 · 0.5 = 2/3."""
    truth = {1: "a", 2: "a", 3: "a", 4: "a", 5: "b", 6: "b"}
    x = {1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "a"}
    y = dict(truth)  # always right
    rows = [row(p, "x", x[p], truth[p]) for p in truth] + [
        row(p, "y", y[p], truth[p]) for p in truth
    ]
    fit = dawid_skene(rows)
    assert fit is not None
    assert fit.confusion["x"] == pytest.approx((0.75, 0.5), abs=1e-6)
    assert fit.confusion["y"] == pytest.approx((1.0, 1.0), abs=1e-6)
    assert fit.prior_a == pytest.approx(4 / 6, abs=1e-6)
    q = rater_quality(rows)
    assert q["x"].informativeness == pytest.approx(0.25, abs=1e-6)
    assert q["x"].reliability == pytest.approx(2 / 3, abs=1e-6)
    assert q["x"].gold_accuracy == pytest.approx(4 / 6)
    # the posterior of a gold item is its known answer
    assert fit.posterior[4] == pytest.approx(1.0, abs=1e-6)


def test_flags_follow_their_thresholds() -> None:
    """One side: the share picking the first-shown response ≥ 0.9; too fast: half the timed
    labels under the reading time (10 words at 15 words/s = 0.67 s); nobody is flagged on fewer
    than min_labels labels."""
    rng = random.Random(0)
    rows = []
    for p in range(40):
        t = rng.choice("ab")
        o = "b" if t == "a" else "a"
        rows.append(LabelRow(p, "good", t, rng.random() < 0.5, 5.0, 10, None))
        rows.append(
            LabelRow(p, "good2", t if rng.random() < 0.9 else o, rng.random() < 0.5, 5.0, 10, None)
        )
        # 37 of 40 on the first shown: 0.925 ≥ 0.9; its answers are random w.r.t. the truth
        rows.append(LabelRow(p, "side", rng.choice("ab"), p >= 3, 0.5 if p % 2 else 5.0, 10, None))
    q = rater_quality(rows)
    assert q["good"].flags == [] and q["good2"].flags == []
    assert q["side"].first_share == pytest.approx(37 / 40)
    assert q["side"].fast_share == pytest.approx(0.5)
    assert q["side"].flags == ["one_side", "too_fast"]
    few = rater_quality(rows[:30])  # 10 labels each
    assert all(not v.flags for v in few.values())


def _panel_campaign(tmp_path: Path, n: int = 120, seed: int = 0):
    """n pairs of replies of varied gold quality; 10 of them gold items with the known answer."""
    rubric = GoldRubric()
    scores = [gold_score(PROMPT, r, rubric) for r in REPLIES]
    rng = random.Random(seed)
    pairs, truth = [], {}
    while len(pairs) < n:
        i, j = rng.sample(range(len(REPLIES)), 2)
        if abs(scores[i] - scores[j]) < 1e-9:
            continue
        better = "a" if scores[i] > scores[j] else "b"
        gold = better if len(pairs) < 10 else None
        pairs.append(PairIn(prompt=PROMPT, response_a=REPLIES[i], response_b=REPLIES[j], gold=gold))
        truth[len(pairs)] = better  # pair ids start at 1
    db = str(tmp_path / "quality.db")
    with open_db(db)() as s:
        create_campaign(s, "quality", pairs, overlap=5)
    return db, truth


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """5 simulated raters label 120 pairs through the store, each pair by all five: 3 careful
    (Bradley-Terry noise at temperature 1.5: often wrong on close pairs), one clicking at
    random, one always picking the response shown first."""
    tmp = tmp_path_factory.mktemp("panel")
    db, truth = _panel_campaign(tmp)
    cfg = PanelConfig(raters=3, temperature=1.5, seed=3, random_raters=1, first_raters=1)
    out = label_with_panel(db, "quality", cfg)
    assert out["labels"] == 600 and out["raters"] == 5
    return db, truth


def test_panel_random_and_first_side_raters_are_flagged(panel) -> None:
    db, _ = panel
    with open_db(db)() as s:
        camp = s.scalar(select(Campaign))
        rows = label_rows(s, [camp.id])
        stats = campaign_stats(s, camp)
    q = rater_quality(rows)
    flags = {name: v.flags for name, v in q.items()}
    assert flags["sim-random-0"][:1] == ["random"] and "too_fast" in flags["sim-random-0"]
    assert flags["sim-first-0"][:1] == ["one_side"] and "too_fast" in flags["sim-first-0"]
    assert all(flags[f"sim-{i}"] == [] for i in range(3)), flags
    assert q["sim-first-0"].first_share == 1.0
    for i in range(3):  # the careful raters are informative, the spammers are not
        assert q[f"sim-{i}"].informativeness > 0.4 > abs(q["sim-random-0"].informativeness)
    assert stats["flagged"] == ["sim-first-0", "sim-random-0"]
    # gold items scored per rater: their answers on the 10 gold pairs, counted by hand
    by_rater: dict[str, list[bool]] = {}
    for r in rows:
        if r.gold is not None:
            by_rater.setdefault(r.rater, []).append(r.answer == r.gold)
    dash = {r["rater"]: r for r in stats["raters"]}
    for name, hits in by_rater.items():
        assert len(hits) == 10
        assert dash[name]["gold_accuracy"] == pytest.approx(sum(hits) / 10)


def test_reliability_weighted_labels_beat_the_majority(panel, capsys) -> None:
    """On the pairs that are not gold items, the Dawid-Skene posterior agrees with the gold
    more often than the majority of the five votes, and leaving the flagged raters out does
    not hurt."""
    db, truth = panel
    with open_db(db)() as s:
        camp = s.scalar(select(Campaign))
        majority = {r["metadata"]["pair_id"]: r for r in export_rows(s, camp)}
        weighted = {
            r["metadata"]["pair_id"]: r for r in export_rows(s, camp, aggregate="reliability")
        }
        dropped = export_rows(
            s, camp, aggregate="reliability", drop_raters=["sim-random-0", "sim-first-0"]
        )
    test = [p for p in truth if p > 10]

    with open_db(db)() as s:
        resp_a = {p.id: p.response_a for p in s.scalars(select(Pair))}

    def acc(rows_by_pair: dict) -> float:
        return sum(
            ("a" if rows_by_pair[p]["chosen"] == resp_a[p] else "b") == truth[p] for p in test
        ) / len(test)

    maj, wt = acc(majority), acc(weighted)
    dr = acc({r["metadata"]["pair_id"]: r for r in dropped})
    with capsys.disabled():
        print(
            f"\ngold agreement on {len(test)} pairs: majority {maj:.3f}, reliability-weighted "
            f"{wt:.3f}, flagged raters dropped {dr:.3f}"
        )
    assert wt > maj
    assert dr >= maj
    # the weighted export marks itself and keeps the votes, their times and raters' attributes
    r = weighted[test[0]]
    assert r["metadata"]["aggregate"] == "reliability"
    assert len(r["metadata"]["labels"]) == 5
    assert all(v["seconds"] > 0 for v in r["metadata"]["labels"])


def test_groups_agree_within_and_differ_between() -> None:
    """Two groups that prefer opposite sides on pairs 1-3 and agree on 4: within-group
    agreement 1, between-group agreement 1/4, the disputed pairs listed first."""
    rows = []
    for p in (1, 2, 3, 4):
        for r in ("n1", "n2"):
            rows.append(row(p, r, "a"))
        for r in ("s1", "s2"):
            rows.append(row(p, r, "b" if p < 4 else "a"))
    attrs = {
        "n1": {"region": "north"},
        "n2": {"region": "north"},
        "s1": {"region": "south"},
        "s2": {"region": "south"},
    }
    out = group_stats(rows, attrs, top=2)["region"]
    assert out["groups"]["north"] == {"raters": ["n1", "n2"], "labels": 8, "agreement_within": 1.0}
    assert out["groups"]["south"]["agreement_within"] == 1.0
    (b,) = out["between"]
    assert b["groups"] == ["north", "south"] and b["shared_pairs"] == 4
    assert b["agreement"] == pytest.approx(4 / 16)  # pair 4: 2 × 2 agreeing label pairs
    assert b["mean_gap"] == pytest.approx(0.75)
    assert [d["pair_id"] for d in b["most_disputed"]] == [1, 2]
    assert b["most_disputed"][0]["p_a"] == {"north": 1.0, "south": 0.0}


def test_a_population_with_another_taste_is_not_flagged_within_groups() -> None:
    """Three raters of one taste, two of the opposite (each right 90% by their own taste):
    one latent-class model over everyone calls the minority `opposite`; fitted within each
    group (settings.within), nobody is flagged."""
    from palate.label.quality import QualitySettings

    rng = random.Random(1)
    rows = []
    for p in range(60):
        t = rng.choice("ab")
        for r, taste in [("n1", t), ("n2", t), ("n3", t), ("s1", _other(t)), ("s2", _other(t))]:
            ans = taste if rng.random() < 0.9 else _other(taste)
            rows.append(LabelRow(p, r, ans, rng.random() < 0.5, None, 10, None))
    pooled = rater_quality(rows)
    assert pooled["s1"].flags == ["opposite"] and pooled["s2"].flags == ["opposite"]
    assert pooled["n1"].flags == []
    attrs = {
        r: {"region": "north" if r[0] == "n" else "south"} for r in ("n1", "n2", "n3", "s1", "s2")
    }
    within = rater_quality(rows, QualitySettings(within="region"), attrs)
    assert all(q.flags == [] for q in within.values())
    assert within["s1"].informativeness > 0.6


def _other(x: str) -> str:
    return "b" if x == "a" else "a"


def test_weighted_votes_ignore_dropped_raters() -> None:
    rows = [row(1, "x", "a"), row(1, "y", "b"), row(2, "x", "a"), row(2, "y", "a")]
    assert weighted_votes(rows, drop=["y"])[1] > 0.5
    assert weighted_votes(rows, drop=["x"])[1] < 0.5


# ---------------------------------------------------------------------- the app, both databases


def test_attributes_strength_reason_and_time_round_trip_through_the_export(env) -> None:  # noqa: F811
    """The admin sets rita's attributes on the dashboard (a bad one is refused beside the form,
    nothing written); rita labels over the API with a strength, a reason and her time; the
    export carries all of it with the source; the pair page shows her label; the weighted
    export answers, a bad aggregate is a 400."""
    from fastapi.testclient import TestClient

    from palate.label.db import User

    from .test_app import login
    from .test_hardening import admin_client, admin_post

    app, ids = env
    a = admin_client(app)
    with app.state.sessionmaker() as db:
        rita = db.scalar(select(User).where(User.name == "rita"))
    r = admin_post(a, f"/admin/users/{rita.id}/attributes", attributes="region=EU, language=de")
    assert r.status_code == 303
    bad = admin_post(a, f"/admin/users/{rita.id}/attributes", attributes="region=EU, 9x=1")
    assert bad.status_code == 400 and "attribute name &#39;9x&#39;" in bad.text
    with app.state.sessionmaker() as db:
        assert db.get(User, rita.id).attributes == {"region": "EU", "language": "de"}
    dash = a.get("/admin").text
    assert 'value="region=EU, language=de"' in dash

    h = {"Authorization": f"Bearer {ids['rita']}"}
    c = TestClient(app)
    got = c.post(f"/api/v1/campaigns/{ids['camp']}/next", headers=h).json()
    body = {"answer": "a", "strength": "clearly", "comment": "more on topic", "seconds": 12.5}
    r = c.post(f"/api/v1/assignments/{got['assignment_id']}/label", json=body, headers=h)
    assert r.status_code == 200
    rows = [
        json.loads(x) for x in a.get(f"/admin/campaigns/{ids['camp']}/export").text.splitlines()
    ]
    (row,) = rows
    assert row["chosen"] == got["a"] and row["source"] == "human"
    assert row["metadata"]["labels"] == [
        {
            "rater": "rita",
            "answer": "a" if _pair_a(app, row) == got["a"] else "b",  # in the pair's order
            "attributes": {"region": "EU", "language": "de"},
            "strength": "clearly",
            "seconds": 12.5,
            "comment": "more on topic",
        }
    ]
    dash = a.get("/admin").text  # her group appears in the populations section
    assert "Raters by region" in dash and "Raters by language" in dash
    page = a.get(f"/admin/pairs/{row['metadata']['pair_id']}")
    assert page.status_code == 200
    assert "rita" in page.text and "region=EU" in page.text and "more on topic" in page.text
    assert "clearly" in page.text and "first" in page.text  # she picked the response shown first
    assert a.get("/admin/pairs/999999").status_code == 404
    weighted = a.get(f"/admin/campaigns/{ids['camp']}/export?aggregate=reliability")
    assert json.loads(weighted.text)["metadata"]["aggregate"] == "reliability"
    assert a.get(f"/admin/campaigns/{ids['camp']}/export?aggregate=vibes").status_code == 400
    # raters cannot see the pair page
    rater = TestClient(app)
    login(rater, "otto", "pw-otto")
    assert rater.get(f"/admin/pairs/{row['metadata']['pair_id']}").status_code == 403


def _pair_a(app, row) -> str:
    from palate.label.db import Pair

    with app.state.sessionmaker() as db:
        return db.get(Pair, row["metadata"]["pair_id"]).response_a


def test_attributes_are_validated() -> None:
    from palate.errors import ConfigError
    from palate.label.store import clean_attributes, parse_attributes

    assert parse_attributes(" region = EU ,language=de, ") == {"region": "EU", "language": "de"}
    assert parse_attributes("") == {}
    for bad, why in [
        ("region", "not name=value"),
        ("region=EU, region=US", "given twice"),
        ("region=", "must not be empty"),
        ("a b=1", "attribute name"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_attributes(bad)
    with pytest.raises(ConfigError, match="at most 20"):
        clean_attributes({f"k{i}": "v" for i in range(21)})
    with pytest.raises(ConfigError, match="expected text"):
        clean_attributes({"k": ["list"]})


def test_cli_quality_and_weighted_export(panel, tmp_path: Path) -> None:
    """`palate label quality` lists the flagged raters; `palate label export` with
    aggregate=reliability and drop_flagged leaves them out; `palate label user` takes
    attributes."""
    from typer.testing import CliRunner

    from palate.cli import app

    db, _ = panel
    res = CliRunner().invoke(
        app, ["label", "quality", "--set", f"db={db}", "--set", "campaign=quality", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["flagged"] == ["sim-first-0", "sim-random-0"] and out["labels"] == 600
    dest = tmp_path / "weighted.jsonl"
    args = ["label", "export", "--set", f"db={db}", "--set", "campaign=quality"]
    args += ["--set", f"output={dest}", "--set", "aggregate=reliability"]
    args += ["--set", "drop_flagged=true", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in dest.read_text().splitlines()]
    assert len(rows) == 120
    assert all(
        set(r["metadata"]["raters"]) == {"sim-0", "sim-1", "sim-2"}
        and r["metadata"]["aggregate"] == "reliability"
        for r in rows
    )
    args = ["label", "user", "--set", f"db={db}", "--set", "name=ana"]
    res = CliRunner().invoke(app, [*args, "--set", "attributes={region: EU}", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["attributes"] == {"region": "EU"}
