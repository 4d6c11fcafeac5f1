"""Fixtures the reliability tests share: a throwaway PostgreSQL, and a store URL on SQLite and on it.

Each module brings its own `served` (tests/support/serving.py); tests/conftest.py gives it a `client`.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL (Debian's package) on a free port, unix socket in a temp dir."""
    from cluster.ray_cluster import free_port

    pg_ctl = shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl"
    if not Path(pg_ctl).is_file():
        pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) are not installed: apt-get install postgresql")
    bin_dir = Path(pg_ctl).resolve().parent
    # Not under pytest's tmp dir: the postgres user must be able to reach it, and root's is private.
    root = Path(tempfile.mkdtemp(prefix="rayloop-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    try:
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "rayloop",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"),
                        "-w", "-o", f"-p {port} -k {root} -c listen_addresses='' -c max_connections=200",
                        "start"], check=True, capture_output=True, timeout=120)
        yield f"postgresql+psycopg://rayloop@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}"
    return request.getfixturevalue("postgres_url")
