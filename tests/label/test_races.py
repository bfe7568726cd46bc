"""Races over real HTTP against a running ``palate serve`` (SQLite and PostgreSQL): every state
change is conditional, so retries and concurrent skip/label never double-count a slot."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from palate.label.db import Assignment, Label, Pair, open_db

from .test_server import make_campaign, start_server


def invariants(db_url: str, cid: int, overlap: int) -> dict[str, Any]:
    """The store's invariants, read straight from the database."""
    factory = open_db(db_url)
    with factory() as s:
        pairs = list(s.scalars(select(Pair).where(Pair.campaign_id == cid)))
        live = dict(
            s.execute(
                select(Assignment.pair_id, func.count())
                .where(Assignment.status.in_(["open", "done"]))
                .group_by(Assignment.pair_id)
            ).all()
        )
        labels = dict(s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all())
        dup = s.execute(
            select(Label.pair_id, Label.rater_id, func.count())
            .group_by(Label.pair_id, Label.rater_id)
            .having(func.count() > 1)
        ).all()
        return {
            "slot_mismatch": [p.id for p in pairs if p.n_assigned != live.get(p.id, 0)],
            "over_overlap": [p for p, n in labels.items() if n > overlap],
            "negative": [p.id for p in pairs if p.n_assigned < 0],
            "duplicates": dup,
            "labels": sum(labels.values()),
        }


