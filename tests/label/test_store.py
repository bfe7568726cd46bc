"""The preference store on a fresh SQLite database per test: assignment, overlap, export."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import func, select

from palate.errors import ConfigError
from palate.label.db import Assignment, Label, open_db
from palate.label.store import (
    LabelIn,
    PairIn,
    create_campaign,
    create_user,
    export_rows,
    flip,
    next_assignment,
    progress,
    skip_assignment,
    submit_label,
)


@pytest.fixture
def db(db_url: str):
    factory = open_db(db_url)
    with factory() as session:
        yield session


def pairs(n: int) -> list[PairIn]:
    return [
        PairIn(prompt=f"question {i}", response_a=f"good {i}", response_b=f"bad {i}")
        for i in range(n)
    ]


def test_migrations_create_the_schema_and_are_idempotent(tmp_path: Path) -> None:
    url = str(tmp_path / "x.db")
    open_db(url)
    open_db(url)  # already at head: no error
    import sqlite3

    con = sqlite3.connect(url)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"users", "campaigns", "pairs", "assignments", "labels", "alembic_version"} <= tables
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_upgrade_from_0001_hashes_existing_invites(db_url: str) -> None:
    """A database made by the first schema (plain-text invite tokens) upgrades in place: the
    token is hashed, keeps working for a week, and campaigns become active."""
    import sqlalchemy as sa

    from palate.label.db import make_engine
    from palate.label.migrate import upgrade
    from palate.label.store import invite_status

    engine = make_engine(db_url)
    upgrade(engine, "0001")
    with engine.begin() as con:
        con.execute(
            sa.text(
                "INSERT INTO users (name, role, invite_token, created_at) "
                "VALUES ('old', 'rater', 'plain-token', CURRENT_TIMESTAMP)"
            )
        )
        con.execute(
            sa.text(
                "INSERT INTO campaigns (name, guidelines, overlap, answers, source, created_at) "
                "VALUES ('c', '', 1, '[\"a\", \"b\"]', '', CURRENT_TIMESTAMP)"
            )
        )
    factory = open_db(db_url)  # to head
    with factory() as s:
        user, why = invite_status(s, "plain-token")
        assert why == "ok" and user is not None and user.name == "old"
        stored = s.execute(sa.text("SELECT invite_hash FROM users")).scalar()
        assert stored != "plain-token" and len(stored) == 64
        assert s.execute(sa.text("SELECT status FROM campaigns")).scalar() == "active"
    engine.dispose()


def test_upgrade_from_0002_marks_the_simulated_panel(db_url: str) -> None:
    """Users made before kinds existed become human, except the panel's sim-N raters."""
    import sqlalchemy as sa

    from palate.label.db import User, make_engine
    from palate.label.migrate import upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0002")
    with engine.begin() as con:
        for name in ("alice", "sim-0", "sim-12"):
            con.execute(
                sa.text(
                    "INSERT INTO users (name, role, active, created_at) "
                    "VALUES (:n, 'rater', true, CURRENT_TIMESTAMP)"
                ),
                {"n": name},
            )
    factory = open_db(db_url)
    with factory() as s:
        kinds = {u.name: u.kind for u in s.scalars(select(User))}
    assert kinds == {"alice": "human", "sim-0": "simulated", "sim-12": "simulated"}
    engine.dispose()


def test_overlap_and_no_pair_twice_for_a_rater(db) -> None:
    camp = create_campaign(db, "c", pairs(3), overlap=2)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    seen: dict[int, set[int]] = {r.id: set() for r in raters}
    rng = random.Random(0)
    for _round in range(3):
        for r in raters:
            a = next_assignment(db, camp, r, rng)
            if a is None:
                continue
            assert a.pair_id not in seen[r.id]
            seen[r.id].add(a.pair_id)
            submit_label(db, a, r, LabelIn(answer="a"))
    # 3 pairs x overlap 2 = 6 labels, no pair over its overlap, nobody labels a pair twice
    assert db.scalar(select(func.count(Label.id))) == 6
    per_pair = db.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
    assert all(n == 2 for _, n in per_pair)
    assert all(next_assignment(db, camp, r) is None for r in raters)
    assert progress(db, camp) == {"pairs": 3, "labels": 6, "target": 6}


