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


def start_server(db: str, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PALATE_SECRET_KEY="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "palate.cli", "serve", "--db", db, "--port", str(port)]
        + ["--workers", str(workers)],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            up = httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            up = False
        if up and (workers == 1 or len(worker_pids(proc)) == workers):
            return proc, url
        time.sleep(0.1)
    for pid in worker_pids(proc):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    raise RuntimeError("server did not start")


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """uvicorn's worker processes under its supervisor (``--workers N``; spawned children,
    not multiprocessing's resource tracker)."""
    import psutil

    pids = []
    for child in psutil.Process(proc.pid).children():
        try:
            if child.is_running() and "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


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


def rater_loop(
    url: str,
    cid: int,
    token: str,
    done: list[int],
    stop: threading.Event,
    retry: bool = False,
) -> None:
    """Label until the campaign has nothing left for this rater. ``retry``: a dropped
    connection (its worker was killed) is retried, as a browser's rater would; the rater's open
    assignment comes back on the next ``/next``."""
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
                if retry and r.status_code == 409:  # labelled by the request that lost its reply
                    continue
                r.raise_for_status()
                done.append(r.json()["label_id"])  # acknowledged: must survive
            except httpx.TransportError:
                if stop.is_set():
                    return
                if not retry:
                    raise
                time.sleep(0.05)
            except httpx.HTTPError:
                if stop.is_set():
                    return
                raise


class Raters:
    """One thread per rater token running :func:`rater_loop`; ``done`` collects acknowledged
    label ids, ``errors`` what any rater raised."""

    def __init__(self, url: str, cid: int, tokens: list[str], *, retry: bool = False):
        self.done: list[int] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

        def run(tok: str) -> None:
            try:
                rater_loop(url, cid, tok, self.done, self.stop, retry=retry)
            except BaseException as e:  # any failure is reported by the test
                self.errors.append(e)

        self.threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in tokens]
        for t in self.threads:
            t.start()

    def wait_for(self, labels: int) -> None:
        while len(self.done) < labels and any(t.is_alive() for t in self.threads):
            time.sleep(0.02)

    def join(self, timeout: float | None = None) -> None:
        for t in self.threads:
            t.join(timeout)


def _check_filled(db: str, pairs: int, overlap: int) -> set[int]:
    """Exactly ``overlap`` labels on every pair, no rater twice on one pair; the label ids."""
    with open_db(db)() as s:
        per_pair = s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
        assert len(per_pair) == pairs and all(n == overlap for _, n in per_pair)
        dup = s.execute(
            select(Label.pair_id, Label.rater_id, func.count())
            .group_by(Label.pair_id, Label.rater_id)
            .having(func.count() > 1)
        ).all()
        assert dup == []
        assert all(p.n_assigned == overlap for p in s.scalars(select(Pair)))
        return set(s.scalars(select(Label.id)))


@pytest.mark.timeout(600)
def test_50_concurrent_raters_fill_500_pairs_exactly(db_url: str) -> None:
    cid, tokens = make_campaign(db_url, 500, 3, 50)
    proc, url = start_server(db_url)
    try:
        raters = Raters(url, cid, tokens)
        raters.join()
        assert not raters.errors, raters.errors[:3]
    finally:
        proc.terminate()
        proc.wait(30)
    stored = _check_filled(db_url, 500, 3)
    assert len(stored) == 1500 == len(raters.done)


@pytest.mark.timeout(300)
def test_sigkill_loses_no_acknowledged_label(db_url: str) -> None:
    db = db_url
    cid, tokens = make_campaign(db, 300, 2, 8)
    proc, url = start_server(db)
    raters = Raters(url, cid, tokens)
    raters.wait_for(150)
    raters.stop.set()  # from here a failed request is expected, not an error
    proc.send_signal(signal.SIGKILL)  # mid-campaign, requests in flight
    proc.wait(30)
    raters.join(60)
    assert not raters.errors, raters.errors[:3]
    acknowledged = set(raters.done)
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


@pytest.mark.timeout(600)
def test_four_workers_on_postgres_50_raters_and_a_worker_killed(pg_url: str) -> None:
    """``palate serve --workers 4`` on PostgreSQL: 50 raters label 500 pairs × overlap 3 over
    real HTTP while one worker is SIGKILLed mid-run; its raters reconnect (to the others or the
    replacement uvicorn starts) and the campaign still fills exactly."""
    cid, tokens = make_campaign(pg_url, 500, 3, 50)
    proc, url = start_server(pg_url, workers=4)
    try:
        raters = Raters(url, cid, tokens, retry=True)
        raters.wait_for(500)
        for _ in range(600):  # a worker being replaced (the supervisor's health check) is back
            before = worker_pids(proc)
            if len(before) == 4:
                break
            time.sleep(0.1)
        assert len(before) == 4
        os.kill(before[0], signal.SIGKILL)  # mid-run: its requests in flight are cut off
        raters.join()
        assert not raters.errors, raters.errors[:3]
        for _ in range(200):  # the supervisor replaces the dead worker
            after = worker_pids(proc)
            if len(after) == 4 and before[0] not in after:
                break
            time.sleep(0.1)
        assert len(after) == 4 and before[0] not in after
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    stored = _check_filled(pg_url, 500, 3)
    assert len(stored) == 1500 and set(raters.done) <= stored


@pytest.mark.timeout(300)
def test_sigterm_lets_requests_finish_and_exits_cleanly(pg_url: str) -> None:
    """SIGTERM to ``palate serve --workers 2``: it stops taking requests, lets those in flight
    finish, and exits 0; no request got a server error and every acknowledged label is stored."""
    cid, tokens = make_campaign(pg_url, 300, 2, 8)
    proc, url = start_server(pg_url, workers=2)
    raters = Raters(url, cid, tokens)
    raters.wait_for(100)
    raters.stop.set()  # connection errors from here on are the server going away: expected
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    raters.join(60)
    assert not raters.errors, raters.errors[:3]  # a 5xx would have raised (raise_for_status)
    with open_db(pg_url)() as s:
        stored = set(s.scalars(select(Label.id)))
    assert set(raters.done) <= stored