def parallel(n: int, fn) -> list[Any]:
    """``fn(i)`` for i < n, all released at the same instant from n threads."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


@pytest.fixture
def server(db_url: str):
    started: list[Any] = []

    def start(n_pairs: int, overlap: int, n_raters: int) -> tuple[str, int, list[str]]:
        cid, tokens = make_campaign(db_url, n_pairs, overlap, n_raters)
        proc, url = start_server(db_url)
        started.append(proc)
        return url, cid, tokens

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


def warm_clients(url: str, token: str, n: int) -> list[httpx.Client]:
    """n clients with an open connection each, so parallel requests really arrive together."""
    clients = [
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        for _ in range(n)
    ]
    for c in clients:
        c.get("/login")
    return clients


@pytest.mark.timeout(300)
def test_concurrent_skips_of_one_assignment_free_one_slot(server, db_url: str) -> None:
    url, cid, tokens = server(n_pairs=10, overlap=1, n_raters=2)
    clients = warm_clients(url, tokens[0], 16)
    try:
        for _ in range(10):  # every pair: one open assignment, 16 simultaneous skips
            r = clients[0].post(f"/api/v1/campaigns/{cid}/next")
            if r.status_code == 204:
                break
            aid = r.json()["assignment_id"]
            codes = parallel(
                16,
                lambda i, aid=aid: clients[i].post(f"/api/v1/assignments/{aid}/skip").status_code,
            )
            assert codes == [200] * 16  # a repeated skip is a no-op, not an error
    finally:
        for c in clients:
            c.close()
    inv = invariants(db_url, cid, overlap=1)
    assert not inv["slot_mismatch"] and not inv["negative"], inv
    # each slot is free exactly once: the other rater gets all 10 pairs, one at a time
    h = {"Authorization": f"Bearer {tokens[1]}"}
    got = 0
    while (r := httpx.post(f"{url}/api/v1/campaigns/{cid}/next", headers=h)).status_code == 200:
        aid = r.json()["assignment_id"]
        assert (
            httpx.post(
                f"{url}/api/v1/assignments/{aid}/label", headers=h, json={"answer": "a"}
            ).status_code
            == 200
        )
        got += 1
    assert got == 10 and invariants(db_url, cid, overlap=1)["labels"] == 10


@pytest.mark.timeout(300)
def test_label_racing_skip_and_duplicate_submits(server, db_url: str) -> None:
    url, cid, tokens = server(n_pairs=2, overlap=1, n_raters=2)
    h = {"Authorization": f"Bearer {tokens[0]}"}
    clients = warm_clients(url, tokens[0], 6)
    aid = clients[0].post(f"/api/v1/campaigns/{cid}/next").json()["assignment_id"]

    def label_or_skip(i: int) -> tuple[str, int]:
        if i % 2:
            return "skip", clients[i].post(f"/api/v1/assignments/{aid}/skip").status_code
        r = clients[i].post(f"/api/v1/assignments/{aid}/label", json={"answer": "a"})
        return "label", r.status_code

    results = parallel(6, label_or_skip)
    labels_ok = [c for k, c in results if k == "label" and c == 200]
    skips_ok = [c for k, c in results if k == "skip" and c == 200]
    assert all(c in (200, 409) for _, c in results), results  # never a 500
    assert (len(labels_ok), len(skips_ok)) in ((1, 0), (0, 3)), results  # one side won
    # six concurrent submits of one label: one stored, five told it is already done
    aid2 = httpx.post(f"{url}/api/v1/campaigns/{cid}/next", headers=h).json()["assignment_id"]
    codes = parallel(
        6,
        lambda i: clients[i].post(f"/api/v1/assignments/{aid2}/label", json={"answer": "b"}),
    )
    for c in clients:
        c.close()
    assert sorted(r.status_code for r in codes) == [200] + [409] * 5, [r.text for r in codes]
    inv = invariants(db_url, cid, overlap=1)
    assert not inv["slot_mismatch"] and not inv["over_overlap"] and not inv["duplicates"], inv
    # whoever won, the other rater can have a pair only if its slot was given back
    h2 = {"Authorization": f"Bearer {tokens[1]}"}
    r = httpx.post(f"{url}/api/v1/campaigns/{cid}/next", headers=h2)
    assert r.status_code == (204 if labels_ok else 200)


@pytest.mark.timeout(600)
def test_randomized_raters_keep_the_invariants(server, db_url: str) -> None:
    """50 raters mixing next / label / skip / duplicate retries for 20 s."""
    overlap = 2
    n_pairs = 4000  # more than 20 s of work: the raters stop at the deadline, not for lack of pairs
    url, cid, tokens = server(n_pairs=n_pairs, overlap=overlap, n_raters=50)
    stop = time.monotonic() + 20
    errors: list[str] = []
    counts = {"label": 0, "skip": 0, "retry": 0, "conflict": 0}
    lock = threading.Lock()

    def rater(i: int) -> None:
        rng = random.Random(i)
        h = {"Authorization": f"Bearer {tokens[i]}"}
        with httpx.Client(base_url=url, headers=h, timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post(f"/api/v1/campaigns/{cid}/next")
                if r.status_code == 204:
                    return
                if r.status_code != 200:
                    errors.append(f"next {r.status_code} {r.text[:200]}")
                    return
                aid = r.json()["assignment_id"]
                action = rng.choice(["label", "label", "skip", "retry"])
                calls = 2 if action == "retry" else 1  # a client that retries after a timeout
                for _ in range(calls):
                    if action == "skip":
                        r = c.post(f"/api/v1/assignments/{aid}/skip")
                    else:
                        r = c.post(
                            f"/api/v1/assignments/{aid}/label",
                            json={"answer": rng.choice("ab"), "seconds": rng.random() * 9},
                        )
                    if r.status_code == 409:
                        with lock:
                            counts["conflict"] += 1
                    elif r.status_code != 200:
                        errors.append(f"{action} {r.status_code} {r.text[:200]}")
                with lock:
                    counts[action] += 1
                if rng.random() < 0.1:  # and sometimes skips what it already labelled
                    r = c.post(f"/api/v1/assignments/{aid}/skip")
                    if r.status_code not in (200, 409):
                        errors.append(f"late skip {r.status_code}")

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(rater, range(50)))
    assert not errors, errors[:5]
    assert counts["label"] + counts["retry"] > 100 and counts["skip"] > 10, counts
    assert counts["conflict"] >= counts["retry"], counts  # every retry was refused
    inv = invariants(db_url, cid, overlap)
    assert inv["labels"] < n_pairs * overlap  # they were still going at the deadline
    assert not inv["slot_mismatch"], inv
    assert not inv["over_overlap"] and not inv["duplicates"] and not inv["negative"], inv
