"""Benchmark: time to 0.98 test accuracy on the embedded digits, `rayloop train` against plain PyTorch.

Usage: .venv/bin/python bench/train.py [--rounds 1] [--epochs N] [--out bench/RESULTS.md]

Side by side in one run, alternating: (1) the whole `rayloop train` command in a fresh data dir
(Ray start, prepare, Ray Data ingest, Ray Train, evaluation, MLflow registration), timed from
launch to exit, its final test accuracy checked against the target; (2) a plain single-process
PyTorch loop of the same model on the same split (arrays in memory, batch 64, AdamW + one-cycle,
the same augmentation, torch threads = cores), timed from launch to the end of the first epoch whose
test accuracy reaches the target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ itself must not shadow the `train` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.98


def plain(epochs: int, data_dir: str) -> None:
    """The baseline, in its own process: prints one JSON line per epoch (seconds since launch, test accuracy)."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    import torch

    from cluster.settings import load_settings
    from train.data import prepared_or_new
    from train.model import ImageClassifier
    from train.train import random_shift
    from train.transforms import to_tensor

    torch.set_num_threads(os.cpu_count() or 1)
    settings = load_settings({**os.environ, "RAYLOOP_DATA_DIR": data_dir})
    data = prepared_or_new(settings.data, settings.prepared_dir)
    x_train, y_train = data.split("train")
    x_test, y_test = data.split("test")
    images, labels = to_tensor(x_train), torch.from_numpy(y_train)
    test_images, test_labels = to_tensor(x_test), torch.from_numpy(y_test)
    torch.manual_seed(0)
    model = ImageClassifier("cnn", data.meta.classes, 1, 28)
    model.set_normalisation(images.mean((0, 2, 3)), images.std((0, 2, 3)))
    t = settings.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps = (len(images) + t.batch_size - 1) // t.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, epochs=epochs, steps_per_epoch=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images), t.batch_size):
            index = order[i:i + t.batch_size]
            loss = torch.nn.functional.cross_entropy(model(random_shift(images[index], 2)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(test_images).argmax(1) == test_labels).float().mean())
        print(json.dumps({"epoch": epoch + 1, "seconds": time.time() - launched, "test_accuracy": accuracy}),
              flush=True)


def run_plain(epochs: int, data_dir: str) -> dict:
    env = {**os.environ, "BENCH_LAUNCHED": str(time.time())}
    out = subprocess.run([sys.executable, __file__, "--plain-worker", data_dir, "--epochs", str(epochs)],
                         env=env, capture_output=True, text=True, check=True, cwd=REPO)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    reached = next((r for r in rows if r["test_accuracy"] >= TARGET), None)
    return {"target": "plain PyTorch", "seconds": reached["seconds"] if reached else None,
            "epochs": reached["epoch"] if reached else None, "accuracy": rows[-1]["test_accuracy"],
            "wall": rows[-1]["seconds"]}


def run_rayloop(epochs: int | None) -> dict:
    from cluster.ray_cluster import free_port  # here: the plain worker's clock must not pay for importing ray

    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYLOOP_", "RAY_ADDRESS"))}
        env.update(RAYLOOP_DATA_DIR=directory, RAYLOOP_MLFLOW_URI=f"sqlite:///{directory}/mlflow.db",
                   RAYLOOP_PARAMS=str(REPO / "params.yaml"))
        for name in ("SERVE", "DASHBOARD", "RAY"):
            env[f"RAYLOOP_SERVICES_{name}_PORT"] = str(free_port())
        command = [str(REPO / ".venv/bin/rayloop"), "train", "--json"] + (["--epochs", str(epochs)] if epochs else [])
        started = time.time()
        out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        seconds = time.time() - started
    if out.returncode != 0:
        raise RuntimeError(f"rayloop train failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout[out.stdout.rindex("\n{"):] if "\n{" in out.stdout else out.stdout)
    accuracy = summary["test_accuracy"]
    return {"target": "rayloop train", "seconds": seconds if accuracy >= TARGET else None, "epochs": epochs,
            "accuracy": accuracy, "wall": seconds, "train_seconds": summary.get("train_seconds")}


def table(rows: list[dict], epochs: int, command: str) -> str:
    ratios = [r["seconds"] / p["seconds"] for r, p in zip(rows[1::2], rows[0::2]) if r["seconds"] and p["seconds"]]
    lines = [f"## Time to {TARGET} test accuracy: `rayloop train` vs a plain PyTorch loop (embedded digits)", "",
             f"Command: `{command}`  ",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores, "
             f"CPU only), {epochs} epochs each, same split, same model (the small CNN), alternating.", "",
             "| round | target | seconds to target | epoch reached | final test acc | wall s |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        reached = f"{r['seconds']:.1f}" if r["seconds"] else "not reached"
        lines.append(f"| {i // 2 + 1} | {r['target']} | {reached} | {r['epochs'] or '-'} | {r['accuracy']:.4f} | "
                     f"{r['wall']:.1f} |")
    walls = [r["wall"] / p["wall"] for r, p in zip(rows[1::2], rows[0::2]) if r["seconds"] and p["seconds"]]
    if ratios:
        lines += ["", f"rayloop / plain, whole runs of the same {epochs}-epoch schedule, both reaching {TARGET}: "
                  + ", ".join(f"{x:.2f}x" for x in walls) + f" (median {statistics.median(walls):.2f}x; goal <= 1.5x).",
                  f"rayloop / plain, the plain loop stopped at its first epoch whose *test* accuracy reaches {TARGET}: "
                  + ", ".join(f"{x:.2f}x" for x in ratios) + f" (median {statistics.median(ratios):.2f}x).",
                  "rayloop's time is the whole command: Ray start, prepare, training, evaluation, MLflow registration."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=0, help="both sides (default: train.epochs)")
    parser.add_argument("--out", default="bench/RESULTS.md")
    parser.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain(args.epochs, args.plain_worker)
        return 0
    from cluster.settings import load_settings

    epochs = args.epochs or load_settings().train.epochs
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as data_dir:
        for _ in range(args.rounds):
            rows.append(run_plain(epochs, data_dir))
            print(rows[-1], flush=True)
            rows.append(run_rayloop(args.epochs or None))
            print(rows[-1], flush=True)
    command = "make bench  (= .venv/bin/python bench/train.py" + "".join(
        f" {a}" for a in sys.argv[1:]) + ")"
    section = table(rows, epochs, command)
    sys.path.append(str(Path(__file__).resolve().parent))
    from results import write_section

    write_section("bench/train.py", section, Path(args.out))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
