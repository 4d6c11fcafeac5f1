"""Benchmark: the closed loop's timings on this machine, from the first shifted request to 100% on the new model.

Usage: .venv/bin/python bench/loop.py [--shift rotate --severity 90]
Brings rayloop up on a fresh temporary data dir and free ports (embedded defaults otherwise), runs the
scenario of simulation/scenario.py (shifted traffic with labels for 80% + clean background load), writes
the figures to bench/RESULTS.md and brings everything down again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/ must not shadow packages
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))

from cluster import environment  # noqa: E402

environment.apply()  # before ray is imported

from results import write_section  # noqa: E402

from cluster.ray_cluster import free_port  # noqa: E402
from cluster.settings import load_settings  # noqa: E402
from simulation.scenario import run_scenario  # noqa: E402
from store import Store  # noqa: E402
from train.data import load_prepared  # noqa: E402

RAYLOOP = str(Path(sys.executable).parent / "rayloop")


def table(r: dict, command: str) -> str:
    """Markdown section for RESULTS.md."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return "\n".join([
        "## Closed loop: shift -> drift -> retrain -> gate -> rolling update",
        "",
        f"Command: `{command}`  ",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} (2 cores, CPU only), "
        f"embedded defaults, shift `{r['shift']}` severity {r['severity']}, labels for 80% of shifted requests, "
        "clean background load on 2 connections throughout; load average "
        f"{r['load'][0]:.1f} before, {r['load'][1]:.1f} after.",
        "",
        "| measure | value |", "|---|---|",
        f"| first shifted request -> drift reported (s) | {fmt(r['to_drift'])} |",
        f"| -> retrain job started (s) | {fmt(r['to_retrain_start'])} |",
        f"| -> challenger promoted (s) | {fmt(r['to_promotion'])} |",
        f"| -> 100% of traffic on the new version (s) | {fmt(r['to_full_traffic'])} |",
        f"| shifted requests sent | {r['shifted_sent']} |",
        f"| background requests / failed during the run | {r['background_sent']} / {r['background_failed']} |",
        f"| slowest background request (s) | {r['background_max_latency']:.2f} |",
        f"| accuracy on the shift: champion v{r['champion_before']} -> v{r['champion_after']} | "
        f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} |",
        f"| clean accuracy of v{r['champion_after']} | {r['clean_accuracy_after']:.3f} |",
        f"| gate | {r['gate'].get('reason', '')} |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shift", default="rotate")
    parser.add_argument("--severity", type=float, default=90)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="rayloop-bench-loop-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update(RAYLOOP_DATA_DIR=str(data_dir), RAYLOOP_SERVICES_SERVE_PORT=str(free_port()),
               RAYLOOP_SERVICES_MLFLOW_PORT=str(free_port()), RAYLOOP_SERVICES_DASHBOARD_PORT=str(free_port()),
               RAYLOOP_SERVICES_UI_PORT=str(free_port()), RAYLOOP_SERVICES_RAY_PORT=str(free_port()))
    load_before = os.getloadavg()[0]
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAYLOOP_")})
    settings = load_settings()
    subprocess.run([RAYLOOP, "up"], cwd=REPO, env=env, check=True)
    store = Store.from_settings(settings)
    try:
        url = f"http://127.0.0.1:{settings.services.serve_port}"
        result = run_scenario(url, store, load_prepared(settings.prepared_dir), shift=args.shift,
                              severity=args.severity).as_dict()
    finally:
        store.close()
        subprocess.run([RAYLOOP, "down"], cwd=REPO, env=env, check=False)
    result["load"] = (load_before, os.getloadavg()[0])
    print(json.dumps(result, indent=2, default=str))
    write_section("bench/loop.py", table(result, f"make bench-loop  (= .venv/bin/python bench/loop.py "
                                                 f"--shift {args.shift} --severity {args.severity:g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
