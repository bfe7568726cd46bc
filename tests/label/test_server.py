"""Against a real running server (``palate serve`` in a subprocess, real HTTP): many concurrent
raters, and a SIGKILL mid-campaign."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from palate.label.db import Label, Pair, open_db
from palate.label.store import PairIn, create_campaign, create_user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PALATE_SECRET_KEY="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "palate.cli", "serve", "--db", db, "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/login", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def make_campaign(db: str, n_pairs: int, overlap: int, n_raters: int) -> tuple[int, list[str]]:
    factory = open_db(db)
    with factory() as s:
        camp = create_campaign(
            s,
            "c",
            [
                PairIn(prompt=f"q{i}", response_a=f"a{i}", response_b=f"b{i}")
                for i in range(n_pairs)
            ],
            overlap=overlap,
        )
        tokens = [create_user(s, f"r{i}")[2] for i in range(n_raters)]
    return camp.id, tokens


def rater_loop(url: str, cid: int, token: str, done: list[int], stop: threading.Event) -> None:
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=h, timeout=60) as c:
        while not stop.is_set():
            try:
                r = c.post(f"/api/v1/campaigns/{cid}/next")
                if r.status_code == 204:
                    return
                r.raise_for_status()
                j = r.json()
                r = c.post(f"/api/v1/assignments/{j['assignment_id']}/label", json={"answer": "a"})
                r.raise_for_status()
                done.append(r.json()["label_id"])  # acknowledged: must survive
            except httpx.HTTPError:
                if stop.is_set():
                    return
                raise


@pytest.mark.timeout(600)
def test_50_concurrent_raters_fill_500_pairs_exactly(db_url: str) -> None:
    db = db_url
    cid, tokens = make_campaign(db, 500, 3, 50)
    proc, url = start_server(db)
    try:
        done: list[int] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def run(tok: str) -> None:
            try:
                rater_loop(url, cid, tok, done, stop)
            except BaseException as e:  # any failure is reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
    finally:
        proc.terminate()
        proc.wait(30)
    with open_db(db)() as s:
        assert s.scalar(select(func.count(Label.id))) == 1500 == len(done)
        per_pair = s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
        assert len(per_pair) == 500 and all(n == 3 for _, n in per_pair)
        dup = s.execute(
            select(Label.pair_id, Label.rater_id, func.count())
            .group_by(Label.pair_id, Label.rater_id)
            .having(func.count() > 1)
        ).all()
        assert dup == []
        assert all(p.n_assigned == 3 for p in s.scalars(select(Pair)))


@pytest.mark.timeout(300)
def test_sigkill_loses_no_acknowledged_label(db_url: str) -> None:
    db = db_url
    cid, tokens = make_campaign(db, 300, 2, 8)
    proc, url = start_server(db)
    done: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=rater_loop, args=(url, cid, t, done, stop), daemon=True)
        for t in tokens
    ]
    for t in threads:
        t.start()
    while len(done) < 150:
        time.sleep(0.05)
    stop.set()  # from here a failed request is expected, not an error
    proc.send_signal(signal.SIGKILL)  # mid-campaign, requests in flight
    proc.wait(30)
    for t in threads:
        t.join(60)
    acknowledged = set(done)
    proc, url = start_server(db)  # restart on the same file
    try:
        with open_db(db)() as s:
            stored = set(s.scalars(select(Label.id)))
        assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
        # and labeling continues after the restart
        h = {"Authorization": f"Bearer {tokens[0]}"}
        r = httpx.post(f"{url}/api/v1/campaigns/{cid}/next", headers=h, timeout=30)
        assert r.status_code in (200, 204)
    finally:
        proc.terminate()
        proc.wait(30)