def test_open_assignment_is_returned_again_and_skip_frees_the_slot(db) -> None:
    camp = create_campaign(db, "c", pairs(1), overlap=1)
    r1, r2 = create_user(db, "r1")[0], create_user(db, "r2")[0]
    a = next_assignment(db, camp, r1)
    assert next_assignment(db, camp, r1).id == a.id  # same open assignment until answered
    assert next_assignment(db, camp, r2) is None  # the only slot is taken
    skip_assignment(db, a, r1)
    b = next_assignment(db, camp, r2)
    assert b is not None and b.pair_id == a.pair_id
    assert next_assignment(db, camp, r1) is None  # never shown a skipped pair again


def test_labels_are_stored_in_pair_orientation(db) -> None:
    camp = create_campaign(db, "c", pairs(40), overlap=1)
    r = create_user(db, "r")[0]
    swapped = 0
    while a := next_assignment(db, camp, r, random.Random(len(db.scalars(select(Label)).all()))):
        swapped += a.swapped
        # the rater always prefers what was shown on the left
        submit_label(db, a, r, LabelIn(answer="a", strength="clearly"))
    assert 0 < swapped < 40
    for lab in db.scalars(select(Label)):
        a = db.get(Assignment, lab.assignment_id)
        assert lab.answer == ("b" if a.swapped else "a")


def test_other_raters_assignment_is_refused(db) -> None:
    camp = create_campaign(db, "c", pairs(1))
    r1, r2 = create_user(db, "r1")[0], create_user(db, "r2")[0]
    a = next_assignment(db, camp, r1)
    with pytest.raises(PermissionError):
        submit_label(db, a, r2, LabelIn(answer="a"))
    with pytest.raises(ConfigError, match="answer"):
        submit_label(db, a, r1, LabelIn(answer="left"))


def test_export_aggregates_votes_into_soft_labels(db, tmp_path: Path) -> None:
    camp = create_campaign(db, "c", pairs(2), overlap=3)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    votes = {0: ["a", "a", "b"], 1: ["tie", "tie", "a"]}  # pair index -> answers (pair order)
    for r_i, r in enumerate(raters):
        for _ in range(2):
            a = next_assignment(db, camp, r)
            want = votes[a.pair_id - 1][r_i]
            shown = flip(want, a.swapped)
            submit_label(db, a, r, LabelIn(answer=shown))
    rows = export_rows(db, camp)
    assert len(rows) == 2
    assert rows[0]["chosen"] == "good 0" and rows[0]["prob_chosen"] == pytest.approx(2 / 3)
    assert rows[0]["tie"] is False and sorted(rows[0]["metadata"]["raters"]) == ["r0", "r1", "r2"]
    assert rows[1]["tie"] is True and rows[1]["prob_chosen"] == pytest.approx(2 / 3)
    # the export is a comparisons file palate's reward trainer reads
    from palate.data import read_records, write_jsonl

    path = tmp_path / "export.jsonl"
    write_jsonl(path, rows)
    comps = read_records(path, "comparisons").records
    assert len(comps) == 2 and comps[1].tie and comps[0].prob_chosen == pytest.approx(2 / 3)


