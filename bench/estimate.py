"""Accuracy estimated from confidence (monitoring/estimate.py) against the true accuracy, on every shift of the
loop benchmark at both severities, window by window.

Offline and in-process: the DVC pipeline's model (data/model, `dvc repro` or `rayloop train`), its estimator
fitted as a registered champion's is (train/pipeline.finalize keeps whether it got each reference image right)
but on the validation split only, and windows of monitor.window_size test images (never in the reference),
shifted by simulation/shifts.py as `rayloop simulate` shifts them. The loop benchmark (bench/loop.py) measures
the same estimate on live traffic, one figure per scenario; this one measures many windows in seconds.

    .venv/bin/python -m bench.estimate [--windows 20] [--seed 0]   (a module: bench/train.py would shadow train/)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cluster.settings import load_settings
from monitoring.estimate import from_reference
from simulation.bench_loop import SEVERITIES
from simulation.shifts import shift_images
from train.data import load_prepared
from train.pipeline import finalize
from train.train import load_model
from train.transforms import to_tensor

RESULTS = Path(__file__).with_name("estimate_results.json")
BATCH = 256


def chunks(images: np.ndarray, labels: np.ndarray):
    for start in range(0, len(labels), BATCH):
        yield {"image": images[start:start + BATCH], "label": labels[start:start + BATCH]}


def answers(model, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, right) per image."""
    confidence, right = [], []
    with torch.inference_mode():
        for batch in chunks(images, labels):
            probabilities = model.infer(to_tensor(batch["image"]))["probabilities"].float()
            best = probabilities.max(1)
            confidence.append(best.values.numpy())
            right.append((best.indices.numpy() == batch["label"]))
    return np.concatenate(confidence), np.concatenate(right)


def measure(estimator, confidence: np.ndarray, right: np.ndarray, windows: int, size: int,
            rng: np.random.Generator) -> dict:
    """Per window of `size` predictions: the estimate, its 90% interval and the true accuracy."""
    rows = []
    for _ in range(windows):
        pick = rng.choice(len(right), size=min(size, len(right)), replace=False)
        e = estimator.estimate(confidence[pick])
        rows.append((e.accuracy, e.low, e.high, float(right[pick].mean())))
    est, low, high, true = map(np.array, zip(*rows))
    return {"estimated": round(float(est.mean()), 4), "true": round(float(true.mean()), 4),
            "mean_abs_error": round(float(np.abs(est - true).mean()), 4),
            "covered": round(float(((low <= true) & (true <= high)).mean()), 3), "windows": windows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    settings = load_settings()
    data = load_prepared(settings.prepared_dir)
    model = load_model(settings.model_dir).eval()
    estimator = from_reference(finalize(model, chunks(*data.split("val"))))
    if isinstance(estimator, str):
        raise SystemExit(estimator)
    images, labels = data.split("test")
    size, rng = settings.monitor.window_size, np.random.default_rng(args.seed)
    scenarios = [("clean", None, None)] + [(f"{kind}:{s:g}", kind, s) for kind, pair in SEVERITIES.items()
                                           for s in pair]
    rows = {}
    for name, kind, severity in scenarios:
        shifted = images if kind is None else shift_images(images, kind, severity, seed=args.seed)
        rows[name] = measure(estimator, *answers(model, shifted, labels), args.windows, size, rng)
    print("| shift | true accuracy | estimated | mean abs error | 90% interval held the truth |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| `{name}` | {r['true']:.3f} | {r['estimated']:.3f} | {r['mean_abs_error']:.3f} | {r['covered']:.0%} |")
    meta = {"model": str(settings.model_dir), "reference": f"val split, {len(data.split('val')[1])} images",
            "test_images": int(len(labels)), "window_size": size, "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
