"""The whole system as `rayloop up` starts it, on free ports in a test's own data dir, and `rayloop down` after."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.ray_cluster import free_port
from cluster.settings import Settings, load_settings
from tests.support.paths import REPO

RAYLOOP = str(Path(sys.executable).parent / "rayloop")
PORTS = ("SERVE", "MLFLOW", "DASHBOARD", "RAY", "UI")


@dataclass
class System:
    settings: Settings
    url: str  # the Serve API
    env: dict[str, str]


@contextlib.contextmanager
def system_up(data_dir: Path, monkeypatch, **overrides: str) -> Iterator[System]:
    """`rayloop up` with RAYLOOP_* `overrides` (none of the caller's own RAYLOOP_* leak in; this process gets the
    same settings, so a Store or load_settings here sees what the system sees); `rayloop down` at the end."""
    ports = {f"RAYLOOP_SERVICES_{name}_PORT": str(free_port()) for name in PORTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
    env.update(ports, RAYLOOP_DATA_DIR=str(data_dir), RAY_USAGE_STATS_ENABLED="0", **overrides)
    for key, value in env.items():
        if key.startswith("RAYLOOP_"):
            monkeypatch.setenv(key, value)
    up = subprocess.run([RAYLOOP, "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield System(load_settings(), f"http://127.0.0.1:{ports['RAYLOOP_SERVICES_SERVE_PORT']}", env)
    finally:
        subprocess.run([RAYLOOP, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
