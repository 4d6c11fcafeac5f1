"""Reliability and security: contention, hostile input, access, erasure, faults and restarts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECURITY = REPO / "bench" / "reliability_security.json"
FAULTS = REPO / "bench" / "reliability_faults.json"


def record_figures(section: str, figures: dict, path: Path = SECURITY) -> None:
    """Print a section of measured figures; with RAYLOOP_RECORD_FIGURES=1 (bench/reliability.py sets
    it) also merge it into `path`, so a plain `make test` leaves the tracked files alone."""
    print(f"\n[reliability] {section}: {json.dumps(figures, default=str)}", flush=True)
    if os.environ.get("RAYLOOP_RECORD_FIGURES") != "1":
        return
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[section] = {**figures, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "load_average": round(os.getloadavg()[0], 2)}
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(current, indent=2, default=str) + "\n")
    partial.replace(path)


def start_serve(data_dir: Path, **env: str):
    """Local Ray + the real Serve app on a free port with a tiny registered champion; a tests.test_serve_api.Served.

    `env` holds RAYLOOP_* overrides. Stop with stop_serve().
    """
    from cluster.settings import load_settings
    from control.deployment import deploy
    from tests.conftest import free_port
    from tests.test_serve_api import Served, register_tiny_model

    import ray

    values = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    values.update({"RAYLOOP_DATA_DIR": str(data_dir), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                   "RAYLOOP_SERVICES_SERVE_PORT": str(free_port()), "RAYLOOP_SERVE_MAX_UPLOAD_BYTES": "200000",
                   "RAYLOOP_SERVE_MAX_PIXELS": str(2048 * 2048), **env})
    settings = load_settings(values)
    register_tiny_model(settings)
    if not ray.is_initialized():
        # address="local": a fresh instance even when a `rayloop up` head runs on this machine.
        from cluster.ray_cluster import start_local

        start_local(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    return Served(settings, deploy(settings, timeout=240))


def stop_serve() -> None:
    import ray
    from ray import serve as rayserve

    rayserve.shutdown()
    ray.shutdown()