def test_label_commands_create_export_user(tmp_path: Path) -> None:
    from palate.errors import DataError
    from palate.label.campaign import (
        LabelCreateConfig,
        LabelExportConfig,
        LabelUserConfig,
        add_label_user,
        create_label_campaign,
        export_label_campaign,
    )

    db = str(tmp_path / "cli.db")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(
        '{"prompt": "hi", "response_a": "x", "response_b": "y"}\n'
        '{"prompt": "yo", "chosen": "c", "rejected": "r"}\n'
    )
    user = add_label_user(LabelUserConfig(db=db, name="admin", role="admin"))
    assert user["api_token"] and user["invite_path"].startswith("/invite/")
    made = create_label_campaign(LabelCreateConfig(db=db, name="p", pairs=str(pairs_file)))
    assert made["pairs"] == 2
    with pytest.raises(ConfigError, match="already exists"):
        create_label_campaign(LabelCreateConfig(db=db, name="p", pairs=str(pairs_file)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        create_label_campaign(LabelCreateConfig(db=db, name="q", pairs=str(bad)))
    out = export_label_campaign(LabelExportConfig(db=db, campaign="p", output=str(tmp_path / "o")))
    assert out["comparisons"] == 0
    with pytest.raises(ValueError):
        LabelCreateConfig(db=db, name="r")  # neither pairs nor prompts


def test_campaign_from_model_samples(tmp_path: Path) -> None:
    from palate.label.campaign import LabelCreateConfig, create_label_campaign
    from palate.label.db import Pair

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n{"prompt": "Name a colour"}\n')
    db = str(tmp_path / "s.db")
    made = create_label_campaign(
        LabelCreateConfig(
            db=db,
            name="sampled",
            prompts=str(prompts),
            model="tiny",
            samples_per_prompt=4,
            max_new_tokens=5,
        )
    )
    assert made["pairs"] == 4  # 2 prompts x 4 samples / 2
    with open_db(db)() as s:
        rows = list(s.scalars(select(Pair)))
    assert [r.prompt for r in rows] == ["Say hi"] * 2 + ["Name a colour"] * 2
    assert all(r.source_a == "tiny" and r.response_a is not None for r in rows)


def test_dashboard_statistics_hand_computed(db) -> None:
    import krippendorff
    import numpy as np

    from palate.label.stats import campaign_stats

    ps = pairs(3)
    ps[2].gold = "a"
    camp = create_campaign(db, "c", ps, overlap=3)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    # answers (pair orientation) per rater for pairs 1..3
    table = {0: ["a", "a", "a"], 1: ["a", "b", "a"], 2: ["b", "b", "tie"]}
    for r_i, r in enumerate(raters):
        for _ in range(3):
            a = next_assignment(db, camp, r)
            want = table[r_i][a.pair_id - 1]
            shown = flip(want, a.swapped)
            submit_label(
                db,
                a,
                r,
                LabelIn(answer=shown, seconds=2.0 + r_i, flags=["evasive"] if r_i == 2 else []),
            )
    st = campaign_stats(db, camp)
    # pair1: a,a,b → 1 of 3 rater pairs agree; pair2: a,b,b → 1/3; pair3: a,a,tie → 1/3
    assert st["pairwise_agreement"] == pytest.approx(3 / 9)
    data = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 2]], dtype=float)
    want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert st["krippendorff_alpha"] == pytest.approx(want)
    by = {r["rater"]: r for r in st["raters"]}
    # r0 vs the others' majority: pair1 others (a,b) no majority; pair2 others (b,b)=b≠a;
    # pair3 others (a,tie) none → 0 of 1
    assert by["r0"]["majority_agreement"] == 0.0
    assert by["r1"]["majority_agreement"] is None  # others split on every pair
    assert by["r2"]["majority_agreement"] == 0.0  # pairs 1 and 3: others say a, r2 did not
    assert by["r0"]["gold_accuracy"] == 1.0 and by["r2"]["gold_accuracy"] == 0.0
    assert by["r1"]["median_seconds"] == 3.0 and st["median_seconds"] == 3.0
    assert st["flags"] == {"evasive": 3} and st["complete_pairs"] == 3


