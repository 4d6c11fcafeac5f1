"""The drift monitor's cost per check: its decision alone vs with Evidently's full report (HTML + JSON).

`.venv/bin/python bench/drift_check.py`: a reference of 500 digits and a window of 200 (the defaults), drift
features from the production ImageClassifier on a tiny backbone; CPU time per check in this process.
The monitor now builds the report only for a window that drifted (monitoring/drift.py check_drift).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from cluster import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.results import write_section  # noqa: E402
from monitoring.calibration import Calibration  # noqa: E402
from monitoring.drift import DriftSettings, check_drift  # noqa: E402
from monitoring.thresholds import null_samples  # noqa: E402
from tests.support.models import tiny_classifier  # noqa: E402
from train.data import load_mnist  # noqa: E402
from train.features import feature_frame  # noqa: E402
from train.transforms import to_tensor  # noqa: E402

REPEATS = 10


def per_check(reference, window, folder: str, **options) -> tuple[float, float]:
    check_drift(reference, window, data_dir=folder, **options)  # warm
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(REPEATS):
        check_drift(reference, window, data_dir=folder, **options)
    return (time.process_time() - cpu) / REPEATS * 1000, (time.perf_counter() - wall) / REPEATS * 1000


def per_watch(reference, window) -> tuple[float, float]:
    """The calibrated tests alone on a window: what a watch between checks decides with."""
    calibration = Calibration.fit(reference, len(window), 0.001, seed=0, null_samples=null_samples(0.001))
    repeats = REPEATS * 10
    calibration.check(window)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        calibration.check(window)
    return (time.process_time() - cpu) / repeats * 1000, (time.perf_counter() - wall) / repeats * 1000


def main() -> int:
    torch.set_num_threads(1)
    images, _, classes = load_mnist()
    order = np.random.default_rng(0).permutation(len(images))
    model = tiny_classifier(classes).eval()
    settings = DriftSettings()
    with torch.no_grad():
        model.fit_drift_axes(model.embed(to_tensor(images[order[:500]])))
    reference = feature_frame(model, to_tensor(images[order[:500]]))
    window = feature_frame(model, to_tensor(images[order[1000:1000 + settings.window_size]]))
    folder = tempfile.mkdtemp()
    rows = [("decision only: Evidently's stat tests + MMD (what a calm check does now)",
             per_check(reference, window, folder)),
            ("with Evidently's report, saved as HTML and JSON (every check before)",
             per_check(reference, window, folder, report=True)),
            ("a watch between checks: the calibrated tests alone (its store read of the newest predictions "
             "not counted)", per_watch(reference, window))]
    interval = 15.0
    lines = ["## Drift monitor: cost of one check", "",
             "Command: `.venv/bin/python bench/drift_check.py`  ",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; reference 500 rows, window "
             f"{settings.window_size}, {REPEATS} checks each, one torch thread.", "",
             "| check | CPU ms | wall ms | share of one core at one per 15 s | at one per 2 s |",
             "|---|---:|---:|---:|---:|"]
    for name, (cpu, wall) in rows:
        lines.append(f"| {name} | {cpu:.1f} | {wall:.1f} | {cpu / 1000 / interval:.2%} | {cpu / 1000 / 2:.2%} |")
        print(f"{name}: {cpu:.0f} ms CPU, {wall:.0f} ms wall")
    write_section("bench/drift_check.py", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
