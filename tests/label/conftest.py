"""Database fixtures: every labeling test runs on a fresh SQLite file and on a fresh database in a
throwaway PostgreSQL cluster (initdb + pg_ctl from Debian's ``postgresql`` binaries).

Locally a missing PostgreSQL skips the PostgreSQL variants with a reason; under ``CI=true`` they
must run, so a missing server is a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from palate.label.db import open_db

_counter = itertools.count()


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests: .ci/run installs postgresql)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running throwaway cluster; yields a base URL (database name to append)."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        _unavailable("PostgreSQL binaries (initdb, pg_ctl) not found")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg not installed")
    root = tmp_path_factory.mktemp("pg")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres system user
        if shutil.which("runuser") is None:
            _unavailable("running as root without runuser")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        root.chmod(0o755)
        for parent in root.parents:  # let postgres reach its directory
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *a: subprocess.run([*prefix, *a], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "palate", "--auth=trust", "-E", "UTF8")
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-w",
        "-l",
        str(root / "log"),
        "-o",
        f"-k {sock} -p {port} -c listen_addresses='' -c fsync=on -c max_connections=200",
        "start",
    )
    try:
        yield f"postgresql+psycopg://palate@/{{db}}?host={sock}&port={port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL per test."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return _fresh_pg(request.getfixturevalue("pg_cluster"))


@pytest.fixture
def db(db_url: str) -> Iterator[Session]:
    """A session on a fresh database at the newest schema."""
    factory = open_db(db_url)
    with factory() as session:
        yield session


@pytest.fixture
def pg_url(pg_cluster: str) -> str:
    """A fresh, empty PostgreSQL database (for what only PostgreSQL is meant to carry)."""
    return _fresh_pg(pg_cluster)


def _fresh_pg(base: str) -> str:
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    admin = base.format(db="postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return base.format(db=name)
