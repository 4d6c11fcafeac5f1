"""Benchmark: time to 0.97 validation accuracy and images/s, 1 vs 2 Ray Train workers, same run.

Usage: .venv/bin/python bench/train.py [--epochs N] [--out bench/RESULTS.md]
Trains on the embedded MNIST split with the default params (no registration), once per worker
count, side by side in one process, and writes a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ itself must not shadow the `train` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cluster import environment  # noqa: E402

environment.apply()  # before ray is imported
import ray  # noqa: E402
import torch  # noqa: E402

from cluster.settings import load_settings  # noqa: E402
from train.data import prepared_or_new  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.train import TrainConfig, fit  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # for results.py, after our packages
from results import write_section  # noqa: E402

TARGET = 0.97


def measure(settings, data, workers: int) -> dict:
    """One training run; returns the figures for the table."""
    hp = TrainConfig.from_settings(settings)
    started = time.perf_counter()
    outcome = fit(settings, data, hp, name=f"bench-{workers}w-{int(time.time())}", num_workers=workers)
    wall = time.perf_counter() - started
    overhead = wall - outcome.history[-1]["wall_seconds"]  # scheduling, worker start, DDP set-up
    reached = next((row for row in outcome.history if row["val_accuracy"] >= TARGET), None)
    x_test, y_test = data.split("test")
    return {
        "workers": workers,
        "wall": wall,
        "to_target": overhead + reached["wall_seconds"] if reached else None,
        "epoch_to_target": reached["epoch"] if reached else None,
        "img_s": statistics.median(row["images_per_s"] for row in outcome.history),
        "val": outcome.history[-1]["val_accuracy"],
        "test": evaluate(outcome.model, x_test, y_test).accuracy,
    }


def table(rows: list[dict], epochs: int, command: str) -> str:
    """Markdown section with the figures and the ratio between the two runs."""
    lines = ["## Training: 1 vs 2 Ray Train workers (embedded MNIST)", "",
             f"Command: `{command}`  ",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({torch.get_num_threads()} torch threads in the driver, CPU only), {epochs} epochs, default params.", "",
             "| workers | wall time (s) | time to 0.97 val acc (s) | epoch reached | images/s (median epoch) "
             "| final val acc | test acc |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        to_target = f"{r['to_target']:.1f}" if r["to_target"] is not None else "not reached"
        lines.append(f"| {r['workers']} | {r['wall']:.1f} | {to_target} | {r['epoch_to_target'] or '-'} | "
                     f"{r['img_s']:.0f} | {r['val']:.4f} | {r['test']:.4f} |")
    if len(rows) == 2:
        lines += ["", f"2 workers / 1 worker: images/s x{rows[1]['img_s'] / rows[0]['img_s']:.2f}, "
                      f"wall time x{rows[1]['wall'] / rows[0]['wall']:.2f}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=0, help="override train.epochs")
    parser.add_argument("--out", default="bench/RESULTS.md")
    args = parser.parse_args()
    settings = load_settings()
    if args.epochs:
        settings.train.epochs = args.epochs
    data = prepared_or_new(settings.data, settings.prepared_dir)
    from cluster.ray_cluster import start_local

    start_local(num_cpus=2, logging_level="WARNING")
    rows = [measure(settings, data, workers) for workers in (1, 2)]
    ray.shutdown()
    section = table(rows, settings.train.epochs, "make bench  (= .venv/bin/python bench/train.py)")
    write_section("bench/train.py", section, Path(args.out))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