def test_plain_postgres_urls_use_psycopg3() -> None:
    from palate.label.db import make_engine

    for url in ("postgresql://u@localhost/db", "postgres://u@localhost/db"):
        assert make_engine(url).url.drivername == "postgresql+psycopg"
    assert make_engine("x.db").url.drivername == "sqlite"


def test_sources_soft_labels_and_judge_vs_people_hand_computed(db) -> None:
    """Two people and an AI judge on 3 pairs: the judge's soft label (given in the order it was
    shown) is stored in the pair's orientation, exported per source, and compared with the
    people's majority on the dashboard."""
    from palate.label.stats import campaign_stats

    camp = create_campaign(db, "c", pairs(3), overlap=3)
    people = [create_user(db, f"p{i}")[0] for i in range(2)]
    judge = create_user(db, "ai:judge", kind="ai")[0]
    with pytest.raises(ConfigError, match="user kind"):
        create_user(db, "x", kind="robot")
    human = {0: ["a", "a", "b"], 1: ["a", "b", "b"]}  # rater -> answers for pairs 1..3
    for r_i, r in enumerate(people):
        for _ in range(3):
            a = next_assignment(db, camp, r)
            submit_label(db, a, r, LabelIn(answer=flip(human[r_i][a.pair_id - 1], a.swapped)))
    p_a = {1: 0.9, 2: 0.3, 3: 0.2}  # the judge's P(response_a better), pair orientation
    for _ in range(3):
        a = next_assignment(db, camp, judge)
        want = p_a[a.pair_id]
        shown_prob = 1 - want if a.swapped else want
        answer = flip("a" if want >= 0.5 else "b", a.swapped)
        submit_label(db, a, judge, LabelIn(answer=answer, prob=shown_prob, principle="harm"))
    with pytest.raises(ConfigError, match="prob"):
        from palate.label.store import check_label

        check_label(camp, LabelIn(answer="a", prob=1.5))
    stored = {
        lab.pair_id: lab for lab in db.scalars(select(Label).where(Label.rater_id == judge.id))
    }
    assert {k: round(v.prob, 6) for k, v in stored.items()} == p_a
    assert {v.principle for v in stored.values()} == {"harm"}

    rows = export_rows(db, camp)
    assert [r["source"] for r in rows] == ["human", "ai"] * 3  # one row per pair and source
    ai = [r for r in rows if r["source"] == "ai"]
    # pair 1: a at 0.9; pair 2: b at 0.7; pair 3: b at 0.8 (the soft label, not the vote)
    assert [r["chosen"] for r in ai] == ["good 0", "bad 1", "bad 2"]
    assert [r["prob_chosen"] for r in ai] == pytest.approx([0.9, 0.7, 0.8])
    assert ai[0]["metadata"]["principles"] == ["harm"] and ai[0]["rater_id"] == "ai:judge"
    assert len(export_rows(db, camp, sources=["ai"])) == 3

    st = campaign_stats(db, camp)
    # people: pair 1 a,a agree; pair 2 a,b; pair 3 b,b → 2 of 3
    assert st["sources"]["human"] == {"labels": 6, "pairwise_agreement": pytest.approx(2 / 3)}
    assert st["sources"]["ai"] == {"labels": 3, "pairwise_agreement": None}
    # judge vs people's majority: pair 1 a=a ✓, pair 2 people split (left out), pair 3 b=b ✓
    assert st["ai_vs_human"] == {"pairs": 2, "agreement": 1.0}
    assert {r["rater"]: r["kind"] for r in st["raters"]} == {
        "p0": "human",
        "p1": "human",
        "ai:judge": "ai",
    }


def test_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    """Alembic's autogenerate finds nothing to change after every migration ran: a column added
    to a model without its migration (or the reverse) fails here, on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from palate.label.db import Base, open_db

    with open_db(db_url)() as s:
        diff = compare_metadata(MigrationContext.configure(s.connection()), Base.metadata)
    assert diff == []
