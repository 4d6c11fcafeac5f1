"""A throwaway PostgreSQL server from Debian's package: unix socket in a temp dir, a free port, trust auth."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start one; yields the SQLAlchemy URL of its `postgres` database (user `rayloop`)."""
    from cluster.ray_cluster import free_port

    pg_ctl = shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl"
    if not Path(pg_ctl).is_file():
        # A failure, not a skip: `make test` installs it (scripts/system-deps.sh), and a skip would hide the
        # PostgreSQL half of the store tests and the separate-disks proof.
        pytest.fail("PostgreSQL server binaries (pg_ctl, initdb) are not installed: scripts/system-deps.sh "
                    "(or apt-get install postgresql)")
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


def new_database(server_url: str, name: str) -> str:
    """Create database `name` on the server; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return server_url.replace("/postgres?", f"/{name}?", 1)
